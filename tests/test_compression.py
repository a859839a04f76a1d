"""Update compressors against float64 numpy references and statistics."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_lite as fl
from fedjax_lite import compression as comp
from fedjax_lite.algorithms.base import ClientOutput, FederatedAlgorithm


# ------------------------------------------------------------------- QSGD
@pytest.mark.parametrize("levels,bucket", [(4, None), (2, 7)])
def test_qsgd_is_unbiased_with_the_published_variance(levels, bucket):
  r = np.random.default_rng(0)
  v = {
    "a": r.standard_normal((4, 5)).astype(np.float32),
    "b": r.standard_normal(6).astype(np.float32),
  }
  q = comp.qsgd(levels, bucket_size=bucket)
  m = 20000
  keys = jax.random.split(jax.random.PRNGKey(1), m)
  out = jax.jit(jax.vmap(lambda k: q.compress(v, None, k)[0]))(keys)
  flat = np.concatenate(
    [np.asarray(out["a"]).reshape(m, -1), np.asarray(out["b"])], axis=1
  ).astype(np.float64)
  x = np.concatenate([v["a"].ravel(), v["b"]]).astype(np.float64)
  d = x.size
  b = d if bucket is None else bucket
  pad = np.pad(x, (0, -d % b)).reshape(-1, b)
  norm = np.repeat(np.linalg.norm(pad, axis=1), b)[:d]
  ratio = np.abs(x) * levels / norm
  p = ratio - np.floor(ratio)
  var = norm**2 * p * (1 - p) / levels**2  # Alistarh et al., Lemma 3.1
  # Every value is on the grid ||v|| * sign * l / s.
  lev = np.abs(flat) * levels / norm
  np.testing.assert_allclose(lev, np.round(lev), atol=1e-3)
  # Unbiased: the mean of m draws is within 5 standard errors of v.
  se = np.sqrt(var / m)
  assert np.all(np.abs(flat.mean(0) - x) <= 5 * se + 1e-6)
  # Its variance is the published one: a draw is a scaled Bernoulli(p), whose
  # sample variance has relative sd sqrt((1 - 4 p q) / (m p q)), q = 1 - p.
  pq = p * (1 - p)
  ok = pq > 1e-3
  rel = flat.var(0)[ok] / var[ok]
  sd = np.sqrt((1 - 4 * pq[ok]) / (m * pq[ok]))
  assert np.all(np.abs(rel - 1) < 5 * sd + 1e-3)


def test_qsgd_zero_update_and_bytes():
  q = comp.qsgd(8, bucket_size=16)
  out, _, nbytes = q.compress({"w": jnp.zeros(40)}, None, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(out["w"], 0.0)
  # 3 buckets x 32-bit norm + 40 x (1 sign + ceil(log2 9) = 4 level bits).
  assert float(nbytes) == math.ceil((3 * 32 + 40 * 5) / 8)


# ------------------------------------------------------ top-k / sign + EF
def topk_reference(updates, k):
  """Top-k with error feedback, float64: returns sent vectors, residuals."""
  e = np.zeros_like(updates[0])
  sent, res = [], []
  for u in updates:
    p = u + e
    idx = np.argsort(-np.abs(p), kind="stable")[:k]
    c = np.zeros_like(p)
    c[idx] = p[idx]
    e = p - c
    sent.append(c)
    res.append(e)
  return sent, res


def signef_reference(updates, sizes):
  """EF-SignSGD per tensor, float64."""
  e = np.zeros_like(updates[0])
  sent, res = [], []
  cuts = np.cumsum(sizes)[:-1]
  for u in updates:
    p = u + e
    c = np.concatenate(
      [
        np.abs(t).sum() / t.size * np.where(t >= 0, 1.0, -1.0)
        for t in np.split(p, cuts)
      ]
    )
    e = p - c
    sent.append(c)
    res.append(e)
  return sent, res


def data_algorithm():
  """A test algorithm whose update is read from the client's data (``u``)
  and whose own client state counts the client's rounds."""

  def client_update(params, count, data, rng):
    del params, rng
    u = data.batches["u"][0, 0]
    return ClientOutput(
      update={"a": u[:6].reshape(2, 3), "b": u[6:]},
      weight=jnp.ones(()),
      state=count + 1,
      metrics={"seen": (jnp.ones(()), jnp.ones(()))},
    )

  return FederatedAlgorithm(
    server_init=lambda p: p,
    client_update=client_update,
    server_update=lambda s, a: s,
    broadcast=lambda s: s,
    client_init=lambda p: jnp.zeros((), jnp.int32),
    get_params=lambda s: s,
    name="data",
  )


PARAMS = {"a": jnp.zeros((2, 3)), "b": jnp.zeros(4)}


def run_rounds(compressor, updates):
  alg = comp.with_compression(data_algorithm(), compressor)
  state = alg.client_init(PARAMS)
  step = jax.jit(alg.client_update)
  outs = []
  for t, u in enumerate(updates):
    data = fl.ClientData(
      batches={"u": jnp.asarray(u, jnp.float32)[None, None]},
      mask=jnp.ones((1, 1), bool),
      num_examples=jnp.int32(1),
      client_id=jnp.int32(0),
    )
    out = step(PARAMS, state, data, jax.random.PRNGKey(t))
    state = out.state
    outs.append(out)
  return outs, state


def flat(tree):
  return np.concatenate(
    [np.asarray(tree["a"]).ravel(), np.asarray(tree["b"]).ravel()]
  ).astype(np.float64)


def test_top_k_keeps_k_entries_and_feeds_back_the_exact_residual():
  r = np.random.default_rng(3)
  updates = [r.standard_normal(10) for _ in range(4)]
  k = 3
  outs, state = run_rounds(comp.top_k(k=k), updates)
  sent_ref, res_ref = topk_reference(updates, k)
  for t, out in enumerate(outs):
    got = flat(out.update)
    assert np.count_nonzero(got) == k
    np.testing.assert_allclose(got, sent_ref[t], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
      flat(out.state.memory), res_ref[t], rtol=1e-6, atol=1e-6
    )
    # Bytes: k values (32 bits) + k indices (ceil(log2 10) = 4 bits).
    assert float(out.metrics["uplink_bytes"][0]) == math.ceil(k * 36 / 8)
  # Nothing is lost: everything sent plus the residual is everything made.
  np.testing.assert_allclose(
    sum(flat(o.update) for o in outs) + flat(state.memory),
    sum(updates),
    atol=1e-5,
  )
  # The wrapped algorithm's own client state is kept alongside.
  assert int(state.inner) == len(updates)
  assert "seen" in outs[0].metrics


def test_top_k_without_error_feedback_and_density():
  r = np.random.default_rng(4)
  updates = [r.standard_normal(10) for _ in range(2)]
  outs, state = run_rounds(comp.top_k(0.2, error_feedback=False), updates)
  for u, out in zip(updates, outs):
    sent, _ = topk_reference([u], 2)
    np.testing.assert_allclose(flat(out.update), sent[0], rtol=1e-6)
  assert state.memory is None


def test_sign_ef_matches_numpy_over_rounds():
  r = np.random.default_rng(5)
  updates = [r.standard_normal(10) for _ in range(4)]
  outs, _ = run_rounds(comp.sign_ef(), updates)
  sent_ref, res_ref = signef_reference(updates, [6, 4])
  for t, out in enumerate(outs):
    np.testing.assert_allclose(
      flat(out.update), sent_ref[t], rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
      flat(out.state.memory), res_ref[t], rtol=1e-5, atol=1e-6
    )
    # 10 sign bits + 2 tensor scales of 32 bits.
    assert float(out.metrics["uplink_bytes"][0]) == math.ceil((10 + 64) / 8)


def test_compressed_fed_avg_in_the_engine_keeps_unsampled_residuals():
  r = np.random.default_rng(0)
  clients = [
    {
      "x": r.standard_normal((n, 4)).astype(np.float32),
      "y": r.integers(0, 3, n).astype(np.int32),
    }
    for n in (5, 3, 6, 4, 7, 2)
  ]
  model = fl.models.logistic_regression(4, 3)
  alg = comp.with_compression(
    fl.fed_avg(model, optax.sgd(0.3)), comp.top_k(k=4)
  )
  engine = fl.Engine(
    alg, fl.RoundConfig(3, fl.LocalWork(batch_size=2, num_epochs=1))
  )
  data = engine.put_data(fl.FederatedDataset.from_clients(clients), buckets=1)
  state = engine.init(model.init(jax.random.PRNGKey(0)), num_clients=6)
  state, metrics = engine.round(state, data)
  memory = np.asarray(state.clients.memory["Dense_0"]["kernel"])
  assert memory.shape == (6, 4, 3)
  # Exactly the 3 sampled clients hold a residual (15 coordinates, 4 sent).
  assert int(np.sum(np.any(memory != 0, axis=(1, 2)))) == 3
  assert float(metrics["uplink_bytes"]) == math.ceil(4 * (32 + 4) / 8)


def test_bad_compression_arguments():
  with pytest.raises(ValueError, match="density"):
    comp.top_k(0.0)
  with pytest.raises(ValueError, match="density"):
    comp.top_k(1.5)
  with pytest.raises(ValueError, match="exactly one of density"):
    comp.top_k()
  with pytest.raises(ValueError, match="k must be"):
    comp.top_k(k=0)
  with pytest.raises(ValueError, match="levels"):
    comp.qsgd(0)
  with pytest.raises(ValueError, match="bucket_size"):
    comp.qsgd(4, bucket_size=0)
  with pytest.raises(TypeError, match="Compressor"):
    comp.with_compression(data_algorithm(), "top_k")
  with pytest.raises(ValueError, match="larger than the update"):
    run_rounds(comp.top_k(k=11), [np.zeros(10)])
  # A residual shaped like the params but an update of another structure.
  alg = comp.with_compression(
    data_algorithm(), comp.sign_ef(), update_template=lambda p: {"only": p["a"]}
  )
  state = alg.client_init(PARAMS)
  data = fl.ClientData(
    batches={"u": jnp.zeros((1, 1, 10))},
    mask=jnp.ones((1, 1), bool),
    num_examples=jnp.int32(1),
    client_id=jnp.int32(0),
  )
  with pytest.raises(ValueError, match="update_template"):
    alg.client_update(PARAMS, state, data, jax.random.PRNGKey(0))
