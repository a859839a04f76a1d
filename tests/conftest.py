"""Test configuration: 4 forced CPU devices so every test exercises sharding.

On a machine with a GPU backend the engines of most tests run on the GPU
(the default backend); tests that need several devices ask for the CPU
devices explicitly (``jax.devices("cpu")``), and float32 matmuls use full
precision (not TF32) so float64 references keep their tolerances.
"""

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile

os.environ.setdefault("FEDJAX_LITE_CPU_TUNING", "1")
# The tests check results, not speed, and most of their time is XLA
# compiling their many small programs (round programs of tiny models). They
# compile them at LLVM optimization level 0, with XLA's older elemental
# fusion emitters (cheaper to compile than the MLIR ones) and without two
# loop-optimization passes. They change the generated code, not the
# program: the whole suite passes with and without them (its float64
# references hold to the same tolerances). The processes the tests start
# inherit the variable.
# Measured on 2 cores (README): 16:16 with XLA's defaults, 11:42 at level 0,
# about 10:05 with all three. Benchmarks never load this file.
TEST_XLA_FLAGS = (
  "--xla_backend_optimization_level=0",
  "--xla_disable_hlo_passes=while-loop-invariant-code-motion,"
  "simplify-while-loops",
)
# XLA aborts on a flag it does not know: this one only where it was measured.
_JAXLIB = importlib.metadata.version("jaxlib").split(".")
if tuple(int(v) for v in _JAXLIB[:2]) >= (0, 10):
  TEST_XLA_FLAGS += ("--xla_cpu_use_fusion_emitters=false",)
_flags = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join(
  [_flags] + [f for f in TEST_XLA_FLAGS if f.split("=")[0] not in _flags]
).strip()
# One persistent compilation cache per test run, shared by the xdist workers
# and every process a test starts (they inherit the variables): a program
# that two tests, or a run and its resume, compile identically is compiled
# once. The controller (or the only process, with -n 0) makes the folder
# before the workers start and removes it at the end (pytest_unconfigure).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE_DIR = tempfile.mkdtemp(prefix="fedjax_lite_test_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
else:
  _CACHE_DIR = None  # a worker, or a cache the caller chose: not ours

import fedjax_lite  # noqa: E402  (applies CPU settings before jax initialises)

fedjax_lite.configure_cpu(num_devices=4)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
if any(
  importlib.util.find_spec(p)
  for p in ("jax_cuda12_plugin", "jax_cuda13_plugin")
):
  jax.config.update("jax_default_matmul_precision", "highest")


def pytest_unconfigure(config):
  del config
  if _CACHE_DIR is not None:
    shutil.rmtree(_CACHE_DIR, ignore_errors=True)


@pytest.fixture
def rng():
  return np.random.default_rng(0)


@pytest.fixture(scope="session")
def one_device_mesh():
  return fedjax_lite.engine.default_mesh(jax.devices("cpu")[:1])


@pytest.fixture(scope="session")
def cpu_mesh():
  """The 4 forced CPU devices (whatever the default backend is)."""
  return fedjax_lite.engine.default_mesh(jax.devices("cpu"))
