"""The model interface and the fast-gradient dense layer."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_lite as fl
from fedjax_lite.models import layers
import reference as ref


@pytest.mark.parametrize(
  "shape",
  [(7, 5, 3), (6, 100, 50), (2, 4, 9, 3)],
  ids=["small", "large", "3d-input"],
)
def test_dense_matmul_gradient_matches_autodiff(rng, shape):
  x = jnp.asarray(rng.standard_normal(shape[:-1]), jnp.float32)
  w = jnp.asarray(rng.standard_normal(shape[-2:]), jnp.float32)
  g = jnp.asarray(rng.standard_normal(shape[:-2] + shape[-1:]), jnp.float32)
  f_fast = lambda x, w: jnp.sum(layers.dense_matmul(x, w) * g)
  f_ref = lambda x, w: jnp.sum((x @ w) * g)
  for argnum in (0, 1):
    np.testing.assert_allclose(
      jax.grad(f_fast, argnum)(x, w),
      jax.grad(f_ref, argnum)(x, w),
      rtol=1e-5,
      atol=1e-5,
    )


def test_dense_matmul_gradient_under_vmap(rng):
  x = jnp.asarray(rng.standard_normal((4, 6, 5)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((4, 5, 3)), jnp.float32)
  fast = jax.vmap(
    jax.grad(lambda x, w: jnp.sum(jnp.tanh(layers.dense_matmul(x, w))), 1)
  )
  slow = jax.vmap(jax.grad(lambda x, w: jnp.sum(jnp.tanh(x @ w)), 1))
  np.testing.assert_allclose(fast(x, w), slow(x, w), rtol=1e-5, atol=1e-6)


def test_batch_loss_is_masked_mean_with_sum_count_stats(rng):
  model = fl.models.logistic_regression(4, 3)
  w = rng.standard_normal((4, 3))
  b = rng.standard_normal(3)
  params = {
    "Dense_0": {
      "kernel": jnp.asarray(w, jnp.float32),
      "bias": jnp.asarray(b, jnp.float32),
    }
  }
  x = rng.standard_normal((6, 4))
  y = rng.integers(0, 3, 6)
  mask = np.array([1, 1, 0, 1, 0, 1], bool)
  loss, stats = model.batch_loss(
    params,
    {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(y, jnp.int32)},
    jnp.asarray(mask),
  )
  expected = ref.logreg_loss_grad(w, b, x[mask], y[mask])[0]
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  np.testing.assert_allclose(float(stats["loss"][0]), expected * 4, rtol=1e-5)
  assert float(stats["loss"][1]) == 4
  correct = np.argmax(x[mask] @ w + b, 1) == y[mask]
  assert float(stats["accuracy"][0]) == correct.sum()
  # An all-padding batch contributes nothing (and no NaN).
  loss0, _ = model.batch_loss(
    params,
    {"x": jnp.zeros((2, 4)), "y": jnp.zeros(2, jnp.int32)},
    jnp.zeros(2, bool),
  )
  assert float(loss0) == 0.0


def test_mlp_shapes_and_flop_count():
  model = fl.models.mlp(784, 62)
  params = model.init(jax.random.PRNGKey(0))
  assert fl.models.num_params(params) == (
    784 * 200 + 200 + 200 * 200 + 200 + 200 * 62 + 62
  )
  assert fl.models.dense_flops_per_example(params) == 6 * (
    784 * 200 + 200 * 200 + 200 * 62
  )
  out = model.apply(params, {"x": jnp.zeros((3, 784))})
  assert out.shape == (3, 62)
  with pytest.raises(ValueError, match="num_features"):
    fl.models.mlp(0, 3)


def test_from_flax_wraps_any_linen_module():
  import flax.linen as nn

  class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      x = nn.Dense(5)(x)
      x = nn.Dropout(0.5, deterministic=not train)(x)
      return nn.Dense(2)(x)

  model = fl.models.from_flax(
    Tiny(), jnp.zeros((1, 3)), num_classes=2, rng_collections=("dropout",)
  )
  params = model.init(jax.random.PRNGKey(0))
  batch = {"x": jnp.ones((4, 3)), "y": jnp.zeros(4, jnp.int32)}
  eval_out = model.apply(params, batch, None, False)
  a = model.apply(params, batch, jax.random.PRNGKey(1), True)
  b = model.apply(params, batch, jax.random.PRNGKey(2), True)
  assert eval_out.shape == (4, 2)
  assert not np.allclose(a, b)  # dropout active in training


def test_runtime_settings_report():
  # The test process configured 4 CPU devices before JAX initialised.
  assert len(jax.devices("cpu")) == 4
  assert fl.runtime.settings()["applied"]
  late = fl.configure_cpu(num_devices=3)
  assert len(jax.devices("cpu")) == 4 and late.get("num_cpu_devices") != 3


@pytest.mark.parametrize(
  "env, expected",
  [
    ({}, "--xla_cpu_experimental_ynn_fusion_type=-reduce"),
    (
      {"FEDJAX_LITE_LIBRARY_FUSIONS": "0"},
      "--xla_cpu_experimental_ynn_fusion_type= ",
    ),
  ],
)
def test_library_fusions_setting_picks_the_xla_flag(env, expected):
  # A fresh process: the flags only act before JAX initialises its backend.
  code = (
    "import fedjax_lite as fl, jax; s = fl.runtime.settings(); "
    "jax.numpy.ones(2).block_until_ready(); "
    "print(s['library_fusions'], s['xla_flags'] + ' ')"
  )
  clean = {
    k: v
    for k, v in os.environ.items()
    if k not in ("XLA_FLAGS", "FEDJAX_LITE_LIBRARY_FUSIONS")
  }
  out = subprocess.run(
    [sys.executable, "-c", code],
    env={**clean, **env},
    capture_output=True,
    text=True,
    timeout=120,
    check=True,
  )
  fusions, flags = out.stdout.strip().split(" ", 1)
  assert fusions == ("False" if env else "True")
  assert expected in flags + " " and flags.count("ynn_fusion_type") == 1
