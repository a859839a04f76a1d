"""Test configuration: 4 forced CPU devices so every test exercises sharding.

On a machine with a GPU backend the engines of most tests run on the GPU
(the default backend); tests that need several devices ask for the CPU
devices explicitly (``jax.devices("cpu")``), and float32 matmuls use full
precision (not TF32) so float64 references keep their tolerances.
"""

import importlib.util
import os

os.environ.setdefault("FEDJAX_LITE_CPU_TUNING", "1")
# The tests check results, not speed: XLA compiles their many small
# programs (and those of the processes they start, which inherit the
# variable) at LLVM optimization level 0, which cuts the suite's time by
# about a quarter on 2 cores (the whole suite passes at either level: 16:16
# at the default, 11:42 at 0, README). Benchmarks never load this file.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]
  ).strip()

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
