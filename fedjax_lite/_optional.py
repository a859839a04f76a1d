"""Optional dependencies: the extras of ``pyproject.toml`` and their hint.

The core (engine, algorithms, aggregators, data, models, ``learning``) needs
jax, flax, optax, numpy and msgpack only. A module that needs an extra's
library binds it at top level with :func:`optional_import`::

  dp_accounting = optional_import("dp_accounting", "privacy")

which imports nothing until the first attribute access
(``dp_accounting.GaussianDpEvent``); if the library is missing, that access
raises :class:`MissingExtraError` (an ``ImportError``) whose message is one
line naming the command to run::

  fedjax_lite.privacy needs dp-accounting: pip install "fedjax_lite[privacy]"

Inside a function, ``require("h5py", "data")`` imports at once, with the
same message. So ``import fedjax_lite`` and a FedAvg run import none of the
extras.
"""

from __future__ import annotations

import importlib
import types

# extra -> (the package that needs it, {import name: distribution name}).
# pyproject.toml's [project.optional-dependencies] lists the same
# distributions (tests/test_imports.py checks it).
EXTRAS = {
  "privacy": (
    "fedjax_lite.privacy",
    {
      "dp_accounting": "dp-accounting",
      "cryptography": "cryptography",
      "scipy": "scipy",
    },
  ),
  "vertical": (
    "fedjax_lite.vertical",
    {"phe": "phe", "cryptography": "cryptography", "sklearn": "scikit-learn"},
  ),
  "data": ("fedjax_lite.datasets", {"h5py": "h5py", "sklearn": "scikit-learn"}),
  "hetero": ("fedjax_lite.hetero", {"scipy": "scipy"}),
  "experiment": (
    "fedjax_lite.experiment",
    {"matplotlib": "matplotlib", "tqdm": "tqdm"},
  ),
  # Metric writers (fedjax_lite/experiment/writers.py); MLflow's SQLite
  # store needs sqlalchemy and alembic, which mlflow-skinny leaves out.
  "tracking": (
    "fedjax_lite.experiment",
    {
      "tensorboardX": "tensorboardX",
      "wandb": "wandb",
      "mlflow": "mlflow-skinny",
      "sqlalchemy": "sqlalchemy",
      "alembic": "alembic",
    },
  ),
  # --format orbax of `python -m fedjax_lite export` (flax installs it too).
  "export": (
    "fedjax_lite.experiment.export",
    {"orbax": "orbax-checkpoint"},
  ),
  # fedjax_lite/flower.py: an algorithm as a Flower ClientApp and ServerApp.
  "flower": ("fedjax_lite.flower", {"flwr": "flwr"}),
}


class MissingExtraError(ModuleNotFoundError):
  """An extra's library is not installed; the message is the one line to
  show (``<package> needs <distribution>: pip install "fedjax_lite[...]"``)."""


def install_hint(module: str, extra: str) -> str:
  """``'<package> needs <distribution>: pip install "fedjax_lite[<extra>]"'``."""
  package, dists = EXTRAS[extra]
  top = module.split(".")[0]
  if top not in dists:
    raise ValueError(f"{top!r} is not a dependency of the {extra!r} extra.")
  return f'{package} needs {dists[top]}: pip install "fedjax_lite[{extra}]"'


def require(module: str, extra: str) -> types.ModuleType:
  """``import module`` now; a missing library is :func:`install_hint`'s line."""
  hint = install_hint(module, extra)
  try:
    return importlib.import_module(module)
  except ModuleNotFoundError as e:
    missing = (e.name or "").split(".")[0]
    if missing != module.split(".")[0]:  # the library is there, broken
      hint += f" (it could not import {e.name})"
    raise MissingExtraError(hint, name=module) from None


class _Deferred(types.ModuleType):
  """Stands for ``module`` and imports it at the first attribute access."""

  def __init__(self, module: str, extra: str):
    super().__init__(module)
    install_hint(module, extra)  # a typo fails at import, not at first use
    self.__extra = extra
    self.__module = None

  def __getattr__(self, attr: str):
    if self.__module is None:
      if attr.startswith("__"):  # introspection (hasattr, inspect): no import
        raise AttributeError(attr)
      self.__module = require(self.__name__, self.__extra)
    return getattr(self.__module, attr)

  def __repr__(self) -> str:
    state = "loaded" if self.__module is not None else "not imported yet"
    return f"<module {self.__name__!r} ({state}, extra {self.__extra!r})>"


def optional_import(module: str, extra: str) -> types.ModuleType:
  """``module``, imported at its first use (see the module docstring)."""
  return _Deferred(module, extra)
