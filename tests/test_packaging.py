"""Packaging: the Python versions pip accepts, and the extras' names."""

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_requires_python_311():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  assert project["requires-python"] == ">=3.11"
  extras = project["optional-dependencies"]
  assert "jupyterlab>=4" in extras["notebooks"]
  assert extras["cuda12"] == ["jax[cuda12]>=0.6"]


@pytest.mark.slow
@pytest.mark.skipif(
  shutil.which("python3.10") is None, reason="needs a python3.10 to refuse"
)
def test_python_310_venv_refuses_the_install(tmp_path):
  """pip in a fresh Python 3.10 venv refuses the project with its own
  Python-version message (pip fetches the build backend, setuptools, from
  the package index; no dependency is installed)."""
  venv = tmp_path / "venv310"
  python310 = subprocess.run(
    [shutil.which("python3.10"), "-c", "import sys; print(sys.executable)"],
    capture_output=True,
    text=True,
    check=True,
  ).stdout.strip()  # the interpreter itself, not a version-manager shim
  subprocess.run(
    [python310, "-m", "venv", str(venv)],
    check=True,
    timeout=120,
  )
  out = subprocess.run(
    [
      str(venv / "bin" / "python"),
      "-m",
      "pip",
      "install",
      "--no-deps",
      str(ROOT),
    ],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode != 0
  assert "requires a different Python: 3.10" in out.stderr, out.stderr
  assert "not in '>=3.11'" in out.stderr, out.stderr
  assert sys.version_info >= (3, 11)
