"""Loads experiment files from experiments/ as modules (for tests)."""

import importlib.util
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def load(name):
  """``experiments/<name>.py`` as a module."""
  spec = importlib.util.spec_from_file_location(
    name, EXPERIMENTS / f"{name}.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
