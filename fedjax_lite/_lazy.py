"""Lazy package namespaces (PEP 562): a submodule is imported at first use.

A package's ``__init__`` lists what it exports, by submodule::

  __getattr__, __dir__, __all__ = _lazy.attach(
    __name__, {"accounting": ("epsilon", ...), "shamir": ()}
  )

``package.epsilon`` then imports ``package.accounting`` on first access
(``from package import epsilon`` too), and every key is reachable as a
submodule (``package.shamir``). An exported name must not be the name of a
submodule (``tests/test_imports.py`` checks it): importing that submodule
would bind the module over the name.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable, Iterable, Mapping


def attach(
  package: str, exports: Mapping[str, Iterable[str]]
) -> tuple[Callable[[str], object], Callable[[], list[str]], list[str]]:
  """``(__getattr__, __dir__, __all__)`` for ``package``'s ``__init__``.

  Args:
    package: the package's ``__name__``.
    exports: submodule (relative name) -> the names it exports.
  """
  owner: dict[str, str | None] = {}
  for submodule, names in exports.items():
    owner[submodule] = None
    for name in names:
      owner[name] = submodule

  def __getattr__(name: str):
    if name not in owner:
      raise AttributeError(f"module {package!r} has no attribute {name!r}")
    submodule = owner[name]
    if submodule is None:
      return importlib.import_module(f"{package}.{name}")
    value = getattr(importlib.import_module(f"{package}.{submodule}"), name)
    setattr(sys.modules[package], name, value)  # later lookups: no call
    return value

  def __dir__() -> list[str]:
    return sorted(set(vars(sys.modules[package])) | set(owner))

  __getattr__.owner = owner  # name -> its submodule (None: a submodule)
  return __getattr__, __dir__, sorted(owner)
