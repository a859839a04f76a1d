r"""Rounds on a simulated clock, inside the jitted engine.

Two round types drive an :class:`~fedjax_lite.engine.Engine` with a
:class:`~fedjax_lite.systems.ClientBehaviour` (client speeds, network delays,
availability, dropout):

* :class:`DeadlineRounds`: synchronous rounds that know time (Bonawitz et
  al. 2019): a round starting at ``t_r`` samples ``ceil(r m)`` available
  clients (over-selection), aggregates the first ``m`` to arrive within the
  deadline and lasts until the ``m``-th arrival (else the deadline, else the
  last sampled client's end).
* :class:`AsyncRounds`: asynchronous aggregation as engine rounds. FedBuff
  (Nguyen et al. 2022): ``concurrency`` clients in flight, each server step
  aggregates the next ``K`` accepted arrivals,

  .. math:: w \leftarrow \mathrm{ServerOpt}\Big(w,\;
     \bar\Delta = \frac{\sum_i b_i s(\tau_i) \Delta_i}{\sum_i b_i}\Big),

  with ``b_i = 1`` (FedBuff's unweighted mean) or ``n_i``
  (``example_weighted``), staleness ``tau_i`` = server steps since client
  ``i`` downloaded the model, ``s`` a staleness weight (FedBuff's
  ``1/sqrt(1+tau)``, polynomial, hinge; :mod:`fedjax_lite.systems.reference`)
  and arrivals with ``tau > tau_max`` discarded. FedAsync (Xie et al. 2019)
  is ``K = 1`` with mixing ``w <- (1 - a) w + a w_client``, ``a = alpha
  s(tau)``.

The schedule is simulated inside the jitted step: who starts when (the
available idle client of smallest
:meth:`~fedjax_lite.systems.ClientBehaviour.sampling_priority`), who arrives
when (``task_times``) and in which order, exactly as the float64 event-driven
reference :mod:`fedjax_lite.systems.reference` does it with a heap (the
tests compare the two). A client's result does not depend on when it is
computed, only on the model it downloaded, so a server step trains exactly
its ``K`` arriving clients, vmapped like a round of ``K``, each from the
model version it started on: the last ``tau_max + 1`` broadcasts are kept in
a ring buffer (memory ``O(tau_max x model)``, not ``O(concurrency x
model)``). Clients that drop out, miss the deadline or arrive too stale are
never trained. The scheduler's state is ``O(population + concurrency)``.

What composes: every algorithm whose ``client_update`` returns a
pseudo-gradient, server optimizers from optax (FedBuff), client-side
compression (``fl.compression.with_compression``), and streaming
aggregators that weigh clients (the weighted mean, ``clipped``). Refused,
with the reason: aggregators bound to the run's sampling (DP with
accounting, whose epsilon assumes uniform sampling of ``clients_per_round``
clients, which availability, deadlines and asynchrony do not give), and, for
FedBuff and FedAsync, aggregators that ignore client weights (median,
trimmed mean, Krum, geometric median, the unweighted mean, DP's fixed
denominator), since staleness weights enter through the client weights.
FedAsync mixes models and takes the weighted mean only.

Time is float32 (JAX's default float): at about a day of simulated time the
clock carries errors of a few milliseconds.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lite import checks
from fedjax_lite.algorithms.base import (
  Aggregate,
  ClientOutput,
  FederatedAlgorithm,
  tree_select,
)
from fedjax_lite.data.batching import DeviceData, LocalWork
from fedjax_lite.engine.blocks import GivenSample
from fedjax_lite.engine.round import Engine, EngineState
from fedjax_lite.systems import behaviour as behaviour_lib
from fedjax_lite.systems import reference

PyTree = Any
# Client metric carrying b_i (popped from the step's metrics).
_BASE_WEIGHT = "_staleness_base_weight"
# Why a step stopped (host raises for the last two).
_RUNNING, _DONE, _NEVER, _TOO_MANY = 0, 1, 2, 3


# Streaming aggregators whose mean ignores the client weights.
_WEIGHT_FREE = re.compile(r"\b(unweighted_mean|dp|dp_adaptive|local_dp)\b")


@flax.struct.dataclass
class TimedState:
  """Everything a time-aware round reads and writes (a pytree).

  Attributes:
    engine: the engine's state (``engine.round``: rounds, or server steps =
      the model version).
    clock: float32 simulated seconds.
    tasks: int32, client tasks started so far (every sampled or dispatched
      client, whether or not its update was used).
    updates: int32, client updates aggregated so far.
    last_ids: int32 ``[clients_per_round]``: the clients the last round
      aggregated, in arrival order (``-1``: none).
    ring: asynchronous only: broadcasts of the last ``tau_max + 1`` model
      versions, leaves ``[tau_max + 1, ...]`` (version ``v`` in row ``v mod
      (tau_max + 1)``).
    flight: asynchronous only: the clients in flight, ``[concurrency]``
      arrays ``client``, ``end``, ``completed``, ``version``, ``used``.
    busy: asynchronous only: bool ``[population]``, in flight.
  """

  engine: EngineState
  clock: jax.Array
  tasks: jax.Array
  updates: jax.Array
  last_ids: jax.Array
  ring: PyTree = None
  flight: PyTree = None
  busy: jax.Array | None = None


def local_steps(local_work: LocalWork, counts) -> jax.Array:
  """int32 local steps of each client of ``counts`` examples: ``num_steps``,
  else ``num_epochs * ceil(n_k / batch_size)`` (one step per epoch for full
  batches). The behaviour model's compute time is ``steps * c_k``."""
  counts = jnp.asarray(counts, jnp.int32)
  if local_work.num_steps is not None:
    return jnp.full(counts.shape, local_work.num_steps, jnp.int32)
  if local_work.batch_size is None:
    per_epoch = jnp.ones_like(counts)
  else:
    b = local_work.batch_size
    per_epoch = (counts + b - 1) // b
  return local_work.num_epochs * per_epoch


def _stack1(tree):
  return jax.tree.map(lambda a: jnp.asarray(a)[None], tree)


def _unstack1(tree):
  return jax.tree.map(lambda a: a[0], tree)


def _check_behaviour(behaviour, num_clients: int, t_start: float) -> None:
  """Host side: the model covers the population and someone is ever online."""
  checks.instance_of("behaviour", behaviour, behaviour_lib.ClientBehaviour)
  trace = getattr(behaviour.availability, "num_clients", None)
  if trace is not None and trace < num_clients:
    raise ValueError(
      f"the availability trace covers {trace} clients but the data has "
      f"{num_clients}; give every client a row."
    )
  nxt = np.asarray(
    behaviour.next_available(jnp.arange(num_clients), jnp.float32(t_start))
  )
  if not np.isfinite(nxt).any():
    raise ValueError(
      f"no client of the {num_clients} is ever available at or after "
      f"t={t_start} under {type(behaviour.availability).__name__}; check "
      "the availability model or trace."
    )


def _check_aggregator(engine: Engine, what: str, weighted: bool) -> None:
  """Refuse aggregators whose guarantees the simulated clock breaks."""
  agg = engine.algorithm.aggregator
  if agg is None:
    return
  if agg.bind is not None or agg.active_slots is not None:
    raise ValueError(
      f"{what} does not compose with aggregator {agg.name!r}: it depends on "
      "the round's sampling (e.g. DP accounting assumes uniform sampling of "
      "clients_per_round clients), which availability, deadlines and "
      "asynchrony do not give."
    )
  if weighted and (
    agg.materialized or _WEIGHT_FREE.search(str(agg.name)) is not None
  ):
    raise ValueError(
      f"{what} does not compose with aggregator {agg.name!r}: it ignores "
      "client weights (order statistics of the updates, uniform means, DP's "
      "fixed denominator), so it would drop the staleness weights; use the "
      "weighted mean, clipping or compression."
    )


def _raise_status(status, what: str, max_events: int) -> None:
  status = np.asarray(jax.device_get(status)).reshape(-1)
  if (status == _NEVER).any():
    raise ValueError(
      f"{what}: no client is in flight and none will ever be available "
      "again; check the availability model or trace."
    )
  if (status == _TOO_MANY).any():
    raise ValueError(
      f"{what}: a server step handled {max_events} events without filling "
      "its buffer (do all clients drop out, or arrive staler than "
      "tau_max?); raise max_events or check the behaviour model."
    )


class _Timed:
  """What both round types share: engine, behaviour, jitted loops."""

  def __init__(self, engine: Engine, behaviour, what: str):
    checks.instance_of("engine", engine, Engine)
    checks.instance_of("behaviour", behaviour, behaviour_lib.ClientBehaviour)
    if engine.debug:
      raise ValueError(
        f"{what} runs jitted rounds only; use Engine(..., debug=False)."
      )
    _check_aggregator(engine, what, weighted=isinstance(self, AsyncRounds))
    self.behaviour = behaviour
    self.what = what
    # The ring buffer (asynchronous rounds) is donated: its new version is
    # written in place instead of copying tau_max + 1 models every step.
    self._step_jit = jax.jit(
      lambda ring, s, d: self.round_body(s.replace(ring=ring), d),
      donate_argnums=0,
    )
    self._run_jit = jax.jit(
      lambda ring, s, d, n: self._run_body(s.replace(ring=ring), d, n),
      static_argnums=3,
      donate_argnums=0,
    )

  def init(
    self,
    params: PyTree,
    seed: int = 0,
    *,
    data: DeviceData,
    t_start: float = 0.0,
  ) -> TimedState:
    """The initial state: the engine's (``engine.init(params, seed)``), the
    clock at ``t_start``, no task started (asynchronous rounds: version 0
    in the ring buffer, nobody in flight)."""
    t0 = checks.real("t_start", t_start)
    if not math.isfinite(t0):
      raise ValueError(f"t_start must be finite, got {t_start!r}.")
    n = data.num_clients
    self._check_population(n)
    _check_behaviour(self.behaviour, n, t0)
    engine_state = self.engine.init(params, seed, num_clients=n, data=data)
    zero = jnp.zeros((), jnp.int32)
    state = TimedState(
      engine=engine_state,
      clock=jnp.float32(t0),
      tasks=zero,
      updates=zero,
      last_ids=jnp.full((self.engine.config.clients_per_round,), -1, jnp.int32),
      **self._extra_state(engine_state, n),
    )
    return jax.device_put(state, self.engine.replicated)

  def _check_population(self, num_clients: int) -> None:
    del num_clients

  def _extra_state(self, engine_state: EngineState, num_clients: int):
    del engine_state, num_clients
    return {}

  def _checked(self, state, data):
    if not isinstance(state, TimedState):
      raise TypeError(
        f"state must be a TimedState (from {type(self).__name__}.init), got "
        f"{type(state).__name__}."
      )
    self.engine.check_inputs(state.engine, data)

  def round(self, state: TimedState, data: DeviceData):
    """One round (or server step), jitted; metrics include the clock.

    Asynchronous rounds consume ``state.ring`` (donated: updated in place);
    keep ``jax.tree.map(jnp.copy, state)`` to reuse a state."""
    self._checked(state, data)
    new, metrics = self._step_jit(state.ring, state.replace(ring=None), data)
    return new, self._finish(metrics, data)

  def run(self, state: TimedState, data: DeviceData, num_rounds: int):
    """``num_rounds`` rounds in one ``lax.scan``; metrics stacked."""
    checks.positive_int("num_rounds", num_rounds)
    self._checked(state, data)
    new, metrics = self._run_jit(
      state.ring, state.replace(ring=None), data, int(num_rounds)
    )
    return new, self._finish(metrics, data)

  def _finish(self, metrics, data):
    metrics = dict(metrics)
    _raise_status(metrics.pop("_status"), self.what, self._max_events)
    return self.engine.check_metrics(metrics, data)

  def _run_body(self, state, data, num_rounds):
    return jax.lax.scan(
      lambda s, _: self.round_body(s, data), state, None, length=num_rounds
    )

  def _steps(self, data: DeviceData) -> jax.Array:
    return local_steps(self.engine.config.local_work, data.counts)

  def _engine_round(self, engine_state, data, given):
    new, metrics = self.engine.rounds_body(
      _stack1(engine_state), data, given=given
    )
    return _unstack1((new, metrics))


# --------------------------------------------------------------------------
# Synchronous rounds with over-selection and a deadline


class DeadlineRounds(_Timed):
  """Synchronous rounds with over-selection and a deadline (module docs).

  Example::

    engine = Engine(fed_avg(model, optax.sgd(0.1)), RoundConfig(10))
    rounds = DeadlineRounds(engine, ClientBehaviour(seed=0),
                            over_selection=1.3, deadline=120.0)
    state = rounds.init(params, data=data)
    state, metrics = rounds.round(state, data)   # metrics["clock"], ...

  Round ``r`` samples from the available clients with the behaviour's
  ``sampling_priority(ids, r)`` and draws task times with ``task_key(seed,
  r)``; when nobody is online the round starts at the earliest next
  availability. A round that aggregates nobody leaves the server state
  unchanged. Metrics: the engine's, plus ``round_start``, ``clock`` (the
  round's end), ``round_duration``, ``selected``, ``aggregated``,
  ``dropouts``, ``missed_deadline``, ``client_tasks`` and
  ``client_updates`` (cumulative).

  Args:
    engine: the engine (``clients_per_round = m``).
    behaviour: the clients' speeds, delays, availability and dropout.
    over_selection: ``r >= 1``.
    deadline: seconds after the round's start (None: no deadline).
  """

  _max_events = 0

  def __init__(
    self,
    engine: Engine,
    behaviour,
    over_selection: float = 1.0,
    deadline: float | None = None,
  ):
    self.engine = engine
    super().__init__(engine, behaviour, "DeadlineRounds")
    self.over_selection = checks.in_range(
      "over_selection", over_selection, 1.0, math.inf
    )
    self.deadline = (
      None if deadline is None else checks.positive_float("deadline", deadline)
    )

  def round_body(self, state: TimedState, data: DeviceData):
    """One round as a pure, traceable function."""
    b, cfg = self.behaviour, self.engine.config
    n = data.num_clients
    m = cfg.clients_per_round
    num_sampled = min(math.ceil(self.over_selection * m), n)
    r = state.engine.round
    ids = jnp.arange(n, dtype=jnp.int32)
    t = state.clock
    avail = b.is_available(ids, t)
    nxt = b.next_available(ids, t)
    wait = ~avail.any()
    t_wait = jnp.min(nxt)
    t = jnp.where(wait, t_wait, t)
    avail = jnp.where(
      wait, (nxt <= t_wait) | b.is_available(ids, t_wait), avail
    )
    status = jnp.where(wait & ~jnp.isfinite(t_wait), _NEVER, _DONE).astype(
      jnp.int32
    )
    # Sample: the available clients of smallest priority.
    priority = jnp.where(avail, b.sampling_priority(ids, r), jnp.inf)
    selected = jnp.argsort(priority, stable=True)[:num_sampled]
    sel_ok = jnp.arange(num_sampled) < jnp.sum(avail)
    times = b.task_times(
      selected,
      self._steps(data)[selected],
      t,
      behaviour_lib.task_key(b.seed, r),
    )
    on_time = jnp.ones_like(sel_ok)
    if self.deadline is not None:
      on_time = (times.end - t) <= jnp.float32(self.deadline)
    ok = sel_ok & times.completed & on_time
    # Arrival order (ties: client id): the first m are aggregated.
    order = jnp.lexsort((selected, jnp.where(ok, times.end, jnp.inf)))[:m]
    count = jnp.minimum(jnp.sum(ok), m).astype(jnp.int32)
    given_ids = selected[order]
    full = count == m
    if self.deadline is not None:
      late_end = t + jnp.float32(self.deadline)
    else:
      late_end = jnp.max(jnp.where(sel_ok, times.end, -jnp.inf))
      late_end = jnp.maximum(late_end, t)
    t_next = jnp.where(full, times.end[order[m - 1]], late_end)
    given = GivenSample(ids=given_ids[None], count=count[None])
    new_engine, metrics = self._engine_round(state.engine, data, given)
    # Clients the engine really aggregated (a non-finite update is dropped).
    used = jnp.asarray(metrics["num_clients"]).astype(jnp.int32)
    new_engine = new_engine.replace(
      server=tree_select(used > 0, new_engine.server, state.engine.server)
    )
    num_sel = jnp.sum(sel_ok).astype(jnp.int32)
    tasks = state.tasks + num_sel
    updates = state.updates + used
    metrics = dict(metrics)
    metrics.update(
      round_start=t,
      clock=t_next,
      round_duration=t_next - t,
      selected=num_sel,
      aggregated=count,
      dropouts=jnp.sum(sel_ok & ~times.completed).astype(jnp.int32),
      missed_deadline=jnp.sum(sel_ok & times.completed & ~on_time).astype(
        jnp.int32
      ),
      client_tasks=tasks,
      client_updates=updates,
      _status=status,
    )
    slots = jnp.arange(m)
    new = TimedState(
      engine=new_engine,
      clock=t_next,
      tasks=tasks,
      updates=updates,
      last_ids=jnp.where(slots < count, given_ids, -1).astype(jnp.int32),
    )
    return new, metrics


# --------------------------------------------------------------------------
# Asynchronous aggregation: FedBuff and FedAsync


def staleness_weighted(
  algorithm: FederatedAlgorithm,
  example_weighted: bool = False,
  mixing: float | None = None,
) -> FederatedAlgorithm:
  r"""``algorithm`` with clients that receive ``(broadcast, s)`` and weigh
  their update by ``b_i s`` (``b_i``: 1, or ``n_i`` with
  ``example_weighted``); the server rescales the weighted mean to
  :math:`\sum_i b_i s_i \Delta_i / \sum_i b_i` before ``server_update``.

  With ``mixing = alpha`` (FedAsync, one client per step) the server instead
  mixes: ``w <- (1 - a) w + a (w_start - Delta)``, ``a = alpha s``, on the
  server state's ``params`` (its other fields are kept).
  """
  inner = algorithm

  def broadcast(server):
    return inner.broadcast(server), jnp.ones((), jnp.float32)

  def client_update(bcast, client_state, data, rng):
    params, s = bcast
    out = inner.client_update(params, client_state, data, rng)
    weight = jnp.asarray(out.weight, jnp.float32)
    base = weight if example_weighted else jnp.ones_like(weight)
    update = out.update
    if mixing is not None:  # u = Delta - w_start (the server adds w).
      update = jax.tree.map(lambda d, p: d - p, update, params)
    metrics = dict(out.metrics)
    metrics[_BASE_WEIGHT] = (base, jnp.ones((), jnp.float32))
    return ClientOutput(
      update=update, weight=base * s, state=out.state, metrics=metrics
    )

  def server_update(server, aggregate: Aggregate):
    metrics = dict(aggregate.metrics)
    base = metrics.pop(_BASE_WEIGHT)[0]
    scale = jnp.where(
      base > 0, aggregate.total_weight / jnp.maximum(base, 1e-30), 0.0
    )
    if mixing is not None:
      params = inner.get_params(server)
      a = mixing * scale
      mixed = jax.tree.map(lambda w, u: w - a * (w + u), params, aggregate.mean)
      mixed = tree_select(aggregate.num_clients > 0, mixed, params)
      return server.replace(params=mixed)
    mean = jax.tree.map(lambda x: x * scale.astype(x.dtype), aggregate.mean)
    return inner.server_update(
      server, aggregate._replace(mean=mean, metrics=metrics)
    )

  return inner._replace(
    broadcast=broadcast,
    client_update=client_update,
    server_update=server_update,
    name=f"{inner.name}+staleness",
  )


class AsyncRounds(_Timed):
  r"""FedBuff and FedAsync as engine rounds (module docs).

  Use :func:`fedbuff` or :func:`fed_async` to build one. Each
  :meth:`round` is one server step: the clock runs until ``K`` accepted
  arrivals (dispatching every freed slot to the available idle client of
  smallest ``sampling_priority(ids, task)``, task = dispatch number from 0),
  then those ``K`` clients train from the versions they downloaded and the
  server steps. Metrics: the engine's, plus ``clock`` (the step's time),
  ``step_duration``, ``staleness_mean``, ``staleness_max``, ``dropouts``,
  ``stale_discarded``, ``client_tasks`` and ``client_updates``
  (cumulative); the engine's ``total_weight`` is :math:`\sum_i b_i
  s(\tau_i)`.
  """

  def __init__(
    self,
    engine: Engine,
    behaviour,
    concurrency: int,
    tau_max: int,
    staleness: Callable | None = None,
    example_weighted: bool = False,
    mixing: float | None = None,
    max_events: int | None = None,
  ):
    what = "FedAsync" if mixing is not None else "FedBuff"
    k = engine.config.clients_per_round
    checks.positive_int("concurrency", concurrency)
    if concurrency < k:
      raise ValueError(
        f"concurrency ({concurrency}) must be >= K = clients_per_round "
        f"({k}): a server step aggregates K of the clients in flight."
      )
    self.concurrency = int(concurrency)
    self.tau_max = checks.positive_int(
      "tau_max", tau_max, hint=" (the ring buffer keeps tau_max + 1 models)"
    )
    if staleness is None:
      staleness = (
        reference.constant()
        if mixing is not None
        else reference.fedbuff_staleness()
      )
    if not callable(staleness):
      raise ValueError(
        f"staleness must be a callable tau -> weight, got {staleness!r}."
      )
    self.staleness = staleness
    if mixing is not None:
      mixing = checks.in_range(
        "alpha", mixing, 0.0, 1.0, low_open=True, high_open=False
      )
      if k != 1:
        raise ValueError(
          f"FedAsync aggregates one client per step: clients_per_round "
          f"must be 1, got {k}."
        )
      if engine.algorithm.aggregator is not None:
        raise ValueError(
          "FedAsync mixes the server model with one client's model; it "
          "takes no aggregator (got "
          f"{engine.algorithm.aggregator.name!r})."
        )
    self.mixing = mixing
    self.example_weighted = bool(example_weighted)
    self._max_events = checks.positive_int(
      "max_events",
      1000 * (k + concurrency) if max_events is None else max_events,
    )
    self.user_engine = engine
    self.engine = Engine(
      staleness_weighted(engine.algorithm, self.example_weighted, mixing),
      engine.config,
      engine.mesh,
    )
    super().__init__(engine, behaviour, what)

  def _check_population(self, num_clients: int) -> None:
    if self.concurrency > num_clients:
      raise ValueError(
        f"concurrency ({self.concurrency}) exceeds the population "
        f"({num_clients} clients)."
      )

  def _extra_state(self, engine_state: EngineState, num_clients: int):
    """Version 0 in every row of the ring, nobody in flight."""
    server = engine_state.server
    if self.mixing is not None and not (
      hasattr(server, "params") and hasattr(server, "replace")
    ):
      raise ValueError(
        f"FedAsync mixes server_state.params; {self.engine.algorithm.name}'s "
        f"server state ({type(server).__name__}) has none."
      )
    bcast = self.user_engine.algorithm.broadcast(server)
    size = self.tau_max + 1
    c = self.concurrency
    return dict(
      ring=jax.tree.map(
        lambda a: jnp.broadcast_to(a, (size,) + jnp.shape(a)), bcast
      ),
      flight={
        "client": jnp.zeros((c,), jnp.int32),
        "end": jnp.full((c,), jnp.inf, jnp.float32),
        "completed": jnp.zeros((c,), bool),
        "version": jnp.zeros((c,), jnp.int32),
        "used": jnp.zeros((c,), bool),
      },
      busy=jnp.zeros((num_clients,), bool),
    )

  # The event loop of one server step.
  def _schedule(self, state: TimedState, data: DeviceData):
    b = self.behaviour
    n, k = data.num_clients, self.engine.config.clients_per_round
    ids = jnp.arange(n, dtype=jnp.int32)
    steps = self._steps(data)
    version = state.engine.round
    tau_max = self.tau_max

    def dispatch(c):
      avail = (b.is_available(ids, c["t"]) | c["due"]) & ~c["busy"]
      priority = jnp.where(avail, b.sampling_priority(ids, c["task"]), jnp.inf)
      who = jnp.argmin(priority).astype(jnp.int32)
      times = b.task_times(
        who[None],
        steps[who][None],
        c["t"],
        behaviour_lib.task_key(b.seed, c["task"]),
      )
      slot = jnp.argmin(c["flight"]["used"])
      f = c["flight"]
      f = {
        "client": f["client"].at[slot].set(who),
        "end": f["end"].at[slot].set(times.end[0]),
        "completed": f["completed"].at[slot].set(times.completed[0]),
        "version": f["version"].at[slot].set(version),
        "used": f["used"].at[slot].set(True),
      }
      return dict(
        c, flight=f, busy=c["busy"].at[who].set(True), task=c["task"] + 1
      )

    def event(c):
      f, t = c["flight"], c["t"]
      c = dict(c, due=jnp.zeros_like(c["due"]))
      end = jnp.where(f["used"], f["end"], jnp.inf)
      e_min = jnp.min(end)
      tie = f["used"] & (end == e_min)
      slot = jnp.argmin(jnp.where(tie, f["client"], n))
      idle = ~c["busy"]
      free = jnp.sum(f["used"]) < self.concurrency
      nxt = jnp.where(idle & free, b.next_available(ids, t), jnp.inf)
      wake = jnp.min(nxt)

      def wake_up(c):
        return dict(c, t=wake, due=idle & (nxt <= wake))

      def never(c):
        return dict(c, status=jnp.int32(_NEVER))

      def arrive(c):
        who = f["client"][slot]
        tau = version - f["version"][slot]
        accept = f["completed"][slot] & (tau <= tau_max)
        pos = jnp.where(accept, c["count"], k)
        count = c["count"] + accept.astype(jnp.int32)
        flight = dict(f, used=f["used"].at[slot].set(False))
        return dict(
          c,
          t=e_min,
          flight=flight,
          busy=c["busy"].at[who].set(False),
          buf_client=c["buf_client"].at[pos].set(who, mode="drop"),
          buf_version=c["buf_version"]
          .at[pos]
          .set(f["version"][slot], mode="drop"),
          count=count,
          dropouts=c["dropouts"] + (~f["completed"][slot]).astype(jnp.int32),
          stale=c["stale"]
          + (f["completed"][slot] & (tau > tau_max)).astype(jnp.int32),
          status=jnp.where(count == k, _DONE, _RUNNING).astype(jnp.int32),
        )

      branch = jnp.where(wake < e_min, 0, jnp.where(jnp.isinf(e_min), 1, 2))
      return jax.lax.switch(branch, (wake_up, never, arrive), c)

    def body(c):
      f = c["flight"]
      free = jnp.sum(f["used"]) < self.concurrency
      avail = (b.is_available(ids, c["t"]) | c["due"]) & ~c["busy"]
      c = jax.lax.cond(free & avail.any(), dispatch, event, c)
      events = c["events"] + 1
      status = jnp.where(
        (c["status"] == _RUNNING) & (events >= self._max_events),
        _TOO_MANY,
        c["status"],
      ).astype(jnp.int32)
      return dict(c, events=events, status=status)

    zero = jnp.zeros((), jnp.int32)
    start = {
      "t": state.clock,
      "task": state.tasks,
      "flight": state.flight,
      "busy": state.busy,
      "due": jnp.zeros((n,), bool),
      "buf_client": jnp.zeros((k,), jnp.int32),
      "buf_version": jnp.zeros((k,), jnp.int32),
      "count": zero,
      "dropouts": zero,
      "stale": zero,
      "events": zero,
      "status": zero,
    }
    return jax.lax.while_loop(lambda c: c["status"] == _RUNNING, body, start)

  def round_body(self, state: TimedState, data: DeviceData):
    """One server step as a pure, traceable function."""
    size = self.tau_max + 1
    version = state.engine.round
    c = self._schedule(state, data)
    # Row j of the ring holds version v - ((v - j) mod size): staleness
    # (v - j) mod size, the same for every client that started on it.
    rows = jnp.arange(size, dtype=jnp.int32)
    s_rows = jnp.asarray(
      self.staleness(jnp.mod(version - rows, size).astype(jnp.float32)),
      jnp.float32,
    )
    s_rows = jnp.broadcast_to(s_rows, (size,))
    table_index = jnp.mod(c["buf_version"], size)
    done = c["status"] == _DONE
    count = jnp.where(done, c["count"], 0).astype(jnp.int32)
    given = GivenSample(
      ids=c["buf_client"][None],
      count=count[None],
      broadcast=(state.ring, s_rows),
      table_index=table_index[None],
    )
    new_engine, metrics = self._engine_round(state.engine, data, given)
    new_bcast = self.user_engine.algorithm.broadcast(new_engine.server)
    row = jnp.mod(new_engine.round, size)
    ring = jax.tree.map(
      lambda r, x: r.at[row].set(x.astype(r.dtype)), state.ring, new_bcast
    )
    tau = (version - c["buf_version"]).astype(jnp.float32)
    metrics = dict(metrics)
    metrics.pop(_BASE_WEIGHT, None)
    updates = state.updates + jnp.asarray(metrics["num_clients"]).astype(
      jnp.int32
    )
    metrics.update(
      clock=c["t"],
      step_duration=c["t"] - state.clock,
      staleness_mean=jnp.mean(tau),
      staleness_max=jnp.max(tau),
      dropouts=c["dropouts"],
      stale_discarded=c["stale"],
      client_tasks=c["task"],
      client_updates=updates,
      _status=c["status"],
    )
    new = TimedState(
      engine=new_engine,
      clock=c["t"],
      tasks=c["task"],
      updates=updates,
      last_ids=jnp.where(
        jnp.arange(c["buf_client"].shape[0]) < count, c["buf_client"], -1
      ).astype(jnp.int32),
      ring=ring,
      flight=c["flight"],
      busy=c["busy"],
    )
    return new, metrics


def fedbuff(
  engine: Engine,
  behaviour,
  concurrency: int,
  tau_max: int,
  staleness: Callable | None = None,
  example_weighted: bool = False,
  max_events: int | None = None,
) -> AsyncRounds:
  r"""FedBuff (Nguyen et al. 2022) on ``engine``: ``K =
  engine.config.clients_per_round`` arrivals per server step, the
  algorithm's server optimizer applied to
  :math:`\sum_i b_i s(\tau_i) \Delta_i / \sum_i b_i`.

  Args:
    engine: the engine of the algorithm (e.g. ``fed_avg`` with an optax
      server optimizer) and ``RoundConfig(clients_per_round=K)``.
    behaviour: the clients' behaviour model.
    concurrency: clients in flight (``>= K``).
    tau_max: arrivals staler than this are discarded (``>= 1``).
    staleness: ``s(tau)`` (works on arrays; default
      :func:`~fedjax_lite.systems.fedbuff_staleness`).
    example_weighted: ``b_i = n_i`` instead of 1.
    max_events: events one server step may handle before it stops with an
      error (default ``1000 (K + concurrency)``).
  """
  return AsyncRounds(
    engine,
    behaviour,
    concurrency,
    tau_max,
    staleness,
    example_weighted,
    None,
    max_events,
  )


def fed_async(
  engine: Engine,
  behaviour,
  concurrency: int,
  tau_max: int,
  alpha: float,
  staleness: Callable | None = None,
  max_events: int | None = None,
) -> AsyncRounds:
  r"""FedAsync (Xie et al. 2019): one arrival per step (``engine``'s
  ``clients_per_round`` must be 1), :math:`w \leftarrow (1 - \alpha s(\tau))
  w + \alpha s(\tau) w_{\mathrm{client}}`; ``staleness`` default constant
  (``polynomial(a)`` and ``hinge(a, b)`` are Xie et al.'s adaptive forms)."""
  return AsyncRounds(
    engine,
    behaviour,
    concurrency,
    tau_max,
    staleness,
    False,
    alpha,
    max_events,
  )
