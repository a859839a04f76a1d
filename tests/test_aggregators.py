"""Aggregators against float64 numpy references of their published rules.

Each aggregator is driven through the engine's protocol by hand (two
"devices", blocks of three, padding slots holding huge garbage values that
must never count, slots left empty when fewer clients came), eager and
jitted, then inside real Engine rounds (4 CPU devices, one or several size
buckets, pooled runs).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_lite as fl
from fedjax_lite import aggregators as agg
import reference as ref

SHAPES = {"a": (3, 2), "b": (4,)}
GARBAGE = 1e6


# ---------------------------------------------------------- numpy references
def flat(u):
  """{leaf: [m, ...]} -> [m, d] float64 (leaves in sorted key order)."""
  return np.concatenate(
    [
      np.asarray(u[k], np.float64).reshape(np.shape(u[k])[0], -1)
      for k in sorted(u)
    ],
    axis=1,
  )


def unflat(v):
  out, i = {}, 0
  for k in sorted(SHAPES):
    n = int(np.prod(SHAPES[k]))
    out[k] = v[i : i + n].reshape(SHAPES[k])
    i += n
  return out


def ref_weighted_mean(x, w):
  return (w[:, None] * x).sum(0) / w.sum()


def ref_unweighted_mean(x, w):
  return x.mean(0)


def ref_median(x, w):
  return np.median(x, axis=0)


def ref_trimmed_mean(beta):
  def f(x, w):
    n = x.shape[0]
    k = int(np.floor(beta * n))
    s = np.sort(x, axis=0)
    return s[k : n - k].mean(0)

  return f


def ref_krum(f, multi=1):
  def g(x, w):
    n = x.shape[0]
    k = int(np.clip(n - f - 2, 1, max(n - 1, 1)))
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    scores = []
    for i in range(n):
      others = np.sort(np.delete(d[i], i))
      scores.append(others[:k].sum())
    order = np.argsort(np.asarray(scores), kind="stable")
    return x[order[: min(multi, n)]].mean(0)

  return g


def ref_geometric_median(eps, iters, nu):
  def g(x, w):
    alpha = w / w.sum()
    obj = lambda z: (alpha * np.linalg.norm(x - z, axis=1)).sum()
    z = (alpha[:, None] * x).sum(0)
    prev = obj(z)
    for _ in range(iters):
      beta = alpha / np.maximum(nu, np.linalg.norm(x - z, axis=1))
      z = (beta[:, None] * x).sum(0) / beta.sum()
      cur = obj(z)
      if abs(prev - cur) <= eps * cur:
        break
      prev = cur
    return z

  return g


def ref_centered_clipping(tau, iters, center):
  def g(x, w):
    v = np.asarray(center, np.float64)
    for _ in range(iters):
      diff = x - v
      norm = np.linalg.norm(diff, axis=1)
      scale = np.minimum(1.0, tau / np.maximum(norm, 1e-30))
      v = v + (scale[:, None] * diff).mean(0)
    return v

  return g


def ref_clipped(inner_ref, c):
  def g(x, w):
    norm = np.linalg.norm(x, axis=1)
    return inner_ref(x * np.minimum(1.0, c / norm)[:, None], w)

  return g


# ------------------------------------------------------------------ driver
def make_round(rng, n, num_slots, ties=False):
  """n real clients in random slots of num_slots, plus garbage padding."""
  x = rng.standard_normal((n, sum(int(np.prod(s)) for s in SHAPES.values())))
  if ties:  # repeated updates and repeated coordinates
    x[1::3] = x[0]
    x[:, 2] = np.round(x[:, 2])
  w = rng.integers(1, 20, n).astype(np.float64)
  slots = rng.permutation(num_slots)[:n]
  return x, w, slots


def drive(
  aggregator,
  x,
  w,
  slots,
  num_slots,
  *,
  state=None,
  nd=2,
  b=3,
  jit=False,
  seed=0,
):
  """Runs init/add/merge/finalize as the engine does; returns (out, state)."""
  spec = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in SHAPES.items()}
  if state is None:
    state = aggregator.init_state(spec)
  n = x.shape[0]
  # Interleave padding entries between real clients; pad to nd*b blocks.
  r = np.random.default_rng(seed)
  entries = [(i, True) for i in range(n)] + [(-1, False)] * 4
  r.shuffle(entries)
  total = int(np.ceil(len(entries) / (nd * b))) * nd * b
  entries += [(-1, False)] * (total - len(entries))

  def block(lo):
    es = entries[lo : lo + nd * b]
    xb = np.stack(
      [x[i] if ok else np.full(x.shape[1], GARBAGE) for i, ok in es]
    ).astype(np.float32)
    ub = {
      k: v.reshape((nd, b) + SHAPES[k]) for k, v in unflat_batch(xb).items()
    }
    wb = np.array([w[i] if ok else 7.0 for i, ok in es], np.float32).reshape(
      nd, b
    )
    vb = np.array([ok for _, ok in es]).reshape(nd, b)
    sb = np.array([slots[i] if ok else 0 for i, ok in es], np.int32).reshape(
      nd, b
    )
    return ub, wb, vb, sb

  def run(state):
    acc = aggregator.init(state, spec, num_slots)
    accs = jax.tree.map(lambda a: jnp.stack([a] * nd), acc)
    add = jax.vmap(lambda a, u, wt, v, s: aggregator.add(state, a, u, wt, v, s))
    for lo in range(0, total, nd * b):
      accs = add(accs, *block(lo))
    return aggregator.finalize(
      state, aggregator.merge(accs), jax.random.PRNGKey(1)
    )

  if jit:
    return jax.jit(run)(state)
  return run(state)


def unflat_batch(xb):
  out, i = {}, 0
  for k in sorted(SHAPES):
    d = int(np.prod(SHAPES[k]))
    out[k] = xb[:, i : i + d].reshape((xb.shape[0],) + SHAPES[k])
    i += d
  return out


def assert_matches(out, expected, rtol=2e-5, atol=2e-5):
  got = flat({k: np.asarray(v)[None] for k, v in out.mean.items()})[0]
  np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol)


CASES = {
  "weighted_mean": (agg.weighted_mean, ref_weighted_mean),
  "unweighted_mean": (agg.unweighted_mean, ref_unweighted_mean),
  "coordinate_median": (agg.coordinate_median, ref_median),
  "trimmed_mean_0.1": (lambda: agg.trimmed_mean(0.1), ref_trimmed_mean(0.1)),
  "trimmed_mean_0.3": (lambda: agg.trimmed_mean(0.3), ref_trimmed_mean(0.3)),
  "krum": (lambda: agg.krum(1), ref_krum(1)),
  "multi_krum": (lambda: agg.krum(1, multi=3), ref_krum(1, 3)),
  "geometric_median": (
    lambda: agg.geometric_median(1e-6, 20, 1e-6),
    ref_geometric_median(1e-6, 20, 1e-6),
  ),
  "geometric_median_3": (
    lambda: agg.geometric_median(0.0, 3, 1e-3),
    ref_geometric_median(0.0, 3, 1e-3),
  ),
  "clipped_weighted": (
    lambda: agg.clipped(agg.weighted_mean(), 2.0),
    ref_clipped(ref_weighted_mean, 2.0),
  ),
  "clipped_trimmed": (
    lambda: agg.clipped(agg.trimmed_mean(0.1), 2.5),
    ref_clipped(ref_trimmed_mean(0.1), 2.5),
  ),
  "clipped_median": (
    lambda: agg.clipped(agg.coordinate_median(), 2.0),
    ref_clipped(ref_median, 2.0),
  ),
}


@pytest.mark.parametrize(
  "n,num_slots,ties,jit",
  [
    (7, 7, False, True),
    (8, 9, False, True),
    (10, 12, True, True),
    pytest.param(10, 12, True, False, marks=pytest.mark.slow),
  ],
  ids=["full-jit", "empty_slot-jit", "ties-jit", "ties-eager"],
)
@pytest.mark.parametrize("name", sorted(CASES))
def test_aggregator_matches_numpy(name, n, num_slots, ties, jit):
  make, reference = CASES[name]
  rng = np.random.default_rng(n * 100 + num_slots)
  x, w, slots = make_round(rng, n, num_slots, ties)
  out, _ = drive(make(), x, w, slots, num_slots, jit=jit)
  assert_matches(out, reference(x, w))
  np.testing.assert_allclose(float(out.total_weight), w.sum(), rtol=1e-6)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_centered_clipping_carries_center(jit):
  rng = np.random.default_rng(3)
  a = agg.centered_clipping(1.5, iters=3)
  state = None
  center = np.zeros(sum(int(np.prod(s)) for s in SHAPES.values()))
  for t in range(3):
    x, w, slots = make_round(rng, 9, 10)
    x = x + 0.5 * t
    out, state = drive(a, x, w, slots, 10, state=state, jit=jit)
    expected = ref_centered_clipping(1.5, 3, center)(x, w)
    assert_matches(out, expected)
    np.testing.assert_allclose(
      flat({k: np.asarray(v)[None] for k, v in state["center"].items()})[0],
      expected,
      rtol=2e-5,
      atol=2e-5,
    )
    center = expected


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_adaptive_clipping_follows_geometric_update(jit):
  rng = np.random.default_rng(4)
  c, gamma, eta = 1.0, 0.3, 0.5
  a = agg.clipped(
    agg.weighted_mean(),
    c,
    adaptive=True,
    target_quantile=gamma,
    learning_rate=eta,
  )
  state = None
  for _ in range(4):
    x, w, slots = make_round(rng, 8, 8)
    x = x * rng.uniform(0.2, 2.0, (8, 1))
    out, state = drive(a, x, w, slots, 8, state=state, jit=jit)
    norms = np.linalg.norm(x, axis=1)
    assert_matches(out, ref_clipped(ref_weighted_mean, c)(x, w))
    unclipped = np.mean(norms <= c)
    np.testing.assert_allclose(float(out.metrics["clip_norm"]), c, rtol=1e-6)
    np.testing.assert_allclose(
      float(out.metrics["clipped_fraction"]), 1 - unclipped, rtol=1e-6
    )
    c = c * np.exp(-eta * (unclipped - gamma))
    np.testing.assert_allclose(float(state["clip_norm"]), c, rtol=1e-5)


def test_no_clients_gives_zeros_and_keeps_state():
  spec = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in SHAPES.items()}
  for a in (
    agg.weighted_mean(),
    agg.coordinate_median(),
    agg.trimmed_mean(0.2),
    agg.krum(1),
    agg.geometric_median(),
    agg.centered_clipping(1.0),
    agg.clipped(agg.unweighted_mean(), 1.0, adaptive=True),
  ):
    state = a.init_state(spec)

    def empty(state, a=a):
      acc = a.init(state, spec, 5)
      return a.finalize(
        state,
        a.merge(jax.tree.map(lambda v: v[None], acc)),
        jax.random.PRNGKey(0),
      )

    out, new = jax.jit(empty)(state)
    for leaf in jax.tree.leaves(out.mean):
      np.testing.assert_array_equal(np.asarray(leaf), 0.0)
    assert float(out.total_weight) == 0.0
    jax.tree.map(np.testing.assert_array_equal, new, state)


# FedAvg through the aggregator path matches the float64 reference over rounds:
# tests/test_engine_plan.py::test_fedavg_matches_float64_reference_over_rounds.


# ------------------------------------------------------------ errors
def test_bad_arguments_name_what_arrived():
  with pytest.raises(ValueError, match=r"beta must be in \[0, 0.5\).*0.5"):
    agg.trimmed_mean(0.5)
  with pytest.raises(ValueError, match=r"beta.*-0.1"):
    agg.trimmed_mean(-0.1)
  with pytest.raises(ValueError, match="clip_norm must be a positive"):
    agg.clipped(agg.weighted_mean(), 0.0)
  with pytest.raises(ValueError, match="target_quantile"):
    agg.clipped(agg.weighted_mean(), 1.0, adaptive=True, target_quantile=1.5)
  with pytest.raises(ValueError, match="num_byzantine must be an int"):
    agg.krum(-1)
  with pytest.raises(ValueError, match="tau must be a positive"):
    agg.centered_clipping(0.0)
  with pytest.raises(TypeError, match="inner must be an Aggregator"):
    agg.clipped("mean", 1.0)
  spec = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in SHAPES.items()}
  with pytest.raises(
    ValueError,
    match=r"num_byzantine=2 needs "
    r"clients_per_round > 2 \* num_byzantine \+ 2 = 6, got "
    r"clients_per_round=6",
  ):
    agg.krum(2).init((), spec, 6)


# ------------------------------------------------------- inside the engine
D, K = 4, 3
SIZES = (3, 9, 5, 12, 4, 7, 6)


def engine_setup(aggregator, buckets, block_size=1, lr=0.3, seed=0):
  r = np.random.default_rng(seed)
  clients = [
    {
      "x": r.standard_normal((n, D)).astype(np.float32),
      "y": r.integers(0, K, n).astype(np.int32),
    }
    for n in SIZES
  ]
  model = fl.models.logistic_regression(D, K)
  alg = fl.fed_avg(model, optax.sgd(lr), optax.sgd(1.0))._replace(
    aggregator=aggregator
  )
  work = fl.LocalWork(batch_size=None, num_epochs=2)
  engine = fl.Engine(
    alg, fl.RoundConfig(len(SIZES), work, sampling="all", block_size=block_size)
  )
  data = engine.put_data(
    fl.FederatedDataset.from_clients(clients), buckets=buckets
  )
  params = {
    "Dense_0": {
      "kernel": jnp.asarray(r.standard_normal((D, K)) * 0.5, jnp.float32),
      "bias": jnp.asarray(r.standard_normal(K) * 0.1, jnp.float32),
    }
  }
  return engine, data, params, clients


def numpy_round(w, clients, reducer, lr=0.3):
  grad = lambda ps, x, y: ref.logreg_loss_grad(ps[0], ps[1], x, y)[1:]
  deltas, weights = [], []
  for c in clients:
    wk = ref.local_gd(grad, w, c["x"].astype(np.float64), c["y"], lr, 2)
    deltas.append(np.concatenate([(a - b).reshape(-1) for a, b in zip(w, wk)]))
    weights.append(c["x"].shape[0])
  mean = reducer(np.stack(deltas), np.asarray(weights, np.float64))
  kernel = mean[: D * K].reshape(D, K)
  return [w[0] - kernel, w[1] - mean[D * K :]]


ENGINE_CASES = {
  "trimmed_mean": (lambda: agg.trimmed_mean(0.2), ref_trimmed_mean(0.2)),
  "coordinate_median": (agg.coordinate_median, ref_median),
  "multi_krum": (lambda: agg.krum(1, multi=2), ref_krum(1, 2)),
  "geometric_median": (
    lambda: agg.geometric_median(1e-8, 8, 1e-6),
    ref_geometric_median(1e-8, 8, 1e-6),
  ),
  "clipped_median": (
    lambda: agg.clipped(agg.coordinate_median(), 0.3),
    ref_clipped(ref_median, 0.3),
  ),
}


def _to_list(p):
  return [
    np.asarray(p["Dense_0"]["kernel"], np.float64),
    np.asarray(p["Dense_0"]["bias"], np.float64),
  ]


def _flat_params(w):
  # Kernel then bias, the order numpy_round uses.
  return np.concatenate([w[0].reshape(-1), w[1].reshape(-1)])


@pytest.mark.parametrize(
  "name,buckets,block_size",
  [
    ("trimmed_mean", 1, 1),
    ("trimmed_mean", 3, 1),
    ("trimmed_mean", 3, None),
    ("coordinate_median", 3, 1),
    ("multi_krum", 3, None),
    ("geometric_median", 3, 1),
    ("clipped_median", 1, None),
  ],
)
def test_robust_aggregators_in_engine_rounds(name, buckets, block_size):
  assert len(jax.devices("cpu")) == 4, "conftest forces 4 CPU devices"
  make, reducer = ENGINE_CASES[name]
  engine, data, params, clients = engine_setup(make(), buckets, block_size)
  assert len(data.bucket_sizes) == buckets
  state = engine.init(params)
  w = _to_list(params)
  for _ in range(2):
    state, metrics = engine.round(state, data)
    w = numpy_round(w, clients, reducer)
    got = _to_list(state.server.params)
    for a, e in zip(got, w):
      np.testing.assert_allclose(a, e, rtol=2e-5, atol=2e-5)
  assert float(metrics["num_clients"]) == len(SIZES)
  assert float(metrics["total_weight"]) == sum(SIZES)


def test_centered_clipping_state_in_engine_state_and_checkpoint(tmp_path):
  engine, data, params, clients = engine_setup(
    agg.centered_clipping(0.2, iters=2), 3
  )
  state = engine.init(params)
  assert state.aggregator is not None  # sized from the data put last
  center = np.zeros(D * K + K)
  w = _to_list(params)
  for _ in range(2):
    state, _ = engine.round(state, data)
    reducer = ref_centered_clipping(0.2, 2, center)
    w_new = numpy_round(w, clients, reducer)
    center = _flat_params(w) - _flat_params(w_new)
    w = w_new
    got = state.aggregator["center"]["Dense_0"]
    np.testing.assert_allclose(
      np.concatenate(
        [np.asarray(got["kernel"]).reshape(-1), np.asarray(got["bias"])]
      ),
      center,
      rtol=2e-5,
      atol=2e-6,
    )
  # The whole EngineState (aggregator state included) round-trips a
  # msgpack checkpoint and resumes exactly.
  path = tmp_path / "ckpt.msgpack"
  fl.experiment.save_checkpoint(path, state)
  restored, _ = fl.experiment.load_checkpoint(path, state)
  restored = jax.device_put(restored, engine.replicated)
  a, _ = engine.round(state, data)
  b, _ = engine.round(restored, data)
  jax.tree.map(
    lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
    a,
    b,
  )


@pytest.mark.parametrize(
  "make",
  [
    pytest.param(
      lambda: agg.clipped(
        agg.trimmed_mean(0.2),
        0.5,
        adaptive=True,
        target_quantile=0.5,
        learning_rate=0.3,
      ),
      marks=pytest.mark.slow,
    ),
    lambda: agg.centered_clipping(0.3),
  ],
  ids=["adaptive_trimmed", "cc"],
)
def test_pooled_runs_keep_their_own_aggregator_state(make):
  engine, data, params, _ = engine_setup(make(), 3)
  engine = fl.Engine(
    engine.algorithm,
    fl.RoundConfig(4, fl.LocalWork(batch_size=2), sampling="uniform"),
  )
  data = engine.put_data(data)
  states = [
    engine.init(jax.tree.map(lambda a, s=s: a * (1 + s), params), seed=s)
    for s in range(2)
  ]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
  step = jax.jit(lambda st: engine.rounds_body(st, data))
  for _ in range(2):
    stacked, metrics = step(stacked)
    for r in range(2):
      states[r], m = engine.round(states[r], data)
      got = jax.tree.map(lambda a, r=r: a[r], stacked)
      for x, y in zip(
        jax.tree.leaves((got.server, got.aggregator)),
        jax.tree.leaves((states[r].server, states[r].aggregator)),
      ):
        np.testing.assert_allclose(
          np.asarray(x), np.asarray(y), rtol=2e-5, atol=1e-6
        )
      for k in m:
        np.testing.assert_allclose(
          float(metrics[k][r]), float(m[k]), rtol=2e-5, atol=1e-6
        )
  # The runs really differ (own seeds and params; CC: own centers).
  k = np.asarray(stacked.server.params["Dense_0"]["kernel"])
  assert not np.allclose(k[0], k[1])
  if "center" in stacked.aggregator:
    c = np.asarray(stacked.aggregator["center"]["Dense_0"]["kernel"])
    assert not np.allclose(c[0], c[1])


def test_clip_metrics_reach_round_metrics():
  engine, data, params, _ = engine_setup(
    agg.clipped(agg.weighted_mean(), 0.05, adaptive=True), 1
  )
  state = engine.init(params)
  state, metrics = engine.round(state, data)
  assert float(metrics["clip_norm"]) == pytest.approx(0.05)
  assert 0.0 < float(metrics["clipped_fraction"]) <= 1.0
  assert float(state.aggregator["clip_norm"]) != pytest.approx(0.05)


def test_engine_errors_for_incompatible_aggregators(monkeypatch):
  # Krum needs clients_per_round > 2f + 2 (checked when the round traces).
  engine, data, params, _ = engine_setup(agg.krum(3), 1)
  with pytest.raises(
    ValueError,
    match=r"num_byzantine=3.*clients_per_round"
    r"=7",
  ):
    engine.round(engine.init(params), data)
  # Integer update leaves cannot be sorted/averaged by materialized rules.
  base = fl.fed_avg(fl.models.logistic_regression(D, K), optax.sgd(0.1))

  def int_update(bcast, cstate, cdata, rng):
    out = base.client_update(bcast, cstate, cdata, rng)
    return out._replace(
      update={"steps": jnp.ones((), jnp.int32), "delta": out.update}
    )

  def server_update(state, aggregate):
    return base.server_update(
      state, aggregate._replace(mean=aggregate.mean["delta"])
    )

  bad = base._replace(
    client_update=int_update,
    server_update=server_update,
    aggregator=agg.coordinate_median(),
  )
  engine2 = fl.Engine(bad, engine.config)
  with pytest.raises(TypeError, match=r"\['steps'\] has dtype int32"):
    engine2.round(engine2.init(params), data)
  # A buffer larger than the memory: names the bytes it needs.
  monkeypatch.setattr(
    fl.engine.plan, "device_memory_bytes", lambda device: (1000, "a test limit")
  )
  engine3 = fl.Engine(
    base._replace(aggregator=agg.trimmed_mean(0.1)), engine.config
  )
  with pytest.raises(
    MemoryError,
    match=r"clients_per_round=7 x 60 bytes per "
    r"update x 1 run\(s\)",
  ):
    engine3.round(engine3.init(params), data)
  with pytest.raises(TypeError, match="aggregator must be"):
    fl.Engine(base._replace(aggregator="median"), engine.config)
