"""Client behaviour model and the event-driven float64 reference.

The behaviour model's draws are checked for determinism, their distributions
and the availability rules by hand; the reference's synchronous rounds,
FedBuff and FedAsync are replayed step by step on tiny hand-worked examples
with fixed latencies and a linear client update.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lite import systems
from fedjax_lite.systems import reference

DAY = 86400.0


# --------------------------------------------------------------------------
# Behaviour: determinism


def test_draws_are_a_function_of_seed_and_client():
  model = systems.ClientBehaviour(seed=3, jitter=0.2, dropout=0.3)
  ids = jnp.arange(50)
  perm = jnp.asarray(np.random.default_rng(0).permutation(50))
  for draw in (model.step_time, model.download_time, model.upload_time):
    np.testing.assert_array_equal(draw(ids), draw(ids))
    np.testing.assert_array_equal(draw(perm), draw(ids)[perm])
    other = getattr(systems.ClientBehaviour(seed=4), draw.__name__)(ids)
    assert not np.allclose(other, draw(ids))
  # vmapped over clients: each client draws alone, the same values.
  vmapped = jax.vmap(model.step_time)(ids)
  np.testing.assert_array_equal(vmapped, model.step_time(ids))
  key = systems.task_key(3, 5)
  a = model.task_times(ids, 10, 2.0, key)
  b = model.task_times(perm, 10, 2.0, key)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x)[np.asarray(perm)], y)
  # Per-task jitter changes with the task, the per-client speed does not.
  c = model.task_times(ids, 10, 2.0, systems.task_key(3, 6))
  assert not np.allclose(a.end, c.end)


def test_latency_formula_jit_and_vmap():
  model = systems.ClientBehaviour(seed=1)
  ids = jnp.arange(6)
  key = systems.task_key(1, 0)
  expected = (
    4.0
    + model.download_time(ids)
    + 7 * model.step_time(ids)
    + model.upload_time(ids)
  )
  np.testing.assert_allclose(model.latency(ids, 7, 4.0, key), expected, 1e-6)
  # Jitted and vmapped over start times: a shift of the eager result.
  ts = jnp.array([0.0, 1.0, 2.0])
  batched = jax.jit(jax.vmap(lambda t: model.latency(ids, 7, t, key)))(ts)
  np.testing.assert_allclose(
    batched, expected[None] + ts[:, None] - 4.0, rtol=1e-5
  )
  per_client = model.latency(ids, jnp.arange(6), 0.0, key)
  np.testing.assert_allclose(
    per_client,
    model.download_time(ids)
    + jnp.arange(6) * model.step_time(ids)
    + model.upload_time(ids),
    rtol=1e-6,
  )


# --------------------------------------------------------------------------
# Behaviour: distributions


def test_log_normal_mean_and_median():
  dist = systems.LogNormal(mu=math.log(0.05), sigma=0.8)
  model = systems.ClientBehaviour(seed=0, step_seconds=dist)
  x = np.asarray(jax.jit(model.step_time)(jnp.arange(100_000)), np.float64)
  assert dist.mean == pytest.approx(math.exp(math.log(0.05) + 0.32))
  assert x.mean() == pytest.approx(dist.mean, rel=0.02)
  assert np.median(x) == pytest.approx(dist.median, rel=0.02)
  from_median = systems.LogNormal.from_median(0.05, 0.8)
  assert from_median.mu == pytest.approx(dist.mu)


def _hill(x, k):
  """Hill's estimate of the tail index from the ``k`` largest draws."""
  x = np.sort(np.asarray(x, np.float64))[::-1]
  return k / np.log(x[:k] / x[k]).sum()


@pytest.mark.parametrize(
  "dist, index",
  [
    (systems.Pareto(scale=0.5, alpha=1.5), 1.5),
    (systems.LogLogistic(alpha=2.0, beta=2.5), 2.5),
  ],
)
def test_heavy_tail_index(dist, index):
  model = systems.ClientBehaviour(seed=2, upload_seconds=dist)
  x = np.asarray(jax.jit(model.upload_time)(jnp.arange(100_000)))
  assert _hill(x, 1000) == pytest.approx(index, rel=0.1)
  assert np.median(x) == pytest.approx(dist.median, rel=0.03)
  assert x.min() >= (dist.scale if isinstance(dist, systems.Pareto) else 0)


def test_dropout_rate_and_leave_time():
  # Fixed speeds (1 + 10 * 0.5 + 2 = 8 s a task) isolate the dropout draws.
  model = systems.ClientBehaviour(
    seed=5,
    step_seconds=systems.Constant(0.5),
    download_seconds=systems.Constant(1.0),
    upload_seconds=systems.Constant(2.0),
    dropout=0.3,
  )
  ids = jnp.arange(20_000)
  out = model.task_times(ids, 10, 100.0, systems.task_key(5, 0))
  dropped = ~np.asarray(out.completed)
  assert dropped.mean() == pytest.approx(0.3, abs=0.01)
  assert np.isinf(np.asarray(out.finish)[dropped]).all()
  end = np.asarray(out.end)
  np.testing.assert_array_equal(end[~dropped], 108.0)
  assert (end[dropped] >= 100.0).all() and (end[dropped] <= 108.0).all()
  # Leave times spread uniformly over the task: mean at the midpoint.
  assert (end[dropped] - 100.0).mean() == pytest.approx(4.0, abs=0.1)
  # Another task: other clients drop out, at the same rate.
  again = model.task_times(ids, 10, 100.0, systems.task_key(5, 1))
  other = ~np.asarray(again.completed)
  assert other.mean() == pytest.approx(0.3, abs=0.01)
  assert (dropped & other).mean() == pytest.approx(0.09, abs=0.01)


# --------------------------------------------------------------------------
# Behaviour: availability


def test_diurnal_one_time_zone_by_hand():
  model = systems.ClientBehaviour(
    availability=systems.Diurnal(online_fraction=0.25, time_zones=1)
  )
  ids = jnp.arange(3)
  # Online iff t mod 86400 < 21600 for every client (offset 0).
  for t, online, nxt in [
    (0.0, True, 0.0),
    (21599.0, True, 21599.0),
    (21600.0, False, DAY),
    (50000.0, False, DAY),
    (DAY + 100.0, True, DAY + 100.0),
  ]:
    np.testing.assert_array_equal(model.is_available(ids, t), [online] * 3)
    np.testing.assert_allclose(model.next_available(ids, t), [nxt] * 3)


def test_diurnal_time_zones_by_hand():
  availability = systems.Diurnal(online_fraction=0.5)
  model = systems.ClientBehaviour(seed=7, availability=availability)
  ids = jnp.arange(5)
  offsets = np.asarray(availability.offsets(7, ids), np.float64)
  hours = offsets / 3600.0
  np.testing.assert_array_equal(hours, np.round(hours))
  assert ((hours >= 0) & (hours < 24)).all()
  assert len(set(hours)) > 1
  for t in (0.0, 3600.0 * 5 + 1.0, 3600.0 * 13, 3600.0 * 30):
    local = (t + offsets) % DAY
    np.testing.assert_array_equal(model.is_available(ids, t), local < 43200.0)
    nxt = np.where(local < 43200.0, t, t + DAY - local)
    np.testing.assert_allclose(model.next_available(ids, t), nxt)
    later = model.is_available(ids, jnp.asarray(nxt, jnp.float32))
    assert np.asarray(later).all()


def test_diurnal_fraction_range():
  availability = systems.Diurnal(online_fraction=(0.2, 0.6), time_zones=None)
  f = np.asarray(availability.fractions(0, jnp.arange(1000)))
  assert f.min() >= 0.2 and f.max() <= 0.6 and f.std() > 0.05
  o = np.asarray(availability.offsets(0, jnp.arange(1000)))
  assert o.min() >= 0 and o.max() < DAY and len(np.unique(o)) > 900
  model = systems.ClientBehaviour(availability=availability)
  share = np.mean(
    [
      np.asarray(model.is_available(jnp.arange(1000), t)).mean()
      for t in np.linspace(0, DAY, 24, endpoint=False)
    ]
  )
  assert share == pytest.approx(0.4, abs=0.02)


def test_window_trace():
  windows = np.array(
    [
      [[0.0, 10.0], [20.0, 30.0]],
      [[5.0, 5.0], [50.0, np.inf]],
      [[np.inf, np.inf], [np.inf, np.inf]],
    ]
  )
  model = systems.ClientBehaviour(availability=systems.WindowTrace(windows))
  ids = jnp.arange(3)
  cases = [
    (0.0, [True, False, False], [0.0, 50.0, np.inf]),
    (5.0, [True, False, False], [5.0, 50.0, np.inf]),
    (10.0, [False, False, False], [20.0, 50.0, np.inf]),
    (29.0, [True, False, False], [29.0, 50.0, np.inf]),
    (30.0, [False, False, False], [np.inf, 50.0, np.inf]),
    (1e6, [False, True, False], [np.inf, 1e6, np.inf]),
  ]
  for t, online, nxt in cases:
    np.testing.assert_array_equal(model.is_available(ids, t), online)
    np.testing.assert_array_equal(model.next_available(ids, t), nxt)


@pytest.mark.parametrize("periodic", [True, False])
def test_slot_trace(periodic):
  online = np.array(
    [[1, 0, 0, 1], [0, 0, 0, 0], [0, 1, 0, 0]], bool
  )  # slots of 10 s
  trace = systems.SlotTrace(online, slot_seconds=10.0, periodic=periodic)
  model = systems.ClientBehaviour(availability=trace)
  ids = jnp.arange(3)
  np.testing.assert_array_equal(model.is_available(ids, 5.0), [1, 0, 0])
  np.testing.assert_array_equal(model.is_available(ids, 15.0), [0, 0, 1])
  np.testing.assert_array_equal(
    model.next_available(ids, 15.0), [30, np.inf, 15]
  )
  np.testing.assert_array_equal(
    model.next_available(ids, 21.0), [30, np.inf, 50 if periodic else np.inf]
  )
  if periodic:  # t = 45 is slot 4 = slot 0 of the second period
    np.testing.assert_array_equal(model.is_available(ids, 45.0), [1, 0, 0])
    np.testing.assert_array_equal(
      model.next_available(ids, 52.0), [70, np.inf, 52]
    )
  else:
    np.testing.assert_array_equal(model.is_available(ids, 45.0), [0, 0, 0])
    np.testing.assert_array_equal(model.next_available(ids, 45.0), [np.inf] * 3)
    np.testing.assert_array_equal(
      model.next_available(ids, -7.0), [0, np.inf, 10]
    )


# --------------------------------------------------------------------------
# Behaviour: bad input


@pytest.mark.parametrize(
  "make, match",
  [
    (
      lambda: systems.LogNormal(0.0, -0.1),
      r"LogNormal.sigma must be >= 0, got -0.1",
    ),
    (
      lambda: systems.LogNormal(math.nan, 1.0),
      r"LogNormal.mu must be a finite number, got nan",
    ),
    (
      lambda: systems.LogNormal(0.0, math.nan),
      r"LogNormal.sigma must be a finite number, got nan",
    ),
    (
      lambda: systems.LogNormal.from_median(-1.0, 0.5),
      r"LogNormal median must be > 0, got -1.0",
    ),
    (
      lambda: systems.Pareto(scale=1.0, alpha=0.0),
      r"Pareto.alpha must be > 0, got 0.0",
    ),
    (
      lambda: systems.Pareto(scale=-2.0, alpha=1.0),
      r"Pareto.scale must be > 0, got -2.0",
    ),
    (
      lambda: systems.LogLogistic(alpha=1.0, beta=-3.0),
      r"LogLogistic.beta must be > 0, got -3.0",
    ),
    (lambda: systems.Constant(-1.0), r"Constant.value must be >= 0, got -1.0"),
    (
      lambda: systems.Diurnal(online_fraction=0.0),
      r"Diurnal.online_fraction must lie in \(0, 1\], got 0.0",
    ),
    (
      lambda: systems.Diurnal(online_fraction=1.5),
      r"Diurnal.online_fraction must lie in \(0, 1\], got 1.5",
    ),
    (
      lambda: systems.Diurnal(online_fraction=(0.2, 1.2)),
      r"must lie in \(0, 1\], got \(0.2, 1.2\)",
    ),
    (
      lambda: systems.Diurnal(online_fraction=math.nan),
      r"Diurnal.online_fraction must be a finite number, got nan",
    ),
    (
      lambda: systems.Diurnal(online_fraction=(0.6, 0.2)),
      r"needs lo <= hi, got \(0.6, 0.2\)",
    ),
    (
      lambda: systems.Diurnal(period=-1.0),
      r"Diurnal.period must be > 0, got -1.0",
    ),
    (
      lambda: systems.Diurnal(time_zones=0),
      r"Diurnal.time_zones must be a positive int or None, got 0",
    ),
    (
      lambda: systems.WindowTrace(np.zeros((3, 2))),
      r"WindowTrace.windows has shape \(3, 2\), expected \[num_clients, num_windows, 2\]",
    ),
    (
      lambda: systems.WindowTrace(np.zeros((3, 2, 3))),
      r"has shape \(3, 2, 3\)",
    ),
    (
      lambda: systems.WindowTrace(np.full((2, 1, 2), 4.0)),
      r"WindowTrace.windows: no client is ever available",
    ),
    (
      lambda: systems.WindowTrace(np.array([[[5.0, 1.0]]])),
      r"WindowTrace.windows\[0, 0\] ends before it starts: \(5.0, 1.0\)",
    ),
    (
      lambda: systems.WindowTrace(np.array([[[math.nan, 1.0]]])),
      r"WindowTrace.windows contains NaN",
    ),
    (
      lambda: systems.SlotTrace(np.zeros((2, 3), bool), 1.0),
      r"SlotTrace.online: no client is ever available",
    ),
    (
      lambda: systems.SlotTrace(np.ones(3, bool), 1.0),
      r"SlotTrace.online has shape \(3,\), expected \[num_clients, num_slots\]",
    ),
    (
      lambda: systems.SlotTrace(np.ones((2, 3)), 1.0),
      r"SlotTrace.online must be boolean, got dtype float64",
    ),
    (
      lambda: systems.SlotTrace(np.ones((2, 3), bool), 0.0),
      r"SlotTrace.slot_seconds must be > 0, got 0.0",
    ),
    (
      lambda: systems.ClientBehaviour(dropout=1.5),
      r"ClientBehaviour.dropout must lie in \[0, 1\], got 1.5",
    ),
    (
      lambda: systems.ClientBehaviour(jitter=-0.1),
      r"ClientBehaviour.jitter must be >= 0, got -0.1",
    ),
    (
      lambda: systems.ClientBehaviour(step_seconds=0.1),
      r"ClientBehaviour.step_seconds must be a distribution",
    ),
  ],
)
def test_behaviour_bad_input(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_behaviour_bad_shapes():
  model = systems.ClientBehaviour()
  ids = jnp.arange(4)
  key = systems.task_key(0, 0)
  with pytest.raises(
    ValueError,
    match=r"num_steps has shape \(3,\), expected a scalar or client_ids' shape \(4,\)",
  ):
    model.latency(ids, jnp.ones(3), 0.0, key)
  with pytest.raises(
    ValueError,
    match=r"t_start has shape \(2,\), expected a scalar or client_ids' shape \(4,\)",
  ):
    model.latency(ids, 5, jnp.zeros(2), key)
  with pytest.raises(
    ValueError, match=r"t has shape \(5,\), expected a scalar"
  ):
    model.is_available(ids, jnp.zeros(5))
  with pytest.raises(
    ValueError, match=r"client_ids must be integers, got dtype float32"
  ):
    model.step_time(jnp.zeros(3))
  with pytest.raises(
    ValueError, match=r"key has shape \(3, 2\), expected one PRNGKey"
  ):
    model.latency(ids, 5, 0.0, jax.random.split(key, 3))


# --------------------------------------------------------------------------
# Reference: hand-worked examples


def _fixed(latency, dropouts=(), available_from=None):
  """A population with fixed latencies; ``dropouts``: (client, task) pairs."""
  latency = np.asarray(latency, np.float64)
  start = (
    np.zeros(len(latency))
    if available_from is None
    else np.asarray(available_from, np.float64)
  )

  def run_task(k, t, task):
    if (k, task) in dropouts:
      return t + 0.5, False
    return t + latency[k], True

  return reference.Population(
    num_clients=len(latency),
    run_task=run_task,
    is_available=lambda ids, t: start[ids] <= t,
    next_available=lambda ids, t: np.maximum(start[ids], t),
  )


TARGETS = np.array([[1.0, -1.0], [2.0, 0.0], [-3.0, 1.0], [0.5, 4.0]])


def _update(w, k, rng_seed):
  """Linear client: half a step towards its target; weight n_k = k + 1."""
  assert isinstance(rng_seed, int)
  return 0.5 * (w - TARGETS[k % 4]), float(k + 1)


def _delta(w, k):
  return _update(w, k, 0)[0]


def test_fedbuff_by_hand():
  # Three clients of latencies 1, 2, 3 s, all in flight (concurrency 3), so
  # each restarts from the current model the moment it arrives; K = 2.
  w0 = np.array([0.0, 0.0])
  s = lambda tau: 1 / math.sqrt(1 + tau)
  lr = 0.8
  out = reference.fedbuff(
    w0,
    _update,
    _fixed([1.0, 2.0, 3.0]),
    num_steps=3,
    concurrency=3,
    buffer_size=2,
    server_lr=lr,
    tau_max=1,
  )
  # t=1: c0 (from v0) buffered. t=2: c0 (from v0, restarted at t=1) fills
  # the buffer -> step 1; then c1 (from v0, tau 1) buffered, restarts from
  # v1. t=3: c0 (from v1, tau 0) -> step 2; c2 (from v0, tau 2 > tau_max)
  # is discarded. t=4: c0 (from v2, tau 0), c1 (from v1, tau 1) -> step 3.
  w1 = w0 - lr * (_delta(w0, 0) + _delta(w0, 0)) / 2
  w2 = w1 - lr * (s(1) * _delta(w0, 1) + _delta(w1, 0)) / 2
  w3 = w2 - lr * (_delta(w2, 0) + s(1) * _delta(w1, 1)) / 2
  assert [st.client_ids.tolist() for st in out.steps] == [
    [0, 0],
    [1, 0],
    [0, 1],
  ]
  assert [st.staleness.tolist() for st in out.steps] == [[0, 0], [1, 0], [0, 1]]
  assert [st.time for st in out.steps] == [2.0, 3.0, 4.0]
  assert [st.version for st in out.steps] == [1, 2, 3]
  assert out.stale == [(3.0, 2, 2)]
  for st, w in zip(out.steps, (w1, w2, w3)):
    np.testing.assert_allclose(st.params, w, rtol=1e-15)


def test_fedbuff_example_weighted_by_hand():
  w0 = np.array([1.0, 2.0])
  out = reference.fedbuff(
    w0,
    _update,
    _fixed([1.0, 2.0, 3.0]),
    num_steps=1,
    concurrency=3,
    buffer_size=3,
    staleness=reference.constant(),
    example_weighted=True,
  )
  # t=1 c0, t=2 c0 (restarted from v0) and c1: weights 1, 1, 2.
  want = w0 - (1 * _delta(w0, 0) + 1 * _delta(w0, 0) + 2 * _delta(w0, 1)) / 4
  assert out.steps[0].client_ids.tolist() == [0, 0, 1]
  np.testing.assert_allclose(out.steps[0].params, want, rtol=1e-15)


def test_fed_async_by_hand():
  w0 = np.array([0.0, 0.0])
  alpha = 0.5
  out = reference.fed_async(
    w0,
    _update,
    _fixed([1.0, 2.0, 3.0]),
    num_steps=5,
    concurrency=3,
    alpha=alpha,
    staleness=reference.polynomial(1.0),
  )

  def mix(w, w_start, k, tau):
    a = alpha / (1 + tau)
    return (1 - a) * w + a * (w_start - _delta(w_start, k))

  w1 = mix(w0, w0, 0, 0)  # t=1: c0 from v0
  w2 = mix(w1, w1, 0, 0)  # t=2: c0 from v1 (restarted at t=1)
  w3 = mix(w2, w0, 1, 2)  # t=2: c1 from v0; restarts from v3
  w4 = mix(w3, w2, 0, 1)  # t=3: c0 from v2
  w5 = mix(w4, w0, 2, 4)  # t=3: c2 from v0
  assert [st.client_ids.tolist() for st in out.steps] == [
    [0],
    [0],
    [1],
    [0],
    [2],
  ]
  assert [st.staleness.tolist() for st in out.steps] == [
    [0],
    [0],
    [2],
    [1],
    [4],
  ]
  assert [st.time for st in out.steps] == [1.0, 2.0, 2.0, 3.0, 3.0]
  for st, w in zip(out.steps, (w1, w2, w3, w4, w5)):
    np.testing.assert_allclose(st.params, w, rtol=1e-15)


def test_staleness_functions():
  assert reference.fedbuff_staleness()(3) == pytest.approx(0.5)
  assert reference.polynomial(2.0)(1) == pytest.approx(0.25)
  hinge = reference.hinge(a=2.0, b=3)
  assert [hinge(t) for t in (0, 3, 4, 6)] == [1.0, 1.0, 1 / 3, 1 / 7]


@pytest.mark.parametrize("deadline", [2.5, None])
def test_synchronous_over_selection_deadline_by_hand(deadline):
  # m = 2, r = 2: all 4 clients sampled. Latencies 3, 1, 5, 2 s; client 3
  # drops out of round 1 (leaving 0.5 s in).
  pop = _fixed([3.0, 1.0, 5.0, 2.0], dropouts={(3, 1)})
  w0 = np.array([1.0, -1.0])
  rounds = reference.synchronous(
    w0,
    _update,
    pop,
    num_rounds=3,
    clients_per_round=2,
    over_selection=2.0,
    deadline=deadline,
    server_lr=0.5,
  )

  def step(w, ks):
    n = np.array([k + 1.0 for k in ks])
    mean = sum(n_k * _delta(w, k) for n_k, k in zip(n, ks)) / n.sum()
    return w - 0.5 * mean

  w1 = step(w0, [1, 3])
  if deadline:  # round 1: c0 arrives 3 s after the start > 2.5: cut.
    ids1, dur1, w2 = [1], 2.5, step(w1, [1])
  else:
    ids1, dur1, w2 = [1, 0], 3.0, step(w1, [1, 0])
  w3 = step(w2, [1, 3])
  assert [sorted(r.selected.tolist()) for r in rounds] == [[0, 1, 2, 3]] * 3
  assert [r.client_ids.tolist() for r in rounds] == [[1, 3], ids1, [1, 3]]
  assert [r.duration for r in rounds] == [2.0, dur1, 2.0]
  assert [r.start for r in rounds] == [0.0, 2.0, 2.0 + dur1]
  np.testing.assert_array_equal(
    rounds[1].arrivals, 2.0 + np.array([1.0, 3.0][: len(ids1)])
  )
  for r, w in zip(rounds, (w1, w2, w3)):
    np.testing.assert_allclose(r.params, w, rtol=1e-15)


def test_synchronous_sampling_and_waiting_for_availability():
  # Nobody is online before t = 10; clients 4, 5 only from t = 1000.
  pop = _fixed([1.0] * 6, available_from=[10, 10, 10, 10, 1000, 1000])
  rounds = reference.synchronous(
    np.zeros(2),
    _update,
    pop,
    num_rounds=2,
    clients_per_round=2,
    over_selection=1.3,
    seed=4,
  )
  assert rounds[0].start == 10.0 and rounds[1].start == 11.0
  for r in rounds:
    assert len(r.selected) == 3 == len(set(r.selected.tolist()))
    assert set(r.selected.tolist()) <= {0, 1, 2, 3}
    assert len(r.client_ids) == 2 and r.duration == 1.0
  again = reference.synchronous(
    np.zeros(2),
    _update,
    pop,
    num_rounds=2,
    clients_per_round=2,
    over_selection=1.3,
    seed=4,
  )
  for a, b in zip(rounds, again):
    np.testing.assert_array_equal(a.selected, b.selected)


def test_all_clients_drop_out_without_deadline():
  pop = _fixed([1.0, 2.0], dropouts={(0, 0), (1, 0)})
  (r,) = reference.synchronous(
    np.ones(2),
    _update,
    pop,
    num_rounds=1,
    clients_per_round=1,
    over_selection=2.0,
  )
  assert r.client_ids.tolist() == [] and r.duration == 0.5
  np.testing.assert_array_equal(r.params, np.ones(2))


def test_fedbuff_waits_for_availability_and_records_dropouts():
  # Client 1 is online only from t = 100; c0 drops out of its first task.
  pop = _fixed([1.0, 1.0], dropouts={(0, 0)}, available_from=[0, 100])
  out = reference.fedbuff(
    np.zeros(2),
    _update,
    pop,
    num_steps=2,
    concurrency=2,
    buffer_size=1,
  )
  assert out.dropouts == [(0.5, 0)]
  # t=0.5: c0 restarts (task 1), arrives at 1.5 -> step 1; then at 100 c1
  # joins; c0 keeps cycling: arrivals at 2.5 -> step 2.
  assert [st.time for st in out.steps] == [1.5, 2.5]
  assert [st.client_ids.tolist() for st in out.steps] == [[0], [0]]


def test_reference_matches_behaviour_draws():
  model = systems.ClientBehaviour(
    seed=11,
    step_seconds=systems.Constant(2.0),
    download_seconds=systems.Constant(1.0),
    upload_seconds=systems.Constant(0.0),
    availability=systems.WindowTrace(
      np.array([[[5.0, 8.0]], [[6.0, 20.0]], [[50.0, 60.0]]])
    ),
  )
  pop = reference.from_behaviour(model, num_clients=3, num_steps=3)
  # Finish = t + 1 + 3 * 2: rounds start at t=5 (client 0 only), then t=12
  # (client 1 only).
  rounds = reference.synchronous(
    np.zeros(2), _update, pop, num_rounds=2, clients_per_round=1
  )
  assert [r.start for r in rounds] == [5.0, 12.0]
  assert [r.client_ids.tolist() for r in rounds] == [[0], [1]]
  # Random draws: the population's task times are the model's.
  model = systems.ClientBehaviour(seed=11, jitter=0.4, dropout=0.3)
  pop = reference.from_behaviour(model, num_clients=8, num_steps=5)
  want = model.task_times(jnp.arange(8), 5, 3.0, systems.task_key(11, 2))
  got = [pop.run_task(k, 3.0, 2) for k in range(8)]
  np.testing.assert_array_equal([e for e, _ in got], np.asarray(want.end))
  np.testing.assert_array_equal([c for _, c in got], np.asarray(want.completed))
  out = reference.fedbuff(
    np.zeros(2), _update, pop, num_steps=4, concurrency=3, buffer_size=2
  )
  assert len(out.steps) == 4
  assert np.all(np.diff([st.time for st in out.steps]) >= 0)


def test_fedbuff_on_a_diurnal_population():
  # 5% online a day, 12 clients: the clock must jump to the next window.
  model = systems.ClientBehaviour(
    seed=2,
    availability=systems.Diurnal(online_fraction=0.05),
    dropout=0.2,
  )
  pop = reference.from_behaviour(model, num_clients=12, num_steps=20)
  out = reference.fedbuff(
    np.zeros(2),
    _update,
    pop,
    num_steps=6,
    concurrency=3,
    buffer_size=2,
    seed=1,
  )
  assert len(out.steps) == 6
  times = [st.time for st in out.steps]
  assert times == sorted(times)
  started = np.array([d[0] for d in out.dispatches])
  who = np.array([d[1] for d in out.dispatches])
  # Every task started when its client was online (up to float32 rounding).
  nxt = [pop.next_available(np.array([k]), t)[0] for t, k in zip(started, who)]
  np.testing.assert_allclose(nxt, started, rtol=0, atol=1e-2)
  assert [d[2] for d in out.dispatches] == list(range(len(out.dispatches)))
  for st in out.steps:
    assert (st.staleness >= 0).all()


# --------------------------------------------------------------------------
# Reference: bad input


def test_reference_bad_input():
  pop = _fixed([1.0, 2.0, 3.0])
  w = np.zeros(2)
  with pytest.raises(
    ValueError, match=r"concurrency \(2\) must be >= buffer_size K \(3\)"
  ):
    reference.fedbuff(w, _update, pop, 1, concurrency=2, buffer_size=3)
  with pytest.raises(
    ValueError, match=r"buffer_size \(K\) must be >= 1, got 0"
  ):
    reference.fedbuff(w, _update, pop, 1, concurrency=2, buffer_size=0)
  for tau_max in (0, -2):
    with pytest.raises(
      ValueError,
      match=rf"tau_max must be a positive int or None \(no bound\), got {tau_max}",
    ):
      reference.fedbuff(w, _update, pop, 1, 2, 1, tau_max=tau_max)
    with pytest.raises(
      ValueError,
      match=rf"tau_max must be a positive int or None \(no bound\), got {tau_max}",
    ):
      reference.fed_async(w, _update, pop, 1, 2, 0.5, tau_max=tau_max)
  with pytest.raises(
    ValueError, match=r"concurrency \(4\) exceeds the population \(3 clients\)"
  ):
    reference.fedbuff(w, _update, pop, 1, concurrency=4, buffer_size=1)
  with pytest.raises(
    ValueError, match=r"alpha must be a number > 0.0, got 0.0"
  ):
    reference.fed_async(w, _update, pop, 1, 2, alpha=0.0)
  with pytest.raises(ValueError, match=r"alpha must lie in \(0, 1\], got 1.5"):
    reference.fed_async(w, _update, pop, 1, 2, alpha=1.5)
  with pytest.raises(
    ValueError, match=r"deadline must be a number > 0.0, got 0.0"
  ):
    reference.synchronous(w, _update, pop, 1, 2, deadline=0.0)
  with pytest.raises(
    ValueError, match=r"over_selection must be a number >= 1.0, got 0.5"
  ):
    reference.synchronous(w, _update, pop, 1, 2, over_selection=0.5)
  with pytest.raises(
    ValueError, match=r"clients_per_round must be >= 1, got 0"
  ):
    reference.synchronous(w, _update, pop, 1, 0)
  with pytest.raises(ValueError, match=r"num_rounds must be >= 0, got -1"):
    reference.synchronous(w, _update, pop, -1, 1)
  with pytest.raises(ValueError, match=r"num_steps must be >= 0, got -1"):
    reference.fedbuff(w, _update, pop, -1, concurrency=2, buffer_size=1)
  with pytest.raises(ValueError, match=r"t_start must be finite, got inf"):
    reference.fedbuff(w, _update, pop, 1, 2, 1, t_start=math.inf)
  with pytest.raises(
    ValueError, match=r"horizon must be a number >= 5.0, got 1.0"
  ):
    reference.fedbuff(w, _update, pop, 1, 2, 1, t_start=5.0, horizon=1.0)
  with pytest.raises(ValueError, match=r"a must be a number >= 0.0, got -1.0"):
    reference.polynomial(-1.0)
  with pytest.raises(ValueError, match=r"population must be a Population"):
    reference.synchronous(w, _update, [1, 2], 1, 1)


def test_reference_no_client_available_within_horizon():
  late = _fixed([1.0, 1.0], available_from=[500.0, 700.0])
  never = _fixed([1.0, 1.0], available_from=[np.inf, np.inf])
  w = np.zeros(2)
  with pytest.raises(
    ValueError, match=r"no client is available between t=0.0 and horizon=100.0"
  ):
    reference.synchronous(w, _update, late, 1, 1, horizon=100.0)
  with pytest.raises(
    ValueError, match=r"no client is available between t=0.0 and horizon=inf"
  ):
    reference.synchronous(w, _update, never, 1, 1)
  with pytest.raises(
    ValueError, match=r"no client is available between t=0.0 and horizon=inf"
  ):
    reference.fedbuff(w, _update, never, 1, concurrency=2, buffer_size=1)
  with pytest.raises(
    ValueError, match=r"no client is available between t=0.0 and horizon=inf"
  ):
    reference.fed_async(w, _update, never, 1, concurrency=1, alpha=0.5)
  # With clients available later, a horizon stops the run instead.
  out = reference.fedbuff(
    w, _update, late, 5, concurrency=1, buffer_size=1, horizon=503.5
  )
  assert [st.time for st in out.steps] == [501.0, 502.0, 503.0]
