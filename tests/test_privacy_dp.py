"""DP-FedAvg aggregation against float64 numpy references: clipping bound,
fixed-denominator noise calibration, adaptive clipping, Poisson slots, local
DP, the engine round and the TFF-style process, and clear errors."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_lite as fl
from fedjax_lite import aggregators, privacy
from fedjax_lite.aggregators.base import RunSpec
from fedjax_lite.privacy import dp

ND = 2  # devices the driver splits a round's clients over


def spec_of(updates):
  return jax.tree.map(
    lambda u: jax.ShapeDtypeStruct(u.shape[1:], u.dtype), updates
  )


def run_round(
  agg, state, updates, rng, weights=None, valid=None, num_slots=None
):
  """What the engine does with an aggregator: ND devices, one block each."""
  b = jax.tree.leaves(updates)[0].shape[0]
  num_slots = b if num_slots is None else num_slots
  weights = jnp.ones((b,), jnp.float32) if weights is None else weights
  valid = jnp.ones((b,), bool) if valid is None else valid
  slots = jnp.arange(b, dtype=jnp.int32)
  spec = spec_of(updates)
  half = b // ND
  accs = []
  for d in range(ND):
    part = slice(d * half, (d + 1) * half)
    acc = agg.init(state, spec, num_slots)
    block = jax.tree.map(lambda u, part=part: u[part], updates)
    accs.append(
      agg.add(state, acc, block, weights[part], valid[part], slots[part])
    )
  acc = agg.merge(jax.tree.map(lambda *a: jnp.stack(a), *accs))
  return agg.finalize(state, acc, rng)


def clip_np(u, c):
  n = np.linalg.norm(u)
  return u * min(1.0, c / max(n, 1e-30))


def updates_np(rng, b, scale=3.0):
  return {
    "w": rng.standard_normal((b, 5, 3)) * scale,
    "b": rng.standard_normal((b, 3)) * scale,
  }


def flat(u, k):
  return np.concatenate([np.ravel(u["w"][k]), np.ravel(u["b"][k])])


@pytest.mark.parametrize("jit", [False, True])
def test_clipped_sum_matches_float64_reference_and_never_exceeds_c(rng, jit):
  b, c, d = 8, 1.5, 10.0
  u64 = updates_np(rng, b)
  u64["w"][2] *= 1e-2  # one update well inside the ball
  u64["b"][2] *= 1e-2
  updates = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), u64)
  agg = privacy.dp_aggregator(0.0, d, clip=c)
  state = agg.init_state(spec_of(updates))
  fn = (
    jax.jit(functools.partial(run_round, agg))
    if jit
    else functools.partial(run_round, agg)
  )
  out, _ = fn(state, updates, jax.random.PRNGKey(0))
  ref = sum(clip_np(flat(u64, k), c) for k in range(b)) / d
  got = np.concatenate([np.ravel(out.mean["w"]), np.ravel(out.mean["b"])])
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)

  # Each client alone: its clipped contribution has norm <= C.
  @jax.jit
  def alone(one):
    one = jax.tree.map(lambda x: x[None], one)
    acc = agg.add(
      state,
      agg.init(state, spec_of(one), 1),
      one,
      jnp.ones((1,)),
      jnp.ones((1,), bool),
      jnp.zeros((1,), jnp.int32),
    )
    return aggregators.tree_norm(acc["sum"])

  norms = np.asarray(jax.vmap(alone)(updates))
  assert np.all(norms <= c * (1 + 1e-6)) and np.any(norms < 0.5 * c)
  assert float(out.metrics["dp_clipped_fraction"]) == pytest.approx(
    np.mean([np.linalg.norm(flat(u64, k)) > c for k in range(b)])
  )


def test_padding_and_zero_weight_do_not_count(rng):
  b, c = 8, 1.0
  updates = jax.tree.map(
    lambda x: jnp.asarray(x, jnp.float32), updates_np(rng, b)
  )
  valid = jnp.array([1, 1, 1, 0, 1, 1, 1, 1], bool)
  weights = jnp.array([1, 2, 0, 1, 3, 1, 1, 1], jnp.float32)
  agg = privacy.dp_aggregator(0.0, 5.0, clip=c)
  out, _ = run_round(
    agg,
    agg.init_state(spec_of(updates)),
    updates,
    jax.random.PRNGKey(0),
    weights,
    valid,
  )
  keep = [0, 1, 4, 5, 6, 7]  # valid and weight > 0; weights are not used
  u64 = jax.tree.map(np.asarray, updates)
  ref = sum(clip_np(flat(u64, k).astype(np.float64), c) for k in keep) / 5.0
  got = np.concatenate([np.ravel(out.mean["w"]), np.ravel(out.mean["b"])])
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  assert float(out.metrics["dp_participants"]) == len(keep)


def test_noise_std_is_z_c_over_denominator():
  """A fixed update, many rounds: the aggregate's noise std is z*C/D."""
  z, c, d, rounds = 1.3, 0.7, 25.0, 400
  updates = {"w": jnp.full((4, 50, 50), 2.0, jnp.float32)}  # norm 100 > C
  agg = privacy.dp_aggregator(z, d, clip=c)
  state = agg.init_state(spec_of(updates))
  keys = jax.random.split(jax.random.PRNGKey(1), rounds)
  means = jax.jit(
    jax.vmap(lambda k: run_round(agg, state, updates, k)[0].mean["w"])
  )(keys)
  clean = 4 * c * np.full((50, 50), 2.0) / 100.0 / d
  noise = np.asarray(means, np.float64) - clean
  expected = z * c / d
  assert abs(noise.std() / expected - 1) < 0.03
  assert abs(noise.mean()) < 5 * expected / math.sqrt(noise.size)
  # Independent across rounds: lag-1 correlation of a coordinate ~ 0.
  series = noise[:, 0, 0]
  assert abs(np.corrcoef(series[:-1], series[1:])[0, 1]) < 0.2


def test_adaptive_split_of_the_noise_multiplier():
  z, d = 1.0, 100.0
  sigma_b = d / 20
  z_sum = privacy.sum_noise_multiplier(z, sigma_b)
  assert z_sum == pytest.approx((z**-2 - (2 * sigma_b) ** -2) ** -0.5)
  # The two releases compose to the effective multiplier z.
  assert (z_sum**-2 + (2 * sigma_b) ** -2) ** -0.5 == pytest.approx(z)
  agg = privacy.dp_aggregator(z, d, clip=1.0, adaptive=True)
  updates = {"w": jnp.full((2, 10), 5.0, jnp.float32)}
  out, _ = run_round(
    agg, agg.init_state(spec_of(updates)), updates, jax.random.PRNGKey(0)
  )
  assert float(out.metrics["dp_noise_std"]) == pytest.approx(
    z_sum / d, rel=1e-6
  )
  with pytest.raises(
    ValueError,
    match=r"clipped_count_stddev must be > "
    r"noise_multiplier / 2 = 0\.5.*got 0\.4",
  ):
    privacy.dp_aggregator(1.0, 8, adaptive=True, clipped_count_stddev=0.4)


@pytest.mark.parametrize("gamma", [0.5, 0.8])
def test_adaptive_clipping_tracks_the_target_quantile(gamma):
  """Norms ~ lognormal(0, 0.5) times 3: the clip converges to the
  gamma-quantile of the norm distribution (Andrew et al. 2021, Fig. 1)."""
  d, rounds, mu, s = 100, 300, math.log(3.0), 0.5
  target = math.exp(mu + s * float(jax.scipy.stats.norm.ppf(gamma)))
  agg = privacy.dp_aggregator(
    0.5,
    float(d),
    clip=0.1,
    adaptive=True,
    target_quantile=gamma,
    learning_rate=0.2,
  )
  spec = {"w": jax.ShapeDtypeStruct((d, 8), jnp.float32)}
  state0 = agg.init_state(
    jax.tree.map(lambda t: jax.ShapeDtypeStruct(t.shape[1:], t.dtype), spec)
  )

  def one_round(state, key):
    k_dir, k_norm, k_agg = jax.random.split(key, 3)
    direction = jax.random.normal(k_dir, (d, 8))
    direction = direction / jnp.linalg.norm(direction, axis=1, keepdims=True)
    norms = jnp.exp(mu + s * jax.random.normal(k_norm, (d,)))
    out, state = run_round(agg, state, {"w": direction * norms[:, None]}, k_agg)
    return state, out.metrics["dp_clip_norm"]

  _, clips = jax.jit(
    lambda k: jax.lax.scan(one_round, state0, jax.random.split(k, rounds))
  )(jax.random.PRNGKey(3))
  clips = np.asarray(clips)
  assert clips[0] == pytest.approx(0.1)
  tail = clips[-100:]
  assert abs(np.median(tail) / target - 1) < 0.1, (np.median(tail), target)


def test_poisson_slots_follow_a_binomial_and_only_the_first_k_count():
  n_pop, d = 400, 20.0
  q = d / n_pop
  cap = privacy.poisson_cap(n_pop, q, 2000)
  agg = privacy.dp_aggregator(
    0.0, d, clip=100.0, sampling="poisson", population=n_pop
  )
  updates = {
    "w": jnp.tile(jnp.arange(cap, dtype=jnp.float32)[:, None] + 1, (1, 2))
  }  # slot k sends k + 1

  def one_round(state, key):
    out, state = run_round(agg, state, updates, key)
    return state, (
      out.metrics["dp_participants"],
      out.mean["w"][0],
      out.metrics["dp_overflow"],
    )

  state0 = agg.init_state(spec_of(updates))
  _, (k, first, overflow) = jax.jit(
    lambda key: jax.lax.scan(one_round, state0, jax.random.split(key, 2000))
  )(jax.random.PRNGKey(0))
  k = np.asarray(k)
  # Exactly the slots < K send: sum_{s<K} (s+1) / D.
  np.testing.assert_allclose(np.asarray(first), k * (k + 1) / 2 / d, rtol=1e-6)
  assert abs(k.mean() - d) < 4 * math.sqrt(d * (1 - q) / k.size)
  assert abs(k.var() / (d * (1 - q)) - 1) < 0.1
  assert float(np.sum(overflow)) == 0.0
  with pytest.raises(
    ValueError,
    match=r"clients_per_round=22 slots for "
    r"Poisson.*poisson_cap",
  ):
    run_round(agg, state0, {"w": updates["w"][:22]}, jax.random.PRNGKey(0))


def test_local_dp_noise_comes_from_the_clients():
  """Clients clip and noise; the server adds nothing: the aggregate's noise
  std is z*C*sqrt(K)/D."""
  z, c, d = 0.5, 1.0, 8.0
  model = fl.models.logistic_regression(3, 2)
  alg = privacy.dp_fed_avg(
    model,
    optax.sgd(0.1),
    noise_multiplier=z,
    clients_per_round=d,
    clip=c,
    local=True,
  )
  params = model.init(jax.random.PRNGKey(0))
  data = fl.data.ClientData(
    batches={"x": jnp.ones((1, 4, 3)), "y": jnp.zeros((1, 4), jnp.int32)},
    mask=jnp.ones((1, 4), bool),
    num_examples=jnp.int32(4),
    client_id=jnp.int32(0),
    slot=jnp.int32(0),
  )
  keys = jax.random.split(jax.random.PRNGKey(1), 2000)
  ups = jax.jit(jax.vmap(lambda k: alg.client_update(params, None, data, k)))(
    keys
  ).update
  clean = (
    alg._replace(client_update=fl.fed_avg(model, optax.sgd(0.1)).client_update)
    .client_update(params, None, data, keys[0])
    .update
  )
  bounded = aggregators.clip_by_norm(clean, c)
  noise = np.concatenate(
    [
      np.ravel(np.asarray(a) - np.asarray(b)[None])
      for a, b in zip(jax.tree.leaves(ups), jax.tree.leaves(bounded))
    ]
  )
  # The client's randomness for training does not change a full-batch step.
  assert abs(noise.std() / (z * c) - 1) < 0.03
  # The server: no clipping (the upload exceeds C), no noise.
  agg = alg.aggregator
  two = jax.tree.map(lambda u: u[:4], ups)
  out, _ = run_round(
    agg, agg.init_state(spec_of(two)), two, jax.random.PRNGKey(9)
  )
  chex.assert_trees_all_close(
    out.mean, jax.tree.map(lambda u: u.sum(0) / d, two), rtol=1e-6, atol=1e-7
  )
  with pytest.raises(ValueError, match="adaptive=True needs the server"):
    privacy.dp_aggregator(1.0, 8, adaptive=True, local=True)


def synthetic(num_clients):
  r = np.random.default_rng(0)
  return fl.FederatedDataset.from_clients(
    [
      {
        "x": r.standard_normal((n, 4)).astype(np.float32),
        "y": r.integers(0, 3, n).astype(np.int32),
      }
      for n in r.integers(3, 9, num_clients)
    ]
  )


def test_engine_round_without_noise_is_the_unweighted_mean(one_device_mesh):
  """z = 0, a clip no update reaches, fixed-size sampling: the DP mean
  (fixed denominator m) is the plain unweighted mean of the m updates."""
  ds = synthetic(40)
  model = fl.models.logistic_regression(4, 3)
  cfg = fl.RoundConfig(8, fl.LocalWork(batch_size=4))
  dp_alg = privacy.dp_fed_avg(
    model,
    optax.sgd(0.1),
    noise_multiplier=0.0,
    clients_per_round=8,
    clip=1e6,
    sampling="fixed",
    population=40,
    delta=1e-3,
  )
  plain = fl.fed_avg(model, optax.sgd(0.1))._replace(
    aggregator=aggregators.unweighted_mean()
  )
  params = model.init(jax.random.PRNGKey(0))
  outs = []
  for alg in (dp_alg, plain):
    eng = fl.Engine(alg, cfg, one_device_mesh)
    data = eng.put_data(ds)
    state = eng.init(params, seed=3, num_clients=40)
    for _ in range(2):
      state, metrics = eng.round(state, data)
    outs.append((state.server.params, metrics))
  chex.assert_trees_all_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
  assert math.isinf(float(outs[0][1]["dp_epsilon"]))  # z = 0: no privacy


def test_engine_poisson_dp_fed_avg_reports_dp_accounting_epsilon(
  poisson_runs,
):
  """The accounted run (40 users, 4 expected per round, delta 1e-3, 3
  rounds) is the active-slots run of poisson_runs, which
  test_poisson_rounds_train_only_the_sampled_clients also checks."""
  n_pop, d, delta, rounds = 40, 4.0, POISSON_DELTA, 3
  _, cap, _ = poisson_runs["setup"]
  state, hist = poisson_runs["active"]
  mech = privacy.DpMechanism(1.0, "poisson", n_pop, clients_per_round=d)
  ref = [privacy.epsilon(mech, t, delta) for t in range(1, rounds + 1)]
  np.testing.assert_allclose(
    np.asarray(hist["dp_epsilon"], np.float64), ref, rtol=1e-6
  )
  assert np.all(np.asarray(hist["dp_participants"]) <= cap)
  assert np.all(np.isfinite(jax.tree.leaves(state.server.params)[0]))


def test_process_builder_runs_and_reports_epsilon(one_device_mesh):
  model = fl.models.logistic_regression(4, 3)
  process = fl.learning.build_dp_fed_avg_process(
    model,
    lambda: optax.sgd(0.1),
    noise_multiplier=1.2,
    clients_per_round=5,
    clip=1.0,
    sampling="poisson",
    population=50,
    delta=1e-4,
    batch_size=4,
    mesh=one_device_mesh,
  )
  state = process.initialize(seed=0)
  ds = synthetic(50)
  clients = [
    {k: np.asarray(v[o : o + n]) for k, v in ds.features.items()}
    for o, n in zip(np.cumsum(ds.counts) - ds.counts, ds.counts)
  ]
  chosen = privacy.poisson_sample(0, 50, 0.1)
  state, metrics = process.next(state, [clients[i] for i in chosen])
  mech = privacy.DpMechanism(1.2, "poisson", 50, clients_per_round=5)
  assert metrics["dp_epsilon"] == pytest.approx(
    privacy.epsilon(mech, 1, 1e-4), rel=1e-6
  )
  assert metrics["dp_participants"] == len(chosen)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
  "kwargs,pattern",
  [
    (dict(noise_multiplier=-1.0), r"noise_multiplier must be .*>= 0.*-1\.0"),
    (dict(clip=0.0), r"clip must be a finite L2 norm > 0, got 0\.0"),
    (dict(clip=-1.0), r"clip must be a finite L2 norm > 0, got -1\.0"),
    (dict(clients_per_round=0), r"clients_per_round must be > 0.*got 0"),
    (
      dict(population=5, sampling="poisson"),
      (
        r"clients_per_round must be in \(0, population=5\] for poisson "
        r"sampling, got 10\.0 \(sampling_rate 2\.0\)"
      ),
    ),
    (
      dict(population=100, sampling="poisson", delta=1.0),
      r"delta must be in \(0, 1\).*1\.0",
    ),
    (dict(delta=1e-5), r"accounting needs sampling .* and population"),
    (dict(sampling="uniform"), r"sampling must be 'poisson', 'fixed' or None"),
  ],
)
def test_dp_aggregator_bad_input(kwargs, pattern):
  args = dict(noise_multiplier=1.0, clients_per_round=10, clip=1.0)
  args.update(kwargs)
  with pytest.raises(ValueError, match=pattern):
    privacy.dp_aggregator(**args)


def test_fixed_sampling_must_match_the_round():
  agg = privacy.dp_aggregator(1.0, 10, sampling="fixed", population=100)
  spec = {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}
  with pytest.raises(
    ValueError,
    match=r"accounted for clients_per_round=10 "
    r"users per round but the round samples 12",
  ):
    agg.init(agg.init_state(spec), spec, 12)


def test_state_is_a_pytree_that_resumes():
  agg = privacy.dp_aggregator(
    1.0, 4.0, clip=2.0, adaptive=True, clipped_count_stddev=1.0
  )
  state = agg.init_state({"w": jax.ShapeDtypeStruct((3,), jnp.float32)})
  assert isinstance(state, dp.DpState)
  leaves = jax.tree.leaves(state)
  assert len(leaves) == 3 and float(state.clip_norm) == 2.0


def _poisson_runs(n_pop=40, d=4.0, rounds=3, **dp_kw):
  """Poisson DP-FedAvg of ``d`` expected users out of ``n_pop`` (adaptive
  clip): ``(algorithm, cap, run)``, ``run(algorithm, placement, debug,
  num_rounds) -> (state, history)`` over 2 size buckets."""
  ds = synthetic(n_pop)
  model = fl.models.logistic_regression(4, 3)
  cap = privacy.poisson_cap(n_pop, d / n_pop, rounds)
  alg = privacy.dp_fed_avg(
    model,
    optax.sgd(0.1),
    noise_multiplier=1.0,
    clients_per_round=d,
    clip=0.5,
    adaptive=True,
    clipped_count_stddev=1.0,
    sampling="poisson",
    population=n_pop,
    **dp_kw,
  )
  cfg = fl.RoundConfig(cap, fl.LocalWork(batch_size=4))
  params = model.init(jax.random.PRNGKey(0))

  def run(algorithm, placement="replicated", debug=False, num_rounds=rounds):
    eng = fl.Engine(algorithm, cfg, debug=debug)
    data = eng.put_data(ds, buckets=2, placement=placement)
    state = eng.init(params, seed=3, num_clients=n_pop, data=data)
    return eng.run(state, data, num_rounds)

  return alg, cap, run


def _assert_close(s1, s2):
  for a, b in zip(jax.tree.leaves(s1.server), jax.tree.leaves(s2.server)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), 1e-5, 1e-6)


def every_slot(agg):
  """``agg`` without ``active_slots``, also once the engine binds it."""
  bind = agg.bind
  return agg._replace(
    active_slots=None,
    bind=None if bind is None else lambda run: every_slot(bind(run)),
  )


# The accountant's delta of the Poisson runs shared by the tests below.
POISSON_DELTA = 1e-3


@pytest.fixture(scope="module")
def poisson_runs():
  """The Poisson DP-FedAvg runs of ``_poisson_runs()`` (accounted with
  delta POISSON_DELTA), each run once for the module: every slot trained,
  only the active slots, and the active slots over client-sharded data."""
  alg, cap, run = _poisson_runs(delta=POISSON_DELTA)
  return {
    "setup": (alg, cap, run),
    "all": run(alg._replace(aggregator=every_slot(alg.aggregator))),
    "active": run(alg),
    "sharded": run(alg, "sharded"),
  }


def test_poisson_rounds_train_only_the_sampled_clients(poisson_runs):
  """The engine trains only the slots < K of a Poisson round
  (Aggregator.active_slots): num_clients is the Poisson count, not the cap,
  and the result equals training every slot and discarding the unused ones
  (the aggregator masks them), with replicated or sharded data."""
  alg, cap, _ = poisson_runs["setup"]
  assert alg.aggregator.active_slots is not None
  s_all, h_all = poisson_runs["all"]
  s_act, h_act = poisson_runs["active"]
  s_shd, h_shd = poisson_runs["sharded"]
  k = np.asarray(h_act["dp_participants"])
  assert np.all(k < cap) and np.all(k > 0)
  np.testing.assert_array_equal(np.asarray(h_all["num_clients"]), cap)
  for h in (h_act, h_shd):
    np.testing.assert_array_equal(np.asarray(h["num_clients"]), k)
    np.testing.assert_array_equal(np.asarray(h["dp_participants"]), k)
  _assert_close(s_all, s_act)
  _assert_close(s_all, s_shd)


@pytest.mark.slow
def test_poisson_debug_round_equals_jitted_round():
  alg, _, run = _poisson_runs()
  s_dbg, h_dbg = run(alg, debug=True, num_rounds=1)
  s_one, h_one = run(alg, num_rounds=1)
  np.testing.assert_array_equal(h_dbg["num_clients"], h_one["num_clients"])
  np.testing.assert_array_equal(h_one["num_clients"], h_one["dp_participants"])
  _assert_close(s_one, s_dbg)


# ------------------------------------------------------- the host protocol
def test_settings_hold_the_noise_split_and_the_builder_is_thin():
  """dp_settings: z_Delta and sigma_b as in Andrew et al. (Thm. 1); local DP
  adds no server noise; dp_aggregator is DpProtocol(settings).aggregator."""
  kw = dict(
    target_quantile=0.5,
    learning_rate=0.2,
    clipped_count_stddev=None,
    sampling=None,
    population=None,
    delta=None,
    accountant="rdp",
    local=False,
    simulate_sampling=True,
    seed=0,
  )
  s = dp.dp_settings(1.5, 40.0, 0.5, True, **kw)
  assert s.count_stddev == 2.0  # D / 20
  assert s.sum_multiplier == pytest.approx((1.5**-2 - 4.0**-2) ** -0.5)
  assert (s.clip, s.denominator, s.noise_multiplier) == (0.5, 40.0, 1.5)
  assert not s.accounted and not s.poisson
  fixed = dp.dp_settings(1.5, 40.0, 0.5, False, **kw)
  assert (fixed.sum_multiplier, fixed.count_stddev) == (1.5, 0.0)
  local = dp.dp_settings(1.5, 40.0, 0.5, False, **{**kw, "local": True})
  assert local.sum_multiplier == 0.0 and local.name.startswith("local_dp(")
  agg = dp.DpProtocol(s).aggregator()
  assert agg.name == privacy.dp_aggregator(1.5, 40.0, 0.5, True).name
  assert agg.name == "dp_adaptive(z=1.5,C=0.5,D=40)" and agg.bind is None


def test_protocol_binds_once_per_population():
  """Binding to runs of one population returns one aggregator (the declared
  one when the population was declared); its epsilon is the run's."""
  agg = privacy.dp_aggregator(
    1.0, 3, sampling="fixed", population=6, delta=1e-3
  )
  run = RunSpec(
    population=6, clients_per_round=3, sampling="uniform", replace=False
  )
  assert agg.bind(run) is agg and agg.bind(run).bind(run) is agg
  free = privacy.dp_aggregator(1.0, 3, sampling="fixed", delta=1e-3)
  bound = free.bind(run)
  assert bound is not free and free.bind(run) is bound
  assert bound.bind(run) is bound
  other = free.bind(run._replace(population=9))
  assert other is not bound
  protocol = dp.DpProtocol(
    dp.dp_settings(
      1.0,
      3,
      1.0,
      False,
      target_quantile=0.5,
      learning_rate=0.2,
      clipped_count_stddev=None,
      sampling="fixed",
      population=None,
      delta=1e-3,
      accountant="rdp",
      local=False,
      simulate_sampling=True,
      seed=0,
    )
  )
  assert protocol.population_of(run) == 6
  curve = protocol.epsilon_curve(9)
  mech = privacy.DpMechanism(1.0, "fixed", 9, clients_per_round=3)
  assert curve(2) == pytest.approx(privacy.epsilon(mech, 2, 1e-3), rel=1e-9)
  spec = {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}
  with pytest.raises(ValueError, match=r"population=None, sampling='fixed'"):
    free.init_state(spec)


@pytest.mark.parametrize(
  "kwargs,error,pattern",
  [
    (
      dict(adaptive=True, target_quantile=1.5),
      ValueError,
      r"target_quantile must be a number in \[0, 1\], got 1\.5",
    ),
    (
      dict(adaptive=True, learning_rate=-0.1),
      ValueError,
      r"learning_rate must be a non-negative finite number, got -0\.1",
    ),
    (
      dict(clients_per_round="10"),
      TypeError,
      r"clients_per_round must be a real number, got str",
    ),
    (
      dict(clients_per_round=float("nan")),
      ValueError,
      r"clients_per_round must be > 0 \(the expected users per round, the "
      r"fixed denominator\), got nan",
    ),
  ],
)
def test_dp_aggregator_bad_adaptive_input(kwargs, error, pattern):
  args = dict(noise_multiplier=1.0, clients_per_round=10, clip=1.0)
  args.update(kwargs)
  with pytest.raises(error, match=pattern):
    privacy.dp_aggregator(**args)


def test_poisson_sample_checks_the_population():
  np.testing.assert_array_equal(
    privacy.poisson_sample(3, 50, 0.2),
    np.flatnonzero(np.random.default_rng(3).random(50) < 0.2),
  )
  with pytest.raises(ValueError, match=r"population must be a positive int"):
    privacy.poisson_sample(0, 0, 0.5)
