"""Experiment files, their configs, and typed command-line overrides.

An experiment spec is ``path/to/file.py`` or ``path/to/file.py:arg``; the file
defines ``get_config(arg: str = "")`` returning a frozen dataclass of primitive
fields (int, float, str, bool, tuples of those, optionally ``| None``) and
``build(config) -> Experiment``. ``--set field=value`` overrides are parsed by
the field's declared type, so ``--set client_lr=0.1`` is a float and
``--set num_rounds=1e3`` is an error, not a silent cast.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Sequence


class ConfigError(ValueError):
  """A malformed experiment file, config or override (message says the fix)."""


@dataclasses.dataclass(frozen=True)
class ExperimentFile:
  """A loaded experiment file.

  Attributes:
    path: absolute path of the file.
    arg: the ``:arg`` suffix passed to ``get_config`` ("" if none).
    module: the imported module.
    name: the file's stem (run folders are named after it).
  """
  path: Path
  arg: str
  module: types.ModuleType
  name: str

  @property
  def spec(self) -> str:
    return f"{self.path}:{self.arg}" if self.arg else str(self.path)

  def sha256(self) -> str:
    return hashlib.sha256(self.path.read_bytes()).hexdigest()

  def get_config(self) -> Any:
    """Calls ``get_config(arg)`` and checks it returns a frozen dataclass."""
    fn = self.module.get_config
    try:
      cfg = fn(self.arg) if self.arg else fn()
    except TypeError as e:
      raise ConfigError(f"{self.path}: calling get_config({self.arg!r}) "
                        f"failed: {e}. Expected the signature "
                        "get_config(arg: str = \"\").") from e
    check_config(cfg, f"{self.path}: get_config({self.arg!r})")
    return cfg

  def build(self, config: Any):
    """Calls ``build(config)`` and checks it returns an Experiment."""
    from fedjax_lite.experiment.core import Experiment  # pylint: disable=g-import-not-at-top
    exp = self.module.build(config)
    if not isinstance(exp, Experiment):
      raise ConfigError(
          f"{self.path}: build(config) returned {type(exp).__name__}; expected "
          "a fedjax_lite.experiment.Experiment(model=..., algorithm=..., "
          "train=..., round_config=..., num_rounds=...).")
    return exp


def split_spec(spec: str) -> tuple[str, str]:
  """``"a/b.py:smoke"`` -> ``("a/b.py", "smoke")``; no suffix -> ``""``."""
  path, sep, arg = str(spec).rpartition(":")
  if sep and path.endswith(".py") and "/" not in arg:
    return path, arg
  return str(spec), ""


def load_experiment_file(spec: str) -> ExperimentFile:
  """Imports an experiment file given as ``path.py[:arg]``.

  Raises:
    ConfigError: the file is missing, is not Python, fails to import, or lacks
      ``get_config``/``build``.
  """
  path_str, arg = split_spec(spec)
  path = Path(path_str).expanduser()
  if not path.exists():
    near = sorted(p.name for p in path.parent.glob("*.py")) if \
        path.parent.is_dir() else []
    hint = f" Files in {path.parent}/: {', '.join(near)}." if near else ""
    raise ConfigError(f"experiment file {str(path)!r} does not exist; expected "
                      f"a path like experiments/fedavg_synthetic.py[:smoke]."
                      f"{hint}")
  if path.suffix != ".py" or not path.is_file():
    raise ConfigError(f"experiment {str(path)!r} is not a .py file; expected "
                      "experiments/<name>.py[:arg].")
  path = path.resolve()
  mod_name = "_fedjax_lite_experiment_" + hashlib.sha1(
      str(path).encode()).hexdigest()[:12]
  module_spec = importlib.util.spec_from_file_location(mod_name, path)
  module = importlib.util.module_from_spec(module_spec)
  sys.modules[mod_name] = module  # dataclasses need their module registered
  added = str(path.parent) not in sys.path
  if added:  # let experiments import their sibling helper modules
    sys.path.insert(0, str(path.parent))
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:
    sys.modules.pop(mod_name, None)
    raise ConfigError(f"importing experiment file {path} failed: "
                      f"{type(e).__name__}: {e}") from e
  finally:
    if added:
      sys.path.remove(str(path.parent))
  for fn in ("get_config", "build"):
    if not callable(getattr(module, fn, None)):
      raise ConfigError(
          f"{path} has no function {fn}(); an experiment file defines "
          "get_config(arg: str = \"\") -> <frozen dataclass> and "
          "build(config) -> fedjax_lite.experiment.Experiment.")
  return ExperimentFile(path=path, arg=arg, module=module, name=path.stem)


# ----------------------------------------------------------------- configs
_PRIMITIVES = (int, float, str, bool)


def _field_types(cls) -> dict:
  try:
    hints = typing.get_type_hints(cls)
  except Exception as e:  # unresolved forward references
    raise ConfigError(f"cannot resolve the field types of {cls.__name__}: {e}."
                      " Use built-in types (int, float, str, bool, tuple).")
  return {f.name: hints.get(f.name, f.type) for f in dataclasses.fields(cls)}


def check_config(cfg: Any, where: str = "config") -> None:
  """Raises ConfigError unless ``cfg`` is a frozen dataclass of primitives."""
  if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
    raise ConfigError(
        f"{where} returned {type(cfg).__name__}; expected an instance of a "
        "frozen dataclass, e.g. @dataclasses.dataclass(frozen=True) class "
        "Config: num_rounds: int = 100.")
  params = getattr(type(cfg), "__dataclass_params__", None)
  if params is None or not params.frozen:
    raise ConfigError(f"{where} returned a {type(cfg).__name__} that is not "
                      "frozen; declare it with "
                      "@dataclasses.dataclass(frozen=True).")
  for name, tp in _field_types(type(cfg)).items():
    _check_type(tp, f"{type(cfg).__name__}.{name}")
    value = getattr(cfg, name)
    if not _matches(value, tp):
      raise ConfigError(f"{where}: field {name!r} holds {value!r} "
                        f"({type(value).__name__}); its declared type is "
                        f"{_type_name(tp)}.")


def _union_args(tp):
  origin = typing.get_origin(tp)
  if origin is typing.Union or origin is types.UnionType:
    return typing.get_args(tp)
  return None


def _check_type(tp, where: str) -> None:
  if tp in _PRIMITIVES or tp is type(None):
    return
  args = _union_args(tp)
  if args is not None:
    for a in args:
      _check_type(a, where)
    return
  if typing.get_origin(tp) is tuple:
    for a in typing.get_args(tp):
      if a is not Ellipsis:
        _check_type(a, where)
    return
  if typing.get_origin(tp) is typing.Literal:
    return
  raise ConfigError(f"{where} has type {_type_name(tp)}; config fields must "
                    "be int, float, str, bool, tuples of those, optionally "
                    "| None (build objects in build(config), not the config).")


def _type_name(tp) -> str:
  return getattr(tp, "__name__", None) if isinstance(tp, type) else str(
      tp).replace("typing.", "")


def _matches(value, tp) -> bool:
  if tp is type(None):
    return value is None
  if tp is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if tp is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if tp in (str, bool):
    return isinstance(value, tp)
  args = _union_args(tp)
  if args is not None:
    return any(_matches(value, a) for a in args)
  if typing.get_origin(tp) is typing.Literal:
    return value in typing.get_args(tp)
  if typing.get_origin(tp) is tuple:
    if not isinstance(value, tuple):
      return False
    targs = typing.get_args(tp)
    if not targs:
      return True
    if len(targs) == 2 and targs[1] is Ellipsis:
      return all(_matches(v, targs[0]) for v in value)
    return len(targs) == len(value) and all(
        _matches(v, a) for v, a in zip(value, targs))
  return False


_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def parse_value(text: str, tp, where: str = "value") -> Any:
  """Parses command-line ``text`` as type ``tp`` (see module docstring)."""
  s = text.strip()
  args = _union_args(tp)
  if args is not None:
    if type(None) in args and s.lower() in ("none", "null"):
      return None
    errors = []
    for a in args:
      if a is type(None):
        continue
      try:
        return parse_value(s, a, where)
      except ConfigError as e:
        errors.append(str(e))
    raise ConfigError(f"{where}: cannot parse {text!r} as {_type_name(tp)}.")
  if tp is bool:
    if s.lower() in _TRUE:
      return True
    if s.lower() in _FALSE:
      return False
    raise ConfigError(f"{where}: expected a bool (true/false), got {text!r}.")
  if tp is int:
    try:
      return int(s.replace("_", ""), 0) if s.lower().startswith(
          ("0x", "0b", "0o")) else int(s.replace("_", ""))
    except ValueError:
      raise ConfigError(f"{where}: expected an int, got {text!r}"
                        + (" (write it without a decimal point or exponent)"
                           if _is_float(s) else "") + ".") from None
  if tp is float:
    try:
      return float(s)
    except ValueError:
      raise ConfigError(f"{where}: expected a float, got {text!r}.") from None
  if tp is str:
    return text
  if typing.get_origin(tp) is typing.Literal:
    for choice in typing.get_args(tp):
      if str(choice) == s:
        return choice
    raise ConfigError(f"{where}: expected one of {typing.get_args(tp)}, got "
                      f"{text!r}.")
  if typing.get_origin(tp) is tuple:
    inner = s[1:-1] if s[:1] in "([" and s[-1:] in ")]" else s
    items = [p for p in (x.strip() for x in inner.split(",")) if p]
    targs = typing.get_args(tp)
    if not targs:
      return tuple(items)
    if len(targs) == 2 and targs[1] is Ellipsis:
      return tuple(parse_value(p, targs[0], where) for p in items)
    if len(items) != len(targs):
      raise ConfigError(f"{where}: expected {len(targs)} comma-separated "
                        f"values for {_type_name(tp)}, got {text!r}.")
    return tuple(parse_value(p, a, where) for p, a in zip(items, targs))
  raise ConfigError(f"{where}: unsupported field type {_type_name(tp)}.")


def _is_float(s: str) -> bool:
  try:
    float(s)
    return True
  except ValueError:
    return False


def parse_overrides(items: Sequence[str]) -> dict[str, str]:
  """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}`` (values still text)."""
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
      raise ConfigError(f"override {item!r} is not of the form field=value "
                        "(e.g. --set client_lr=0.1).")
    if key in out:
      raise ConfigError(f"field {key!r} is overridden twice ({out[key]!r} and "
                        f"{value!r}); keep one.")
    out[key] = value
  return out


def apply_overrides(cfg: Any, overrides: dict[str, Any] | Sequence[str]
                    ) -> Any:
  """A copy of ``cfg`` with ``overrides`` (field -> text or typed value)."""
  if not isinstance(overrides, dict):
    overrides = parse_overrides(overrides)
  if not overrides:
    return cfg
  types_ = _field_types(type(cfg))
  values = {}
  for key, raw in overrides.items():
    if key not in types_:
      close = [n for n in types_ if key.lower() in n.lower() or
               n.lower() in key.lower()]
      hint = f" Did you mean {close[0]!r}?" if close else ""
      raise ConfigError(f"unknown config field {key!r} for "
                        f"{type(cfg).__name__}; expected one of "
                        f"{', '.join(types_)}.{hint}")
    tp = types_[key]
    where = f"--set {key}"
    if isinstance(raw, str):
      values[key] = parse_value(raw, tp, where)
    elif _matches(raw, tp):
      values[key] = raw
    else:
      raise ConfigError(f"{where}: {raw!r} is not a {_type_name(tp)}.")
  try:
    new = dataclasses.replace(cfg, **values)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{type(cfg).__name__} rejected the overrides "
                      f"{values}: {e}") from e
  check_config(new, "config after overrides")
  return new


def config_to_dict(cfg: Any) -> dict:
  """The config as JSON-ready data (tuples become lists)."""
  return {f.name: _jsonable(getattr(cfg, f.name))
          for f in dataclasses.fields(cfg)}


def _jsonable(v):
  if isinstance(v, tuple):
    return [_jsonable(x) for x in v]
  return v


def config_from_dict(cfg: Any, data: dict) -> Any:
  """Replaces ``cfg``'s fields by values from :func:`config_to_dict`."""
  types_ = _field_types(type(cfg))
  unknown = sorted(set(data) - set(types_))
  if unknown:
    raise ConfigError(f"saved config has fields {unknown} that "
                      f"{type(cfg).__name__} no longer defines.")
  values = {k: _from_json(v, types_[k]) for k, v in data.items()}
  return apply_overrides(cfg, values)


def _from_json(v, tp):
  if isinstance(v, list):
    targs = [a for a in typing.get_args(tp) if a is not Ellipsis]
    for a in (_union_args(tp) or ()):
      if typing.get_origin(a) is tuple:
        targs = [x for x in typing.get_args(a) if x is not Ellipsis]
    inner = targs[0] if len(targs) == 1 else None
    return tuple(_from_json(x, inner) for x in v)
  if tp is float and isinstance(v, int):
    return float(v)
  return v


def describe_config(cfg: Any) -> str:
  """One line per field: ``name: type = value`` (for --help and errors)."""
  types_ = _field_types(type(cfg))
  return "\n".join(f"  {n}: {_type_name(t)} = {getattr(cfg, n)!r}"
                   for n, t in types_.items())


def dumps(obj: Any) -> str:
  return json.dumps(obj, indent=2, sort_keys=False, default=str)
