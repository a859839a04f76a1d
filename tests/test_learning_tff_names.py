"""TFF 0.87's names in fl.learning: the image-classification tutorial's code
shape, the aliases against the existing builders, and TFF's aggregator
defaults against float64 numpy references."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_lite as fl
from fedjax_lite import aggregators

NUM_FEATURES, NUM_CLASSES = 16, 10


class Softmax(nn.Module):
  """The tutorial's model: one Dense layer to 10 classes."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(NUM_CLASSES)(x)


def model_fn():
  return fl.models.from_flax(
    Softmax(),
    sample_input=jnp.zeros((1, NUM_FEATURES)),
    num_classes=NUM_CLASSES,
  )


def make_clients(sizes, seed=0):
  r = np.random.default_rng(seed)
  return [
    {
      "x": r.random((n, NUM_FEATURES)).astype(np.float32),
      "y": r.integers(0, NUM_CLASSES, n).astype(np.int32),
    }
    for n in sizes
  ]


def assert_same_weights(a, b):
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b
  )


def test_tff_tutorial_shape_gives_the_existing_builders_weights():
  federated_train_data = make_clients((20, 35, 12))
  # As the tutorial, with tff.learning -> fl.learning and Keras -> optax.
  training_process = fl.learning.algorithms.build_weighted_fed_avg(
    model_fn,
    client_optimizer_fn=lambda: optax.sgd(learning_rate=0.02),
    server_optimizer_fn=lambda: optax.sgd(learning_rate=1.0),
    batch_size=20,
    local_epochs=5,
  )
  train_state = training_process.initialize()
  result = training_process.next(train_state, federated_train_data)
  train_state = result.state
  train_metrics = result.metrics
  assert train_metrics["num_clients"] == 3
  for _ in range(2, 4):
    result = training_process.next(train_state, federated_train_data)
    train_state = result.state
  assert isinstance(result, fl.learning.LearningProcessOutput)

  existing = fl.learning.build_federated_averaging_process(
    model_fn(),
    client_optimizer_fn=lambda: optax.sgd(0.02),
    server_optimizer_fn=lambda: optax.sgd(1.0),
    batch_size=20,
    local_epochs=5,
  )
  state = existing.initialize(seed=0)
  for _ in range(3):
    state, metrics = existing.next(state, federated_train_data)
  assert metrics == pytest.approx(result.metrics, rel=1e-6)
  model_weights = training_process.get_model_weights(train_state)
  assert_same_weights(model_weights, existing.get_model_weights(state))

  evaluation_process = fl.learning.algorithms.build_fed_eval(model_fn)
  evaluation_state = evaluation_process.initialize()
  evaluation_state = evaluation_process.set_model_weights(
    evaluation_state, model_weights
  )
  evaluation_output = evaluation_process.next(
    evaluation_state, federated_train_data
  )
  expected = fl.evaluate(
    model_fn(),
    model_weights,
    fl.FederatedDataset.from_clients(federated_train_data),
  ).mean
  for name, value in expected.items():
    assert evaluation_output.metrics[name] == pytest.approx(value, rel=1e-6)
  assert evaluation_output.metrics["num_examples"] == 20 + 35 + 12


def test_unweighted_fed_avg_is_the_builder_with_an_unweighted_mean():
  clients = make_clients((3, 30))
  kw = dict(client_optimizer_fn=optax.sgd(0.5), local_epochs=2)
  tff_named = fl.learning.algorithms.build_unweighted_fed_avg(model_fn, **kw)
  existing = fl.learning.build_federated_averaging_process(
    model_fn(),
    lambda: optax.sgd(0.5),
    local_epochs=2,
    model_aggregator=aggregators.unweighted_mean(),
  )
  weighted = fl.learning.algorithms.build_weighted_fed_avg(model_fn, **kw)
  a = tff_named.next(tff_named.initialize(), clients).state
  b = existing.next(existing.initialize(), clients).state
  c = weighted.next(weighted.initialize(), clients).state
  assert_same_weights(
    tff_named.get_model_weights(a), existing.get_model_weights(b)
  )
  gap = optax.tree.norm(
    optax.tree.sub(
      tff_named.get_model_weights(a), weighted.get_model_weights(c)
    )
  )
  assert float(gap) > 1e-3  # clients of 3 and 30 examples weigh differently


def test_weighted_fed_prox_is_the_papers_fed_prox():
  clients = make_clients((8, 5))
  process = fl.learning.algorithms.build_weighted_fed_prox(
    model_fn,
    proximal_strength=0.5,
    client_optimizer_fn=lambda: optax.sgd(0.3),
    local_epochs=3,
    batch_size=4,
  )
  existing = fl.learning.build_fed_prox_process(
    model_fn(),
    lambda: optax.sgd(0.3),
    mu=0.5,
    local_epochs=3,
    batch_size=4,
  )
  state, _ = process.next(process.initialize(seed=3), clients)
  old, _ = existing.next(existing.initialize(seed=3), clients)
  assert_same_weights(
    process.get_model_weights(state), existing.get_model_weights(old)
  )
  with pytest.raises(ValueError, match="proximal_strength must be .* got -0.5"):
    fl.learning.algorithms.build_weighted_fed_prox(
      model_fn, -0.5, lambda: optax.sgd(0.1)
    )


def test_builders_name_bad_arguments():
  with pytest.raises(TypeError, match="model_fn must be a no-argument"):
    fl.learning.algorithms.build_weighted_fed_avg(3, optax.sgd(0.1))
  with pytest.raises(
    TypeError, match=r"model_fn\(\) must return a fedjax_lite"
  ):
    fl.learning.algorithms.build_weighted_fed_avg(lambda: "m", optax.sgd(0.1))
  with pytest.raises(TypeError, match="client_optimizer_fn must be a no-arg"):
    fl.learning.algorithms.build_weighted_fed_avg(model_fn, 0.1)
  with pytest.raises(TypeError, match="model_aggregator"):
    fl.learning.algorithms.build_unweighted_fed_avg(
      model_fn, optax.sgd(0.1), model_aggregator="mean"
    )
  with pytest.raises(ValueError, match="batch_size must be a positive int"):
    fl.learning.algorithms.build_fed_eval(model_fn, batch_size=0)
  with pytest.raises(TypeError, match="zeroing must be True or False"):
    fl.learning.robust_aggregator(zeroing="yes")
  with pytest.raises(TypeError, match="unexpected keyword.*model_distributor"):
    fl.learning.algorithms.build_weighted_fed_avg(
      model_fn, optax.sgd(0.1), model_distributor=None
    )
  with pytest.raises(ValueError, match=r"weighted=True\) is not available"):
    fl.learning.secure_aggregator(weighted=True)


# ------------------------------------------------ aggregators, by hand
def run_aggregator(agg, updates, weights, rounds=1):
  """Drives ``agg`` over one block of updates ``[B, d]`` for some rounds;
  returns the list of (mean, metrics)."""
  spec = jax.ShapeDtypeStruct(updates.shape[1:], jnp.float32)
  state = agg.init_state(spec)
  out = []
  n = len(weights)
  for t in range(rounds):
    acc = agg.init(state, spec, n)
    acc = agg.add(
      state,
      acc,
      jnp.asarray(updates, jnp.float32),
      jnp.asarray(weights, jnp.float32),
      jnp.ones(n, bool),
      jnp.arange(n, dtype=jnp.int32),
    )
    acc = agg.merge(jax.tree.map(lambda a: a[None], acc))
    res, state = agg.finalize(state, acc, jax.random.PRNGKey(t))
    out.append((np.asarray(res.mean), jax.device_get(res.metrics)))
  return out


def robust_reference(updates, weights, rounds):
  """TFF's robust_aggregator in float64: zero if max|u| > 2 X + 1 (X from
  10 towards the 0.98 quantile, lr ln 10), clip to C (from 1 towards the
  0.8 quantile, lr 0.2), weighted mean (zeroed clients keep their weight)."""
  u = np.asarray(updates, np.float64)
  w = np.asarray(weights, np.float64)
  x, c, out = 10.0, 1.0, []
  for _ in range(rounds):
    linf = np.abs(u).max(1)
    kept = u * (linf <= 2 * x + 1)[:, None]
    norms = np.linalg.norm(kept, axis=1)
    clipped = kept * np.minimum(1.0, c / np.maximum(norms, 1e-30))[:, None]
    out.append((w @ clipped / w.sum(), 2 * x + 1, c))
    x *= math.exp(-math.log(10.0) * (np.mean(linf <= x) - 0.98))
    c *= math.exp(-0.2 * (np.mean(norms <= c) - 0.8))
  return out


def test_robust_aggregator_is_tffs_zeroing_and_adaptive_clipping():
  r = np.random.default_rng(1)
  updates = (
    r.standard_normal((6, 5)) * np.array([0.1, 0.3, 1, 2, 5, 1])[:, None]
  )
  updates[5, 2] = 1e4  # corrupted: zeroed
  weights = np.array([3.0, 1, 4, 1, 5, 9])
  got = run_aggregator(fl.learning.robust_aggregator(), updates, weights, 3)
  want = robust_reference(updates, weights, 3)
  for (mean, metrics), (ref, zero_norm, clip) in zip(got, want):
    np.testing.assert_allclose(mean, ref, rtol=1e-5, atol=1e-7)
    assert float(metrics["zeroing_norm"]) == pytest.approx(zero_norm, rel=1e-5)
    assert float(metrics["clip_norm"]) == pytest.approx(clip, rel=1e-5)
  assert float(got[0][1]["zeroing_fraction"]) == pytest.approx(1 / 6)


def test_dp_aggregator_takes_tffs_adaptive_defaults():
  r = np.random.default_rng(2)
  updates = r.standard_normal((4, 3))
  # noise_multiplier 0: the DP rule without noise, checkable exactly.
  (mean, metrics), _ = run_aggregator(
    fl.learning.dp_aggregator(0.0, 4), updates, np.ones(4), 2
  )
  assert float(metrics["dp_clip_norm"]) == pytest.approx(0.1)  # TFF's C_0
  norms = np.linalg.norm(updates, axis=1)
  want = (updates * np.minimum(1, 0.1 / norms)[:, None]).sum(0) / 4
  np.testing.assert_allclose(mean, want, rtol=1e-5, atol=1e-7)
  assert "zeroing_norm" in metrics  # zeroing=True, as TFF
  # An explicit clip keeps the old fixed-clip aggregator, without zeroing.
  old = fl.learning.dp_aggregator(0.0, 4, clip=1.0)
  assert old.name == fl.privacy.dp_aggregator(0.0, 4, clip=1.0).name
  (_, old_metrics), (_, again) = run_aggregator(old, updates, np.ones(4), 2)
  assert float(again["dp_clip_norm"]) == 1.0 and "zeroing_norm" not in again
  with pytest.raises(TypeError, match="zeroing must be True or False"):
    fl.learning.dp_aggregator(1.0, 100, zeroing=1)


def test_secure_aggregator_adapts_its_bound():
  pytest.importorskip("cryptography")
  r = np.random.default_rng(3)
  updates = 0.2 * r.standard_normal((5, 4))
  got = run_aggregator(fl.learning.secure_aggregator(), updates, np.ones(5), 2)
  norms = np.linalg.norm(updates, axis=1)
  assert norms.max() < 0.9
  bound, clip = 100.0, 1.0  # 2 X_0 with X_0 = 50; TFF's clipping C_0 = 1
  for mean, metrics in got:
    assert float(metrics["secure_bound"]) == pytest.approx(bound, rel=1e-5)
    want = (updates * np.minimum(1, clip / norms)[:, None]).mean(0)
    # Fixed point: each coordinate within bound / (2 L), L = 2^16 - 1.
    np.testing.assert_allclose(mean, want, atol=bound / 65535)
    # The bound follows 2 X_t, X_t the 0.95-quantile estimate of the norms
    # reaching it (all below the clip norm here, so clipping keeps them).
    x = bound / 2
    bound = 2 * x * math.exp(-1.0 * (np.mean(norms <= x) - 0.95))
    clip *= math.exp(-0.2 * (np.mean(norms <= clip) - 0.8))
  with pytest.raises(ValueError, match="clip_norm must be a positive"):
    fl.learning.secure_aggregator(-1.0)
