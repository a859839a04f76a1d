"""``--set field=value`` overrides: every field type, and errors that name the
field, what arrived and what the declared type expects."""

import dataclasses
import json
from typing import Literal, Optional

import pytest

from fedjax_lite.__main__ import main
from fedjax_lite.experiment import config as cfglib
from fedjax_lite.experiment.config import (
  ConfigError,
  apply_overrides,
  check_config,
  config_from_dict,
  config_to_dict,
  describe_config,
  parse_overrides,
  parse_value,
)

from test_experiment import TINY_EXPERIMENT  # pylint: disable=g-bad-import-order


@dataclasses.dataclass(frozen=True)
class Config:
  num_rounds: int = 4
  client_lr: float = 0.1
  flag: bool = False
  name: str = "run"
  tag: str | None = None
  clip: Optional[float] = 1.0  # noqa: UP045 (both spellings)
  hidden: tuple[int, ...] = ()
  lrs: tuple[float, float] = (0.1, 0.2)
  sizes: tuple[int, ...] | None = None
  mode: Literal["fast", "slow"] = "fast"


FIELDS = (
  "num_rounds, client_lr, flag, name, tag, clip, hidden, lrs, sizes, mode"
)


def _set(*items, cfg=Config()):
  return apply_overrides(cfg, list(items))


# ------------------------------------------------------------- every type
@pytest.mark.parametrize(
  "item, field, value",
  [
    ("num_rounds=7", "num_rounds", 7),
    ("num_rounds= 12 ", "num_rounds", 12),
    ("num_rounds=-3", "num_rounds", -3),
    ("num_rounds=1_000", "num_rounds", 1000),
    ("num_rounds=0x10", "num_rounds", 16),
    ("client_lr=0.03", "client_lr", 0.03),
    ("client_lr=3", "client_lr", 3.0),
    ("client_lr=-1e-3", "client_lr", -1e-3),
    ("name=a b=c", "name", "a b=c"),
    ("name=-x", "name", "-x"),
    ("name=", "name", ""),
    ("tag=abc", "tag", "abc"),
    ("tag=none", "tag", None),
    ("tag=None", "tag", None),
    ("tag=null", "tag", None),
    ("clip=None", "clip", None),
    ("clip=2.5", "clip", 2.5),
    ("hidden=8,16", "hidden", (8, 16)),
    ("hidden=(8, 16, 32)", "hidden", (8, 16, 32)),
    ("hidden=[4]", "hidden", (4,)),
    ("hidden=", "hidden", ()),
    ("hidden=()", "hidden", ()),
    ("lrs=0.5,-1e-2", "lrs", (0.5, -0.01)),
    ("sizes=1,2", "sizes", (1, 2)),
    ("sizes=none", "sizes", None),
    ("mode=slow", "mode", "slow"),
  ],
)
def test_each_field_type_parses(item, field, value):
  got = getattr(_set(item), field)
  assert got == value and type(got) is type(value), (got, value)
  if isinstance(value, tuple):
    assert all(type(g) is type(v) for g, v in zip(got, value))


@pytest.mark.parametrize(
  "text, value",
  [
    ("true", True),
    ("True", True),
    ("yes", True),
    ("YES", True),
    ("1", True),
    ("on", True),
    ("false", False),
    ("no", False),
    ("0", False),
    ("off", False),
    ("False", False),
  ],
)
def test_bool_spellings(text, value):
  assert _set(f"flag={text}").flag is value
  assert _set(f"flag={text}", cfg=Config(flag=not value)).flag is value


def test_overrides_leave_other_fields_and_the_original_alone():
  base = Config()
  new = apply_overrides(base, {"num_rounds": "9", "hidden": "1,2"})
  assert new == dataclasses.replace(base, num_rounds=9, hidden=(1, 2))
  assert base == Config()
  assert apply_overrides(base, []) is base
  # Typed values (from Python or a saved config.json) pass through unchanged.
  assert apply_overrides(
    base, {"num_rounds": 5, "tag": None, "lrs": (1, 2.5)}
  ).lrs == (1, 2.5)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(
  "item, message",
  [
    ("num_rounds=abc", "--set num_rounds: expected an int, got 'abc'."),
    (
      "num_rounds=1.5",
      (
        "--set num_rounds: expected an int, got '1.5' (an int "
        "has no decimal point or exponent)."
      ),
    ),
    (
      "num_rounds=1e3",
      (
        "--set num_rounds: expected an int, got '1e3' (an int "
        "has no decimal point or exponent)."
      ),
    ),
    ("num_rounds=", "--set num_rounds: expected an int, got ''."),
    ("num_rounds=none", "--set num_rounds: expected an int, got 'none'."),
    ("client_lr=fast", "--set client_lr: expected a float, got 'fast'."),
    (
      "flag=maybe",
      (
        "--set flag: expected a bool (true/false, yes/no, on/off, "
        "1/0), got 'maybe'."
      ),
    ),
    (
      "flag=2",
      (
        "--set flag: expected a bool (true/false, yes/no, on/off, "
        "1/0), got '2'."
      ),
    ),
    ("clip=x", "--set clip: expected a float or none, got 'x'."),
    ("hidden=a,b", "--set hidden: expected an int, got 'a'."),
    (
      "hidden=8,1.5",
      (
        "--set hidden: expected an int, got '1.5' (an int has "
        "no decimal point or exponent)."
      ),
    ),
    (
      "lrs=0.1",
      (
        "--set lrs: expected 2 comma-separated values "
        "(tuple[float, float]), got '0.1'."
      ),
    ),
    (
      "lrs=1,2,3",
      (
        "--set lrs: expected 2 comma-separated values "
        "(tuple[float, float]), got '1,2,3'."
      ),
    ),
    ("lrs=1,x", "--set lrs: expected a float, got 'x'."),
    (
      "sizes=a",
      (
        "--set sizes: expected comma-separated values "
        "(tuple[int, ...]) or none, got 'a'."
      ),
    ),
    ("mode=medium", "--set mode: expected one of fast, slow, got 'medium'."),
  ],
)
def test_bad_value_names_field_input_and_expected_type(item, message):
  with pytest.raises(ConfigError) as e:
    _set(item)
  assert str(e.value) == message


@pytest.mark.parametrize(
  "key, hint",
  [
    ("num_round", " Did you mean 'num_rounds'?"),  # a prefix
    ("clinet_lr", " Did you mean 'client_lr'?"),  # a typo
    ("lr", " Did you mean 'lrs'?"),  # the closest
    ("client", " Did you mean 'client_lr'?"),  # a part
    ("seed", ""),  # nothing close
  ],
)
def test_unknown_field_lists_the_fields_and_suggests_one(key, hint):
  with pytest.raises(ConfigError) as e:
    _set(f"{key}=3")
  assert str(e.value) == (
    f"unknown config field {key!r} for Config; expected one of {FIELDS}.{hint}"
  )


def test_every_bad_override_is_reported_at_once():
  with pytest.raises(ConfigError) as e:
    _set("num_rounds=abc", "client_lr=0.5", "num_round=3", "flag=maybe")
  assert str(e.value) == "\n  ".join(
    [
      "3 bad overrides:",
      "--set num_rounds: expected an int, got 'abc'.",
      (
        f"unknown config field 'num_round' for Config; expected one of "
        f"{FIELDS}. Did you mean 'num_rounds'?"
      ),
      (
        "--set flag: expected a bool (true/false, yes/no, on/off, 1/0), got "
        "'maybe'."
      ),
    ]
  )


@pytest.mark.parametrize(
  "value, message",
  [
    (True, "field 'num_rounds': expected an int, got True (bool)."),
    (2.0, "field 'num_rounds': expected an int, got 2.0 (float)."),
    (None, "field 'num_rounds': expected an int, got None (NoneType)."),
  ],
)
def test_typed_value_of_the_wrong_type(value, message):
  with pytest.raises(ConfigError) as e:
    apply_overrides(Config(), {"num_rounds": value})
  assert str(e.value) == message


def test_typed_tuple_and_literal_values_are_checked():
  with pytest.raises(
    ConfigError,
    match=r"field 'lrs': expected 2 comma-"
    r"separated values \(tuple\[float, float\]\), got "
    r"\(1.0,\) \(tuple\)\.",
  ):
    apply_overrides(Config(), {"lrs": (1.0,)})
  with pytest.raises(
    ConfigError,
    match="field 'mode': expected one of fast, slow, got 1 \\(int\\)",
  ):
    apply_overrides(Config(), {"mode": 1})
  with pytest.raises(ConfigError, match="field 'hidden'"):
    apply_overrides(Config(), {"hidden": [1, 2]})  # a list is not a tuple


@pytest.mark.parametrize(
  "items, message",
  [
    (
      ["client_lr"],
      (
        "override 'client_lr' is not of the form field=value "
        "(e.g. --set client_lr=0.1)."
      ),
    ),
    (["=3"], "override '=3' is not of the form field=value"),
    (["a=1", "a=2"], "field 'a' is overridden twice ('1' and '2'); keep one."),
  ],
)
def test_malformed_override_items(items, message):
  with pytest.raises(ConfigError) as e:
    parse_overrides(items)
  assert str(e.value).startswith(message)


def test_parse_overrides_keeps_text_after_the_first_equals_sign():
  assert parse_overrides(["a=1", " b =x=y", "c="]) == {
    "a": "1",
    "b": "x=y",
    "c": "",
  }


def test_parse_value_names_where():
  assert parse_value("8, 16", tuple[int, ...]) == (8, 16)
  with pytest.raises(
    ConfigError,
    match=r"^--grid lr: expected a float, got "
    r"'x'\.$",
  ):
    parse_value("x", float, "--grid lr")


# ----------------------------------------------- config.json and the checks
def test_config_dict_round_trip_through_json():
  cfg = _set(
    "hidden=8,16",
    "tag=none",
    "clip=none",
    "sizes=3",
    "flag=yes",
    "mode=slow",
    "lrs=1,2",
  )
  data = json.loads(json.dumps(config_to_dict(cfg)))
  assert data["hidden"] == [8, 16] and data["tag"] is None
  back = config_from_dict(Config(), data)
  assert back == cfg and back.hidden == (8, 16) and back.sizes == (3,)
  with pytest.raises(
    ConfigError,
    match=r"saved config has fields \['old'\] "
    "that Config no longer defines",
  ):
    config_from_dict(Config(), {**data, "old": 1})
  with pytest.raises(
    ConfigError, match="field 'num_rounds': expected an int, got 1.5"
  ):
    config_from_dict(Config(), {**data, "num_rounds": 1.5})


def test_check_config_rejects_unsupported_types_and_bad_values():
  @dataclasses.dataclass(frozen=True)
  class WithList:
    sizes: list[int] = dataclasses.field(default_factory=list)

  @dataclasses.dataclass(frozen=True)
  class Nested:
    inner: Config = Config()

  @dataclasses.dataclass
  class Mutable:
    n: int = 1

  with pytest.raises(
    ConfigError,
    match=r"WithList.sizes has type list\[int\]"
    "; config fields must be int, float, str, bool",
  ):
    check_config(WithList())
  with pytest.raises(ConfigError, match="Nested.inner has type Config"):
    check_config(Nested())
  with pytest.raises(ConfigError, match="not frozen"):
    check_config(Mutable())
  with pytest.raises(
    ConfigError,
    match="returned dict; expected an instance of a frozen dataclass",
  ):
    check_config({"n": 1})
  with pytest.raises(
    ConfigError,
    match=r"field 'num_rounds' holds True "
    r"\(bool\); its declared type is int",
  ):
    check_config(Config(num_rounds=True))
  check_config(Config(client_lr=1))  # an int is a fine float
  with pytest.raises(ConfigError, match="'hidden' holds"):
    check_config(Config(hidden=(1, "2")))


def test_describe_config_lists_name_type_value():
  lines = describe_config(Config()).splitlines()
  assert lines[0] == "  num_rounds: int = 4"
  assert "  tag: str | None = None" in lines
  assert "  lrs: tuple[float, float] = (0.1, 0.2)" in lines
  assert "  mode: Literal['fast', 'slow'] = 'fast'" in lines


def test_type_words():
  words = cfglib._expected  # pylint: disable=protected-access
  assert words(Optional[tuple[int, ...]]) == (  # noqa: UP045
    "comma-separated values (tuple[int, ...]) or none"
  )
  assert words(tuple[bool, str]) == (
    "2 comma-separated values (tuple[bool, str])"
  )
  assert words(Literal[1, 2] | None) == "one of 1, 2 or none"


# ------------------------------------------------------------ command line
def test_cli_reports_every_bad_set_before_building(tmp_path, capsys):
  path = tmp_path / "tiny.py"
  path.write_text(TINY_EXPERIMENT)
  argv = [
    "run",
    str(path),
    "--out",
    str(tmp_path / "runs"),
    "--set",
    "num_rounds=abc",
    "client_lr=0.5",
    "flgg=yes",
    "hidden=1,x",
  ]
  assert main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: 3 bad overrides:\n"), err
  for line in [
    "--set num_rounds: expected an int, got 'abc'.",
    ("unknown config field 'flgg' for Config; expected one of num_rounds,"),
    "Did you mean 'flag'?",
    "--set hidden: expected an int, got 'x'.",
  ]:
    assert line in err, (line, err)
  assert not (tmp_path / "runs").exists()  # nothing was built or written


def test_preset_is_the_config_or_its_named_variant():
  base = Config()
  assert cfglib.preset(base, "", smoke=dict(num_rounds=1)) is base
  smoke = cfglib.preset(base, "smoke", smoke=dict(num_rounds=1, flag=True))
  assert smoke == dataclasses.replace(base, num_rounds=1, flag=True)
  with pytest.raises(ValueError, match=r"'fast'; expected one of '', 'smoke'"):
    cfglib.preset(base, "fast", smoke=dict(num_rounds=1))
