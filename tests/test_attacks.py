"""Byzantine attacks against float64 numpy references of the published rules."""

import functools
import re

import algo_reference as aref
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref
import scipy.stats

import fedjax_lite as fl
from fedjax_lite import aggregators as aggs
from fedjax_lite import attacks

D, K = 4, 3
POPULATION = (3, 8, 5, 12, 7, 4)
BYZ = np.array([True, False, False, True, False, False])
LR = 0.2
MODEL = fl.models.logistic_regression(D, K)


def make_clients(sizes, seed):
  return ref.logreg_clients(sizes, seed, D, K)


CLIENTS = make_clients(POPULATION, 1)


def init_params(seed=2):
  return ref.logreg_params(D, K, seed)


to_list = ref.logreg_list


grad = ref.logreg_grad


# ----------------------------------------------------------- Byzantine set
def test_byzantine_mask_is_seeded_exact_and_nested():
  m10 = attacks.byzantine_mask(100, 0.1, seed=3)
  m20 = attacks.byzantine_mask(100, 0.2, seed=3)
  m30 = attacks.byzantine_mask(100, 0.3, seed=3)
  assert m10.dtype == bool and m10.shape == (100,)
  assert [int(m.sum()) for m in (m10, m20, m30)] == [10, 20, 30]
  assert np.all(m20[m10]) and np.all(m30[m20])  # nested sets
  np.testing.assert_array_equal(m20, attacks.byzantine_mask(100, 0.2, 3))
  assert not np.array_equal(m20, attacks.byzantine_mask(100, 0.2, 4))
  assert attacks.byzantine_mask(100, 0.0).sum() == 0
  # A traced fraction (vectorized sweeps) gives the same sets.
  traced = jax.jit(lambda f: attacks.byzantine_mask(100, f, 3))
  np.testing.assert_array_equal(np.asarray(traced(0.2)), m20)


@pytest.mark.parametrize("fraction", [1.0, -0.1, 1.5, float("nan")])
def test_byzantine_fraction_outside_unit_interval_is_rejected(fraction):
  with pytest.raises(ValueError, match=r"fraction .*\[0, 1\)"):
    attacks.byzantine_mask(10, fraction)


def test_bad_attack_arguments():
  with pytest.raises(ValueError, match="scale"):
    attacks.sign_flip(scale=-1.0)
  with pytest.raises(ValueError, match="factor"):
    attacks.scaling(0.0)
  with pytest.raises(ValueError, match="std"):
    attacks.gaussian(float("inf"))
  with pytest.raises(ValueError, match="epsilon"):
    attacks.ipm(-0.5)
  with pytest.raises(ValueError, match="num_classes"):
    attacks.label_flip(1)
  base = fl.fed_avg(MODEL, optax.sgd(LR))
  with pytest.raises(ValueError, match="bool mask"):
    attacks.with_attack(base, attacks.sign_flip(), np.zeros(6, np.int32))
  with pytest.raises(TypeError, match="Attack"):
    attacks.with_attack(base, "sign_flip", BYZ)
  with pytest.raises(ValueError, match="not an aggregation-time"):
    attacks.omniscient_aggregator(None, attacks.sign_flip())


def test_with_attack_mask_must_cover_the_population():
  """A mask of 2 flags for 6 clients: the jitted gather would clamp clients
  2..5 onto flag 1 (a Byzantine share of 0.83). Refused, naming both
  lengths, when the round meets the data (issue 23, case 6)."""
  alg = attacks.with_attack(
    fl.fed_avg(MODEL, optax.sgd(LR)), attacks.sign_flip(), BYZ[:2]
  )
  work = fl.LocalWork(batch_size=3, num_epochs=1, shuffle=False)
  engine = fl.Engine(alg, fl.RoundConfig(len(POPULATION), work, sampling="all"))
  state = engine.init(init_params(), seed=0)  # no data yet: nothing traced
  data = engine.put_data(fl.FederatedDataset.from_clients(CLIENTS), buckets=1)
  with pytest.raises(
    ValueError, match=r"byzantine has 2 entries.*population of 6 clients"
  ):
    engine.round(state, data)


# -------------------------------------------------- update attacks (engine)
@functools.cache
def engine_for(attack_name):
  attack = {
    "sign_flip": attacks.sign_flip(scale=2.0),
    "scaling": attacks.scaling(3.0),
    "label_flip": attacks.label_flip(K),
    "nonfinite": attacks.nonfinite(),
  }[attack_name]
  alg = attacks.with_attack(fl.fed_avg(MODEL, optax.sgd(LR)), attack, BYZ)
  work = fl.LocalWork(batch_size=3, num_epochs=2, shuffle=False)
  engine = fl.Engine(alg, fl.RoundConfig(len(POPULATION), work, sampling="all"))
  data = engine.put_data(fl.FederatedDataset.from_clients(CLIENTS), buckets=1)
  return engine, data


def reference_round(w, attack_name):
  """FedAvg round where the Byzantine clients attack, in float64."""
  deltas, weights = [], []
  for k, c in enumerate(CLIENTS):
    x, y = c["x"].astype(np.float64), c["y"]
    if BYZ[k] and attack_name == "label_flip":
      y = K - 1 - y
    wk, _ = aref.local_sgd(grad, w, x, y, LR, 2, 3)
    delta = aref.sub(w, wk)
    if BYZ[k] and attack_name == "sign_flip":
      delta = [-2.0 * d for d in delta]
    if BYZ[k] and attack_name == "scaling":
      delta = [3.0 * d for d in delta]
    if BYZ[k] and attack_name == "nonfinite":
      continue  # NaN updates leave the round (RoundConfig.nonfinite="drop")
    deltas.append(delta)
    weights.append(x.shape[0])
  mean = aref.weighted_mean(deltas, weights)
  return aref.sub(w, mean)


@pytest.mark.parametrize(
  "attack_name", ["sign_flip", "scaling", "label_flip", "nonfinite"]
)
def test_update_attacks_match_numpy_in_the_engine(attack_name):
  engine, data = engine_for(attack_name)
  p0 = init_params()
  state = engine.init(p0, seed=0)
  w = to_list(p0)
  for _ in range(2):
    state, metrics = engine.round(state, data)
    w = reference_round(w, attack_name)
    for a, e in zip(to_list(state.server.params), w):
      np.testing.assert_allclose(a, e, rtol=2e-5, atol=2e-5 * np.abs(e).max())
  if attack_name == "nonfinite":  # dropped: not among the round's clients
    assert float(metrics["dropped_nonfinite"]) == BYZ.sum()
    assert float(metrics["byzantine"]) == 0.0
  else:
    assert float(metrics["byzantine"]) == pytest.approx(BYZ.mean())


@pytest.mark.parametrize("value", [1.0, 0.0, -3e38])
def test_nonfinite_attack_needs_nan_or_inf(value):
  with pytest.raises(
    ValueError, match=re.escape(f"NaN or +-inf, got {value!r}")
  ):
    attacks.nonfinite(value)
  out = attacks.nonfinite(-np.inf).poison_update({"a": jnp.ones(3)}, None)
  np.testing.assert_array_equal(out["a"], np.full(3, -np.inf))


def one_client(k, seed=0, size=12):
  """Client ``k``'s data as one full batch padded to ``size`` examples."""
  c = CLIENTS[k]
  n = c["x"].shape[0]
  x = np.zeros((1, size, D), np.float32)
  y = np.zeros((1, size), np.int32)
  x[0, :n], y[0, :n] = c["x"], c["y"]
  data = fl.ClientData(
    batches={"x": jnp.asarray(x), "y": jnp.asarray(y)},
    mask=jnp.asarray(np.arange(size) < n)[None],
    num_examples=jnp.int32(n),
    client_id=jnp.int32(k),
    slot=jnp.int32(0),
  )
  return data, jax.random.PRNGKey(seed)


def test_gaussian_noise_has_the_given_std():
  std = 0.7
  tree = {"a": jnp.ones((100, 50)), "b": jnp.full((3000,), 5.0)}
  out = attacks.gaussian(std).poison_update(tree, jax.random.PRNGKey(3))
  flat = np.concatenate([np.asarray(a).ravel() for a in jax.tree.leaves(out)])
  n = flat.size
  assert abs(flat.mean()) < 5 * std / np.sqrt(n)
  # Sample variance of n normals: its sd is about std^2 sqrt(2 / n).
  assert abs(flat.var() - std**2) < 5 * std**2 * np.sqrt(2.0 / n)
  assert abs(np.corrcoef(flat[:4000], flat[4000:])[0, 1]) < 5 / np.sqrt(4000)


def test_gaussian_replaces_byzantine_updates_and_keeps_benign_ones():
  base = fl.fed_avg(MODEL, optax.sgd(LR))
  alg = attacks.with_attack(base, attacks.gaussian(0.7), BYZ)
  p0 = init_params()
  update, honest = jax.jit(alg.client_update), jax.jit(base.client_update)
  # Benign client 1: its honest update, bit for bit.
  data, rng = one_client(1)
  jax.tree.map(
    np.testing.assert_array_equal,
    update(p0, None, data, rng).update,
    honest(p0, None, data, rng).update,
  )
  # Byzantine clients 0 and 3: noise that ignores their data (same key,
  # different data -> the same vector), not their update.
  u0 = update(p0, None, *one_client(0, seed=9)).update
  u3 = update(p0, None, *one_client(3, seed=9)).update
  jax.tree.map(np.testing.assert_array_equal, u0, u3)
  h0 = honest(p0, None, *one_client(0, seed=9)).update
  assert not np.allclose(
    np.asarray(u0["Dense_0"]["kernel"]), np.asarray(h0["Dense_0"]["kernel"])
  )


# --------------------------------------------- omniscient attacks (ALIE/IPM)
def test_alie_z_max_is_the_papers_formula():
  n = np.array([50, 50, 20, 100, 7])
  f = np.array([24, 12, 4, 30, 1])
  s = np.floor(n / 2 + 1) - f
  want = scipy.stats.norm.ppf((n - s) / n)
  np.testing.assert_allclose(attacks.alie_z_max(n, f), want, atol=2e-4)


def benign_setup(seed=0, n=7, d=5):
  r = np.random.default_rng(seed)
  u = r.standard_normal((n, d))
  byz = np.zeros(n, bool)
  byz[[1, 4]] = True
  return u, byz


def test_alie_and_ipm_vectors_are_the_published_ones():
  u, byz = benign_setup()
  good = u[~byz]
  n, f = len(u), int(byz.sum())
  z = scipy.stats.norm.ppf((n - (np.floor(n / 2 + 1) - f)) / n)
  alie_ref = good.mean(0) - z * good.std(0, ddof=1)
  ipm_ref = -0.3 * good.mean(0)
  args = (
    jnp.asarray(u, jnp.float32),
    jnp.asarray(~byz),
    jnp.asarray(byz),
    jax.random.PRNGKey(0),
  )

  def sent(vec):  # Byzantine rows send vec, the others are untouched
    return np.where(byz[:, None], vec[None], u)

  np.testing.assert_allclose(
    attacks.alie().byzantine_update(*args), sent(alie_ref), rtol=1e-5, atol=1e-5
  )
  np.testing.assert_allclose(
    attacks.alie(z=1.5).byzantine_update(*args),
    sent(good.mean(0) - 1.5 * good.std(0, ddof=1)),
    rtol=1e-5,
    atol=1e-5,
  )
  np.testing.assert_allclose(
    attacks.ipm(0.3).byzantine_update(*args),
    sent(ipm_ref),
    rtol=1e-5,
    atol=1e-6,
  )


def run_aggregator(agg, updates, flags, weights, valid, blocks):
  """Feeds ``updates`` through init/add (one block per "device")/merge/
  finalize, as the engine does; returns the AggregatorOutput."""
  num_slots = len(weights)
  spec = attacks.FlaggedUpdate(
    update=jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape[1:], jnp.float32), updates
    ),
    byzantine=jax.ShapeDtypeStruct((), jnp.float32),
  )
  state = agg.init_state(spec)
  accs = []
  for rows in blocks:  # each "device" gets a block of slots plus padding
    rows = np.asarray(rows)
    pad = np.concatenate([rows, [0]])  # a padding entry at slot 0
    ok = np.concatenate([valid[rows], [False]])
    acc = agg.init(state, spec, num_slots)
    acc = agg.add(
      state,
      acc,
      attacks.FlaggedUpdate(
        update=jax.tree.map(
          lambda a, pad=pad: jnp.asarray(a[pad], jnp.float32), updates
        ),
        byzantine=jnp.asarray(flags[pad], jnp.float32),
      ),
      jnp.asarray(weights[pad], jnp.float32),
      jnp.asarray(ok),
      jnp.asarray(pad, jnp.int32),
    )
    accs.append(acc)
  merged = agg.merge(jax.tree.map(lambda *a: jnp.stack(a), *accs))
  out, _ = agg.finalize(state, merged, jax.random.PRNGKey(0))
  return out


@pytest.mark.parametrize("attack_name", ["alie", "ipm"])
def test_omniscient_aggregator_sends_the_vector_into_the_inner_mean(
  attack_name,
):
  u, byz = benign_setup(1, n=8, d=6)
  valid = np.ones(8, bool)
  valid[6] = False  # a slot nobody filled
  weights = np.array([3.0, 5.0, 2.0, 7.0, 1.0, 4.0, 9.0, 6.0])
  updates = {"a": u[:, :4].reshape(8, 2, 2), "b": u[:, 4:]}
  attack = attacks.alie() if attack_name == "alie" else attacks.ipm(0.5)
  agg = attacks.omniscient_aggregator(aggs.weighted_mean(), attack)
  assert agg.materialized
  run = functools.partial(
    run_aggregator,
    agg,
    updates,
    byz.astype(np.float32),
    weights,
    valid,
    [[0, 2, 4, 6], [1, 3, 5, 7]],
  )
  out = jax.jit(run)()
  good = u[valid & ~byz]
  n, f = int(valid.sum()), int((valid & byz).sum())
  if attack_name == "alie":
    z = scipy.stats.norm.ppf((n - (np.floor(n / 2 + 1) - f)) / n)
    vec = good.mean(0) - z * good.std(0, ddof=1)
  else:
    vec = -0.5 * good.mean(0)
  sent = np.where(byz[:, None], vec[None], u)
  w = np.where(valid, weights, 0.0)
  want = (w[:, None] * sent).sum(0) / w.sum()
  got = np.concatenate(
    [np.asarray(out.mean["a"]).ravel(), np.asarray(out.mean["b"])]
  )
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert float(out.total_weight) == pytest.approx(w.sum())
  assert float(out.metrics["byzantine_slots"]) == f


def test_omniscient_aggregator_wraps_a_robust_inner_rule():
  u, byz = benign_setup(2, n=9, d=3)
  valid = np.ones(9, bool)
  weights = np.ones(9)
  agg = attacks.omniscient_aggregator(
    aggs.coordinate_median(), attacks.ipm(0.1)
  )
  out = run_aggregator(
    agg,
    {"w": u},
    byz.astype(np.float32),
    weights,
    valid,
    [list(range(5)), list(range(5, 9))],
  )
  vec = -0.1 * u[~byz].mean(0)
  sent = np.where(byz[:, None], vec[None], u)
  np.testing.assert_allclose(
    out.mean["w"], np.median(sent, axis=0), rtol=1e-5, atol=1e-6
  )


def test_omniscient_aggregator_rejects_unflagged_updates():
  agg = attacks.omniscient_aggregator(None, attacks.alie())
  with pytest.raises(TypeError, match="FlaggedUpdate"):
    agg.init_state({"w": jax.ShapeDtypeStruct((3,), jnp.float32)})


def test_with_attack_flags_only_byzantine_clients():
  base = fl.fed_avg(MODEL, optax.sgd(LR))
  alg = attacks.with_attack(base, attacks.alie(), BYZ)
  assert alg.aggregator is not None and alg.aggregator.materialized
  p0 = init_params()
  for k in (0, 1):
    data, rng = one_client(k)
    out = jax.jit(alg.client_update)(p0, None, data, rng)
    assert isinstance(out.update, attacks.FlaggedUpdate)
    assert float(out.update.byzantine) == float(BYZ[k])
    honest = base.client_update(p0, None, data, rng).update
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
      out.update.update,
      honest,
    )


# --------------------------------------------------------- select_attack
SELECTABLE = (
  attacks.no_attack(),
  attacks.sign_flip(2.0),
  attacks.scaling(3.0),
  attacks.label_flip(K),
  attacks.gaussian(0.5),
  attacks.ipm(0.2),
)


def test_select_attack_with_a_traced_index_is_each_attack():
  base = fl.fed_avg(MODEL, optax.sgd(LR))
  p0 = init_params()

  @jax.jit
  def selected(index, data, rng):
    alg = attacks.with_attack(
      base, attacks.select_attack(index, SELECTABLE), BYZ
    )
    return alg.client_update(p0, None, data, rng).update.update

  data, rng = one_client(0, seed=4)  # a Byzantine client
  for i, attack in enumerate(SELECTABLE):
    alone = (
      attacks.with_attack(base, attack, BYZ)
      .client_update(p0, None, data, rng)
      .update
    )
    if isinstance(alone, attacks.FlaggedUpdate):
      alone = alone.update
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
      selected(float(i), data, rng),
      alone,
    )


def test_select_attack_at_aggregation_time():
  u, byz = benign_setup(3)
  args = (
    jnp.asarray(u, jnp.float32),
    jnp.asarray(~byz),
    jnp.asarray(byz),
    jax.random.PRNGKey(0),
  )
  choice = (attacks.sign_flip(), attacks.ipm(0.3), attacks.alie())
  fn = jax.jit(
    lambda i: attacks.select_attack(i, choice).byzantine_update(*args)
  )
  np.testing.assert_allclose(fn(0), u, rtol=1e-6)  # client-side: untouched
  # jitted vs eager float32: equal up to rounding.
  np.testing.assert_allclose(
    fn(1), choice[1].byzantine_update(*args), rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(
    fn(2), choice[2].byzantine_update(*args), rtol=1e-5, atol=1e-6
  )
  with pytest.raises(ValueError, match="index"):
    attacks.select_attack(3, choice)


def test_combine_boosts_a_label_flipped_update():
  base = fl.fed_avg(MODEL, optax.sgd(LR))
  p0 = init_params()
  data, rng = one_client(0)  # Byzantine
  boosted = attacks.with_attack(
    base, attacks.combine(attacks.label_flip(K), attacks.scaling(3.0)), BYZ
  )
  flipped = attacks.with_attack(base, attacks.label_flip(K), BYZ)
  got = boosted.client_update(p0, None, data, rng).update
  want = flipped.client_update(p0, None, data, rng).update
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, 3.0 * b, rtol=1e-6), got, want
  )
  assert attacks.combine(attacks.alie(), name="x").byzantine_update is not None
  with pytest.raises(TypeError, match="Attack"):
    attacks.combine("alie")


def test_attack_arguments_are_checked_when_concrete_only():
  """A concrete argument is checked (naming it, what arrived and what was
  expected); a traced one (a hyperparameter of a vectorized sweep) passes."""
  with pytest.raises(
    ValueError, match=r"^scale must be a positive finite number, got -1\.0\.$"
  ):
    attacks.sign_flip(scale=-1.0)
  with pytest.raises(TypeError, match=r"factor must be a real number, got str"):
    attacks.scaling("10")
  with pytest.raises(
    ValueError,
    match=r"^fraction must be in \[0, 1\) \(the Byzantine fraction, e\.g\. "
    r"0\.2 for 20%\), got 1\.0\.$",
  ):
    attacks.byzantine_mask(10, 1.0)
  with pytest.raises(ValueError, match=r"num_clients must be a positive int"):
    attacks.byzantine_mask(0, 0.1)
  with pytest.raises(ValueError, match=r"^num_classes must be an int >= 2"):
    attacks.label_flip(True)
  u = {"w": jnp.arange(4.0)}
  key = jax.random.PRNGKey(0)
  flipped = jax.jit(lambda s: attacks.sign_flip(s).poison_update(u, key)["w"])(
    jnp.float32(2.5)
  )
  np.testing.assert_array_equal(np.asarray(flipped), -2.5 * np.arange(4.0))
  boosted = jax.vmap(lambda f: attacks.scaling(f).poison_update(u, key)["w"])(
    jnp.asarray([2.0, 3.0])
  )
  np.testing.assert_array_equal(
    np.asarray(boosted), np.outer([2.0, 3.0], np.arange(4.0))
  )


def test_omniscient_wrapper_keeps_the_inner_state_and_slots():
  """The wrapper keeps no state of its own: init_state is the inner
  aggregator's on the plain update spec, active_slots is the inner's."""
  inner = aggs.clipped(aggs.weighted_mean(), 1.0, adaptive=True)
  agg = attacks.omniscient_aggregator(inner, attacks.ipm(0.5))
  spec = {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}
  flagged = attacks.FlaggedUpdate(
    update=spec, byzantine=jax.ShapeDtypeStruct((), jnp.float32)
  )
  state = agg.init_state(flagged)
  want = inner.init_state(spec)
  assert jax.tree.structure(state) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert agg.active_slots is inner.active_slots and agg.materialized
  acc = agg.init(state, flagged, 4)
  assert acc["updates"]["w"].shape == (4, 3) and acc["byzantine"].shape == (4,)
