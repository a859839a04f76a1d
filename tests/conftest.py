"""Test configuration: 4 forced CPU devices so every test exercises sharding."""

import os

os.environ.setdefault("FEDJAX_LITE_CPU_TUNING", "1")

import fedjax_lite  # noqa: E402  (applies CPU settings before jax initialises)

fedjax_lite.configure_cpu(num_devices=4)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def rng():
  return np.random.default_rng(0)


@pytest.fixture(scope="session")
def one_device_mesh():
  return fedjax_lite.engine.default_mesh(jax.devices()[:1])
