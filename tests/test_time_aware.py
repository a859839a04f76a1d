"""Time-aware engine rounds against the event-driven float64 reference.

DeadlineRounds (over-selection and a deadline), FedBuff and FedAsync run in
the jitted engine; fedjax_lite.systems.reference replays the same client
behaviour draws with a heap of finish times, one client at a time, and a
float64 numpy client update (full-batch local GD of logistic regression).
Every step must aggregate the same clients, at the same simulated time, to
the same parameters (relative 1e-6).
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_lite as fl
import reference as ref
from fedjax_lite import systems
from fedjax_lite.engine import time_aware as ta
from fedjax_lite.__main__ import main
from fedjax_lite.systems import reference as sysref

from experiment_files import EXPERIMENTS, load  # pylint: disable=g-bad-import-order

D, K = 4, 3
LR, EPOCHS = 0.3, 2
WORK = fl.LocalWork(batch_size=None, num_epochs=EPOCHS)


def _clients(num_clients, seed=0):
  r = np.random.default_rng(seed)
  sizes = r.integers(3, 15, num_clients)
  return [
    {
      "x": r.standard_normal((n, D)).astype(np.float32),
      "y": r.integers(0, K, n).astype(np.int32),
    }
    for n in sizes
  ]


def _vec(p):
  return np.concatenate(
    [
      np.asarray(p["Dense_0"]["kernel"], np.float64).ravel(),
      np.asarray(p["Dense_0"]["bias"], np.float64),
    ]
  )


def _update_fn(clients):
  """The reference's client: full-batch local GD in float64."""

  def grad(ws, x, y):
    return list(ref.logreg_loss_grad(ws[0], ws[1], x, y)[1:])

  def update(w, k, rng_seed):
    del rng_seed  # full-batch GD is deterministic
    ws = [w[: D * K].reshape(D, K), w[D * K :]]
    c = clients[k]
    new = ref.local_gd(grad, ws, c["x"].astype(np.float64), c["y"], LR, EPOCHS)
    new = np.concatenate([new[0].ravel(), new[1]])
    return w - new, float(len(c["y"]))

  return update


BEHAVIOUR = systems.ClientBehaviour(
  seed=3,
  step_seconds=systems.Pareto(0.05, 1.5),
  jitter=0.3,
  dropout=0.1,
  availability=systems.Diurnal(0.5, period=60.0, time_zones=4),
)


# Online 10% of each minute, at offsets spread over the minute: rounds often
# find nobody online and wait.
SPARSE = systems.ClientBehaviour(
  seed=5,
  step_seconds=systems.LogNormal(math.log(0.05), 1.0),
  download_seconds=systems.Constant(0.5),
  upload_seconds=systems.Constant(0.5),
  availability=systems.Diurnal(0.1, period=60.0, time_zones=None),
)


class Setup:
  """Clients, model, engine and data. The tests against the reference keep
  the data's size buckets (3 of them); the others, whose property does not
  depend on the data layout, ask for one (``buckets=1``): the client work
  of a round is then one loop in the compiled step, not three."""

  def __init__(
    self, num_clients, clients_per_round, server_opt, behaviour, buckets="auto"
  ):
    self.clients = _clients(num_clients)
    self.model = fl.models.logistic_regression(D, K)
    self.params = ref.logreg_params(D, K)
    self.engine = fl.Engine(
      fl.fed_avg(self.model, optax.sgd(LR), server_opt),
      fl.RoundConfig(clients_per_round, WORK),
    )
    self.data = self.engine.put_data(
      fl.FederatedDataset.from_clients(self.clients), buckets
    )
    steps = np.asarray(ta.local_steps(WORK, self.data.counts))
    self.population = sysref.from_behaviour(behaviour, num_clients, steps)
    self.update = _update_fn(self.clients)
    self.w0 = _vec(self.params)

  def steps(self, rounds, state, num):
    out = []
    for _ in range(num):
      state, metrics = rounds.round(state, self.data)
      out.append((state, metrics))
    return out


def _assert_params(got, want):
  np.testing.assert_allclose(
    _vec(got), want, rtol=1e-6, atol=1e-6 * np.abs(want).max()
  )


@pytest.mark.parametrize("variant", ["plain", "weighted_hinge", "sparse"])
def test_fedbuff_equals_the_reference(variant):
  behaviour = SPARSE if variant == "sparse" else BEHAVIOUR
  s = Setup(12, 3, optax.sgd(0.8), behaviour)
  staleness, weighted = None, False
  if variant == "weighted_hinge":
    staleness, weighted = sysref.hinge(a=1.0, b=1), True
  rounds = ta.fedbuff(
    s.engine,
    behaviour,
    concurrency=5,
    tau_max=3,
    staleness=staleness,
    example_weighted=weighted,
  )
  num = 24
  got = s.steps(rounds, rounds.init(s.params, data=s.data), num)
  want = sysref.fedbuff(
    s.w0,
    s.update,
    s.population,
    num_steps=num,
    concurrency=5,
    buffer_size=3,
    server_lr=0.8,
    staleness=staleness,
    tau_max=3,
    example_weighted=weighted,
  )
  assert len(want.steps) == num
  for (state, metrics), step in zip(got, want.steps):
    assert np.asarray(state.last_ids).tolist() == step.client_ids.tolist()
    assert float(metrics["clock"]) == step.time
    assert float(metrics["staleness_max"]) == step.staleness.max()
    _assert_params(state.engine.server.params, step.params)
  # The draws exercised dropouts (or waiting) and staleness.
  stalest = max(st.staleness.max() for st in want.steps)
  assert stalest >= (1 if behaviour is SPARSE else 2)
  if behaviour is SPARSE:  # clients started when they came online
    started = sorted({d[0] for d in want.dispatches})
    assert len(started) > num
  else:
    assert want.dropouts
  last = got[-1][1]
  assert int(last["client_tasks"]) == len(want.dispatches)
  assert int(last["client_updates"]) == 3 * num


def test_fed_async_equals_the_reference():
  s = Setup(10, 1, None, BEHAVIOUR)
  rounds = ta.fed_async(
    s.engine,
    BEHAVIOUR,
    concurrency=4,
    tau_max=6,
    alpha=0.6,
    staleness=sysref.polynomial(0.5),
  )
  num = 22
  got = s.steps(rounds, rounds.init(s.params, data=s.data), num)
  want = sysref.fed_async(
    s.w0,
    s.update,
    s.population,
    num_steps=num,
    concurrency=4,
    alpha=0.6,
    staleness=sysref.polynomial(0.5),
    tau_max=6,
  )
  for (state, metrics), step in zip(got, want.steps):
    assert np.asarray(state.last_ids).tolist() == step.client_ids.tolist()
    assert float(metrics["clock"]) == step.time
    _assert_params(state.engine.server.params, step.params)
  assert max(st.staleness.max() for st in want.steps) >= 2


@pytest.mark.parametrize(
  "deadline, behaviour",
  [(9.0, BEHAVIOUR), (None, BEHAVIOUR), (2.0, SPARSE)],
  ids=["deadline", "no_deadline", "sparse_availability"],
)
def test_deadline_rounds_equal_the_reference(deadline, behaviour):
  s = Setup(12, 3, optax.sgd(0.8), behaviour)
  rounds = ta.DeadlineRounds(
    s.engine, behaviour, over_selection=1.7, deadline=deadline
  )
  num = 20
  got = s.steps(rounds, rounds.init(s.params, data=s.data), num)
  want = sysref.synchronous(
    s.w0,
    s.update,
    s.population,
    num_rounds=num,
    clients_per_round=3,
    over_selection=1.7,
    deadline=deadline,
    server_lr=0.8,
  )
  for (state, metrics), r in zip(got, want):
    assert np.asarray(state.last_ids)[: len(r.client_ids)].tolist() == (
      r.client_ids.tolist()
    )
    assert int(metrics["aggregated"]) == len(r.client_ids)
    assert int(metrics["selected"]) == len(r.selected)
    assert float(metrics["round_start"]) == r.start
    assert float(metrics["round_duration"]) == pytest.approx(
      r.duration, rel=1e-6
    )
    _assert_params(state.engine.server.params, r.params)
  if deadline is not None:  # the deadline cut some rounds short
    assert any(len(r.client_ids) < 3 for r in want)
  if behaviour is SPARSE:  # some rounds waited for a client to come online
    ends = [r.start + r.duration for r in want]
    assert any(b.start > e for e, b in zip(ends, want[1:]))


def test_deadline_round_with_nobody_on_time_keeps_the_model():
  s = Setup(6, 2, optax.sgd(1.0, momentum=0.9), BEHAVIOUR, buckets=1)
  rounds = ta.DeadlineRounds(s.engine, BEHAVIOUR, deadline=1e-3)
  state = rounds.init(s.params, data=s.data)
  new, metrics = rounds.round(state, s.data)
  assert int(metrics["aggregated"]) == 0
  assert float(metrics["round_duration"]) == pytest.approx(1e-3, rel=1e-3)
  _assert_params(new.engine.server.params, s.w0)
  assert np.asarray(new.last_ids).tolist() == [-1, -1]


def test_resume_is_bit_exact():
  s = Setup(8, 2, optax.adam(0.05), BEHAVIOUR, buckets=1)
  rounds = ta.fedbuff(s.engine, BEHAVIOUR, concurrency=4, tau_max=2)
  start = rounds.init(s.params, data=s.data)
  half = start
  for _ in range(3):
    half, _ = rounds.round(half, s.data)
  host = jax.device_get(half)  # as a checkpoint would hold it
  # round() consumes the state's ring buffer (donated): copy to reuse it.
  straight = jax.tree.map(jnp.copy, half)
  resumed = jax.device_put(host, rounds.engine.replicated)
  for _ in range(3):
    straight, _ = rounds.round(straight, s.data)
    resumed, _ = rounds.round(resumed, s.data)
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_fedbuff_composes_with_clipping():
  s = Setup(8, 2, optax.sgd(1.0), BEHAVIOUR, buckets=1)
  clipped = fl.Engine(
    fl.fed_avg(
      s.model,
      optax.sgd(LR),
      aggregator=fl.aggregators.clipped(fl.aggregators.weighted_mean(), 0.05),
    ),
    fl.RoundConfig(2, WORK),
  )
  rounds = ta.fedbuff(clipped, BEHAVIOUR, concurrency=4, tau_max=3)
  state, metrics = rounds.run(rounds.init(s.params, data=s.data), s.data, 3)
  moved = np.abs(_vec(state.engine.server.params) - s.w0).max()
  # Three steps of clipped updates: no coordinate moves more than 3 x 0.05.
  assert 0 < moved <= 3 * 0.05 + 1e-6
  assert np.isfinite(np.asarray(metrics["clock"])).all()


def test_fedbuff_composes_with_compression():
  s = Setup(8, 2, optax.sgd(1.0), BEHAVIOUR, buckets=1)
  alg = fl.compression.with_compression(
    fl.fed_avg(s.model, optax.sgd(LR)), fl.compression.top_k(0.25)
  )
  engine = fl.Engine(alg, fl.RoundConfig(2, WORK))
  rounds = ta.fedbuff(engine, BEHAVIOUR, concurrency=4, tau_max=3)
  state, metrics = rounds.run(rounds.init(s.params, data=s.data), s.data, 3)
  # Top-25% of 15 coordinates: each client sends fewer bytes than dense.
  assert 0 < float(metrics["uplink_bytes"][-1]) < 15 * 4
  # Sparse updates: at most 3 steps x 2 clients x 4 coordinates moved.
  moved = np.abs(_vec(state.engine.server.params) - s.w0) > 0
  assert 0 < moved.sum() <= 3 * 2 * 4


def test_bad_input():
  s = Setup(6, 3, optax.sgd(1.0), BEHAVIOUR)
  with pytest.raises(ValueError, match=r"concurrency \(2\) must be >= K"):
    ta.fedbuff(s.engine, BEHAVIOUR, concurrency=2, tau_max=3)
  with pytest.raises(ValueError, match=r"tau_max must be a positive int"):
    ta.fedbuff(s.engine, BEHAVIOUR, concurrency=4, tau_max=0)
  with pytest.raises(ValueError, match=r"concurrency \(7\) exceeds the popu"):
    ta.fedbuff(s.engine, BEHAVIOUR, concurrency=7, tau_max=3).init(
      s.params, data=s.data
    )
  with pytest.raises(ValueError, match=r"Constant.value must be >= 0"):
    systems.ClientBehaviour(step_seconds=systems.Constant(-1.0))
  with pytest.raises(ValueError, match=r"Constant.value must be a finite"):
    systems.ClientBehaviour(upload_seconds=systems.Constant(math.nan))
  with pytest.raises(ValueError, match=r"LogNormal.sigma"):
    systems.LogNormal(0.0, math.nan)
  with pytest.raises(ValueError, match=r"no client is ever available"):
    systems.SlotTrace(np.zeros((6, 4), bool), 60.0)
  # A trace whose windows all lie in the past, or that misses clients.
  past = systems.ClientBehaviour(
    availability=systems.WindowTrace(np.tile([[[0.0, 5.0]]], (6, 1, 1)))
  )
  with pytest.raises(ValueError, match=r"no client of the 6 is ever avail"):
    ta.DeadlineRounds(s.engine, past).init(s.params, data=s.data, t_start=10)
  short = systems.ClientBehaviour(
    availability=systems.SlotTrace(np.ones((4, 2), bool), 60.0)
  )
  with pytest.raises(ValueError, match=r"trace covers 4 clients but the data"):
    ta.fedbuff(s.engine, short, concurrency=4, tau_max=3).init(
      s.params, data=s.data
    )
  with pytest.raises(ValueError, match=r"over_selection must be a finite"):
    ta.DeadlineRounds(s.engine, BEHAVIOUR, over_selection=0.5)
  with pytest.raises(ValueError, match=r"deadline must be a positive"):
    ta.DeadlineRounds(s.engine, BEHAVIOUR, deadline=-1.0)
  with pytest.raises(ValueError, match=r"clients_per_round must be 1, got 3"):
    ta.fed_async(s.engine, BEHAVIOUR, concurrency=4, tau_max=3, alpha=0.5)
  one = fl.Engine(s.engine.algorithm, fl.RoundConfig(1, WORK))
  with pytest.raises(ValueError, match=r"alpha must be a number in \(0, 1\]"):
    ta.fed_async(one, BEHAVIOUR, concurrency=4, tau_max=3, alpha=1.5)
  median = fl.Engine(
    fl.fed_avg(
      s.model, optax.sgd(LR), aggregator=fl.aggregators.coordinate_median()
    ),
    fl.RoundConfig(3, WORK),
  )
  with pytest.raises(ValueError, match=r"FedBuff does not compose with agg"):
    ta.fedbuff(median, BEHAVIOUR, concurrency=4, tau_max=3)
  for agg, match in [
    (fl.privacy.dp_aggregator(1.0, 3, clip=1.0), "ignores client weights"),
    (
      fl.privacy.dp_aggregator(1.0, 3, sampling="fixed", population=6),
      "DP accounting assumes uniform sampling",
    ),
  ]:
    dp = fl.Engine(
      fl.fed_avg(s.model, optax.sgd(LR), aggregator=agg),
      fl.RoundConfig(3, WORK),
    )
    with pytest.raises(ValueError, match=match):
      ta.fedbuff(dp, BEHAVIOUR, concurrency=4, tau_max=3)
  accounted = fl.Engine(
    fl.fed_avg(
      s.model,
      optax.sgd(LR),
      aggregator=fl.privacy.dp_aggregator(
        1.0, 3, sampling="fixed", population=6
      ),
    ),
    fl.RoundConfig(3, WORK),
  )
  with pytest.raises(ValueError, match=r"DeadlineRounds does not compose"):
    ta.DeadlineRounds(accounted, BEHAVIOUR)


def test_every_client_dropping_out_is_an_error_not_a_hang():
  s = Setup(6, 2, optax.sgd(1.0), BEHAVIOUR, buckets=1)
  gone = systems.ClientBehaviour(dropout=1.0)
  rounds = ta.fedbuff(s.engine, gone, concurrency=3, tau_max=2, max_events=50)
  with pytest.raises(ValueError, match=r"handled 50 events without filling"):
    rounds.round(rounds.init(s.params, data=s.data), s.data)


def test_experiment_time_to_target_and_configs():
  module = load("time_aware_digits")
  assert module.get_config("smoke") != module.get_config()
  rows = [
    {"test_accuracy": a, "clock": t, "client_updates": u, "client_tasks": n}
    for a, t, u, n in [(0.1, 0, 0, 0), (0.8, 50.0, 10, 12), (0.9, 90.0, 20, 25)]
  ]
  assert module.time_to_target(rows, 0.85) == {
    "seconds": 90.0,
    "client_updates": 20,
    "client_tasks": 25,
  }
  assert module.time_to_target(rows, 0.95) is None


@pytest.mark.slow  # the notebook 10_time_aware runs the same API by default
def test_experiment_smoke(tmp_path, capsys):
  path = EXPERIMENTS / "time_aware_digits.py"
  assert main(["run", f"{path}:smoke", "--out", str(tmp_path)]) == 0
  (run_dir,) = tmp_path.iterdir()
  summary = json.loads(capsys.readouterr().out.rsplit("run folder:", 1)[0])
  assert set(summary["methods"]) == set(load("time_aware_digits").METHODS)
  for f in ("metrics.jsonl", "curves.png", "summary.json"):
    assert (run_dir / f).stat().st_size > 0, f
  rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").open()]
  for name in summary["methods"]:
    mine = [r for r in rows if r["method"] == name]
    assert mine[-1]["client_updates"] >= 40
    assert all(np.diff([r["clock"] for r in mine]) > 0)


def test_a_nan_client_is_not_counted_as_an_update():
  s = Setup(6, 6, optax.sgd(1.0), BEHAVIOUR)
  s.clients[2]["x"][:] = 3e38  # overflows: client 2's update is NaN
  data = s.engine.put_data(
    fl.FederatedDataset.from_clients(s.clients), buckets=1
  )  # one size bucket, as the other tests not against the reference
  rounds = ta.DeadlineRounds(s.engine, systems.ClientBehaviour(seed=1))
  state, metrics = rounds.round(rounds.init(s.params, data=data), data)
  assert int(metrics["aggregated"]) == 6  # all six arrived
  assert float(metrics["dropped_nonfinite"]) == 1
  assert int(metrics["client_updates"]) == int(state.updates) == 5
  assert np.isfinite(_vec(state.engine.server.params)).all()
