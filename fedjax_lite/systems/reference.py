r"""Event-driven float64 reference of deadline rounds, FedBuff and FedAsync.

Layer: plain Python and numpy (float64), one client at a time, a heap of
finish times; :func:`from_behaviour` reads a
:class:`~fedjax_lite.systems.behaviour.ClientBehaviour`'s draws into numpy so
this reference and a jitted simulator see the same clients.

Clients are a :class:`Population`: ``run_task(client, t_start, task) ->
(end, completed)`` (``end``: arrival time, or the time a dropout leaves),
``is_available(ids, t)`` and ``next_available(ids, t)``. A client update is a
Python callable ``update_fn(params, client_id, rng_seed) -> (delta, weight)``
with ``params`` a float64 array (a copy: the model the client downloaded),
``delta = params - client_params`` (the pseudo-gradient, the engine's
convention) and ``weight`` its example count; ``rng_seed`` is
:func:`client_seed` ``(seed, task, client)``.

Tasks are numbered: round ``r`` in :func:`synchronous` (every client of the
round shares task ``r``), the ``n``-th dispatch (from 0) in :func:`fedbuff`
and :func:`fed_async`; :func:`from_behaviour` draws a task's jitter and
dropout from ``fold_in(task_key(seed, task), client)``.

Rules common to all three:

* Availability: a client can start a task at ``t`` iff it is available at
  ``t``. When nobody eligible is available, the clock advances to the earliest
  ``next_available`` of the eligible clients (those clients then count as
  available, whatever rounding says); if that time is ``+inf`` or beyond
  ``horizon``, a ``ValueError`` says so.
* Sampling: uniform without replacement from the available clients: every
  client has a priority per task (``population.priority(task)``, from
  :meth:`~fedjax_lite.systems.ClientBehaviour.sampling_priority` with
  :func:`from_behaviour`; default ``numpy.random.default_rng([seed,
  task]).random(num_clients)``) and the available clients with the smallest
  priorities are sampled, in increasing priority (ties: increasing id).
* Clock: times are held in float32, the engine's clock (JAX's default
  float): a round's start after a deadline is ``float32(t + deadline)`` and
  the deadline test is ``float32(T_k - t) <= float32(deadline)``; finish
  times come from ``population.run_task`` as they are.
* Ties: events at equal times are handled in increasing client id.
* Dropouts: a client that drops out is never aggregated; it frees its slot
  (asynchronous) or counts as done (synchronous) at the time it leaves. An
  asynchronous run whose clients always drop out never reaches ``num_steps``:
  give it a finite ``horizon``.

Synchronous rounds with over-selection and a deadline (Bonawitz et al. 2019,
"Towards Federated Learning at Scale": over-selection and a reporting
deadline): round ``r`` starts at
``t_r``, samples ``min(ceil(r m), #available)`` clients, all train from
``w_r``; the first ``m`` arrivals with ``T_k - t_r <= deadline`` are
aggregated,

.. math:: w_{r+1} = w_r - \eta \frac{\sum_k n_k \Delta_k}{\sum_k n_k},

and the round lasts until the ``m``-th aggregated arrival; with fewer than
``m`` it lasts ``deadline`` (when set) or until the last sampled client has
arrived or left. A round that aggregates nobody leaves ``w`` unchanged.

FedBuff (Nguyen et al. 2022, Algorithm 1): ``concurrency`` clients train at
once; whenever one arrives or leaves, an available idle client starts from the
current model (version ``v``). Arrival ``i`` has staleness
``tau_i = v_arrival - v_start``; arrivals with ``tau_i > tau_max`` are
discarded (recorded in ``AsyncResult.stale``); the others fill a buffer and
every ``K`` of them make a server step

.. math::

  \bar\Delta = \frac{1}{K} \sum_{i=1}^K s(\tau_i) \Delta_i, \qquad
  w \leftarrow w - \eta_g \bar\Delta,

(``example_weighted``: :math:`\sum_i n_i s(\tau_i) \Delta_i / \sum_i n_i`).
FedBuff's default staleness weight is ``s(tau) = 1 / sqrt(1 + tau)``.

FedAsync (Xie et al. 2019, Algorithm 1): ``K = 1`` and mixing

.. math::

  w \leftarrow (1 - \alpha_t) w + \alpha_t w_{\mathrm{client}}, \qquad
  \alpha_t = \alpha\, s(\tau), \quad w_{\mathrm{client}} = w_{\mathrm{start}}
  - \Delta,

with Xie et al.'s staleness functions :func:`polynomial` ``(1 + tau)^-a`` and
:func:`hinge`.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

UpdateFn = Callable[[np.ndarray, int, int], tuple[Any, float]]


class Population(NamedTuple):
  """The clients, seen through numpy.

  num_clients: ids are ``0 .. num_clients - 1``.
  run_task: ``(client, t_start, task) -> (end, completed)``.
  is_available: ``(ids int[n], t) -> bool[n]``.
  next_available: ``(ids int[n], t) -> float[n]`` (first time >= t; inf:
    never).
  priority: ``task -> float[num_clients]``, the sampling priorities of a
    task (None: numpy's, seeded by the simulator's ``seed``).
  """

  num_clients: int
  run_task: Callable[[int, float, int], tuple[float, bool]]
  is_available: Callable[[np.ndarray, float], np.ndarray]
  next_available: Callable[[np.ndarray, float], np.ndarray]
  priority: Callable[[int], np.ndarray] | None = None


def from_behaviour(
  behaviour, num_clients: int, num_steps: int | np.ndarray
) -> Population:
  """A :class:`Population` reading ``behaviour``'s draws (jitted, to numpy).

  ``run_task(k, t, task)`` is ``behaviour.task_times([k], num_steps[k], t,
  task_key(behaviour.seed, task))``: ``end`` is the finish time or, for a
  dropout, the time the client leaves. ``num_steps``: local steps of every
  client, or an int array ``[num_clients]``. ``priority(task)`` is
  ``behaviour.sampling_priority(arange(num_clients), task)``.
  """
  import jax
  import jax.numpy as jnp

  from fedjax_lite.systems import behaviour as behaviour_lib

  _check_int("num_clients", num_clients, 1)
  if isinstance(num_steps, (int, np.integer)):
    _check_int("num_steps", num_steps, 0)
    steps = np.full(num_clients, int(num_steps), np.int64)
  else:
    steps = np.asarray(num_steps)
    if steps.shape != (num_clients,) or not np.issubdtype(
      steps.dtype, np.integer
    ):
      raise ValueError(
        f"num_steps must be an int or an int array of shape "
        f"({num_clients},), got {num_steps!r}."
      )
    if (steps < 0).any():
      raise ValueError(f"num_steps must be >= 0, got {steps.min()}.")

  @jax.jit
  def task(ids, n, t, task):
    key = behaviour_lib.task_key(behaviour.seed, task)
    out = behaviour.task_times(ids, n, t, key)
    return out.end, out.completed

  everyone = jnp.arange(num_clients)
  available = jax.jit(lambda t: behaviour.is_available(everyone, t))
  next_available = jax.jit(lambda t: behaviour.next_available(everyone, t))

  def run_task(client, t_start, task_id):
    end, completed = task(
      jnp.asarray([client]), steps[client : client + 1], t_start, task_id
    )
    return float(np.asarray(end)[0]), bool(np.asarray(completed)[0])

  priority = jax.jit(lambda task: behaviour.sampling_priority(everyone, task))

  # Evaluated for the whole population (one compilation), then indexed.
  return Population(
    num_clients=num_clients,
    run_task=run_task,
    is_available=lambda ids, t: np.asarray(available(t))[ids],
    next_available=lambda ids, t: np.asarray(next_available(t), np.float64)[
      ids
    ],
    priority=lambda task: np.asarray(priority(task), np.float64),
  )


def client_seed(seed: int, task: int, client: int) -> int:
  """The ``rng_seed`` handed to ``update_fn`` for ``client`` in ``task``."""
  return int(np.random.SeedSequence([seed, task, client]).generate_state(1)[0])


# --------------------------------------------------------------------------
# Staleness weights s(tau): plain arithmetic, so the same functions take a
# Python int (this reference) or an array of staleness values (the engine).


def constant() -> Callable[[int], float]:
  """``s(tau) = 1``."""
  return lambda tau: 1.0 + 0.0 * tau


def polynomial(a: float) -> Callable[[int], float]:
  """``s(tau) = (1 + tau)^-a`` (Xie et al. 2019), ``a >= 0``."""
  _check_number("a", a, 0.0)
  return lambda tau: (1.0 + tau) ** -float(a)


def fedbuff_staleness() -> Callable[[int], float]:
  """FedBuff's ``s(tau) = 1 / sqrt(1 + tau)`` (Nguyen et al. 2022)."""
  return polynomial(0.5)


def hinge(a: float, b: float) -> Callable[[int], float]:
  """``s(tau) = 1`` if ``tau <= b`` else ``1 / (a (tau - b) + 1)`` (Xie et al.)."""
  _check_number("a", a, 0.0)
  _check_number("b", b, 0.0)

  def weight(tau):
    over = (tau - b + abs(tau - b)) / 2  # max(tau - b, 0)
    return 1.0 / (a * over + 1.0)

  return weight


# --------------------------------------------------------------------------
# Results


class SyncRound(NamedTuple):
  """One synchronous round.

  start: simulated time the round starts; selected: the sampled ids (in
  sampling order); client_ids / arrivals: the aggregated ids in arrival order
  and their arrival times; duration: the round's simulated length; params:
  the model after the round.
  """

  start: float
  selected: np.ndarray
  client_ids: np.ndarray
  arrivals: np.ndarray
  duration: float
  params: np.ndarray


class ServerStep(NamedTuple):
  """One asynchronous server step (``version`` = steps done after it)."""

  version: int
  time: float
  client_ids: np.ndarray
  staleness: np.ndarray
  params: np.ndarray


class AsyncResult(NamedTuple):
  """``steps``; ``stale``: ``(time, client, tau)`` arrivals discarded for
  ``tau > tau_max``; ``dropouts``: ``(time, client)``; ``dispatches``:
  ``(time, client, task, version)`` of every task started; ``time``: the
  clock when the run stopped (``num_steps`` reached, or nothing left before
  ``horizon``)."""

  steps: list[ServerStep]
  stale: list[tuple[float, int, int]]
  dropouts: list[tuple[float, int]]
  dispatches: list[tuple[float, int, int, int]]
  time: float


# --------------------------------------------------------------------------
# Checks and helpers


def _check_number(name, value, low, strict=False):
  ok = isinstance(value, (int, float, np.integer, np.floating)) and not (
    math.isnan(value)
  )
  if not ok or value < low or (strict and value == low):
    bound = f"> {low}" if strict else f">= {low}"
    raise ValueError(f"{name} must be a number {bound}, got {value!r}.")


def _check_int(name, value, low):
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
    raise ValueError(f"{name} must be an int, got {value!r}.")
  if value < low:
    raise ValueError(f"{name} must be >= {low}, got {value!r}.")


def _check_common(
  population, num_steps, server_lr, seed, t_start, horizon, steps="num_steps"
):
  if not isinstance(population, Population):
    raise ValueError(
      f"population must be a Population (see from_behaviour), got "
      f"{type(population).__name__}."
    )
  _check_int("population.num_clients", population.num_clients, 1)
  _check_int(steps, num_steps, 0)
  _check_number("server_lr", server_lr, 0.0)
  _check_int("seed", seed, 0)
  _check_number("t_start", t_start, -math.inf)
  if not math.isfinite(t_start):
    raise ValueError(f"t_start must be finite, got {t_start!r}.")
  _check_number("horizon", horizon, t_start)


def _wait(population, ids, t, horizon):
  """``(t', due)``: the earliest availability of ``ids`` at or after ``t``."""
  nxt = np.asarray(population.next_available(ids, t), np.float64)
  t_next = float(nxt.min())
  if not math.isfinite(t_next) or t_next > horizon:
    raise ValueError(
      f"no client is available between t={t} and horizon={horizon} "
      f"({len(ids)} clients asked): check the availability model or "
      "raise horizon."
    )
  return t_next, ids[nxt <= t_next]


def _available(population, ids, t, due=()):
  if not len(ids):
    return ids
  ok = np.array(population.is_available(ids, t), bool)
  ok |= np.isin(ids, np.asarray(due, ids.dtype))
  return ids[ok]


def _clock(x) -> float:
  """``x`` rounded to the engine's float32 clock."""
  return float(np.float32(x))


def _sample(population, available, seed, task, size):
  """The ``size`` available clients of smallest priority, in that order."""
  if population.priority is None:
    priority = np.random.default_rng([seed, task]).random(
      population.num_clients
    )
  else:
    priority = np.asarray(population.priority(task), np.float64)
  mine = priority[available]
  order = np.lexsort((available, mine))
  return available[order[:size]]


def _as_params(params):
  return np.array(params, np.float64, copy=True)


# --------------------------------------------------------------------------
# Synchronous rounds


def synchronous(
  params,
  update_fn: UpdateFn,
  population: Population,
  num_rounds: int,
  clients_per_round: int,
  over_selection: float = 1.0,
  deadline: float | None = None,
  server_lr: float = 1.0,
  seed: int = 0,
  t_start: float = 0.0,
  horizon: float = math.inf,
) -> list[SyncRound]:
  """Synchronous rounds with over-selection and a deadline (module docs).

  Args:
    params: the initial model (a float64 array).
    update_fn: ``(params, client_id, rng_seed) -> (delta, weight)``.
    population: the clients.
    num_rounds: rounds to run.
    clients_per_round: ``m``, the number of updates a round aggregates.
    over_selection: ``r >= 1``: a round samples ``ceil(r m)`` clients.
    deadline: seconds after the round's start; later arrivals are dropped.
    server_lr: ``eta``.
    seed: seeds the per-round sampling and the clients' ``rng_seed``.
    t_start: the clock at round 0.
    horizon: the latest time a round may wait for available clients.
  """
  _check_common(
    population, num_rounds, server_lr, seed, t_start, horizon, "num_rounds"
  )
  _check_int("clients_per_round", clients_per_round, 1)
  _check_number("over_selection", over_selection, 1.0)
  if deadline is not None:
    _check_number("deadline", deadline, 0.0, strict=True)
  w = _as_params(params)
  ids = np.arange(population.num_clients)
  num_sampled = math.ceil(over_selection * clients_per_round)
  t = _clock(t_start)
  rounds = []
  for r in range(num_rounds):
    available = _available(population, ids, t)
    if not len(available):
      t, due = _wait(population, ids, t, horizon)
      available = _available(population, ids, t, due)
    selected = _sample(population, available, seed, r, num_sampled)
    events = []
    for k in selected:
      end, completed = population.run_task(int(k), t, r)
      events.append((float(end), int(k), bool(completed)))
    events.sort()
    aggregated = []
    for end, k, completed in events:
      if len(aggregated) == clients_per_round:
        break
      if completed and (
        deadline is None or _clock(end - t) <= _clock(deadline)
      ):
        aggregated.append((end, k))
    if len(aggregated) == clients_per_round:
      t_next = aggregated[-1][0]
    elif deadline is not None:
      t_next = _clock(t + _clock(deadline))
    else:
      t_next = max((end for end, _, _ in events), default=t)
    if aggregated:
      total, weights = 0.0, 0.0
      for _, k in aggregated:
        delta, weight = update_fn(w.copy(), k, client_seed(seed, r, k))
        total = total + float(weight) * np.asarray(delta, np.float64)
        weights += float(weight)
      if weights <= 0:
        raise ValueError(
          f"round {r}: the aggregated clients' weights sum to {weights}; "
          "update_fn must return positive weights."
        )
      w = w - server_lr * total / weights
    rounds.append(
      SyncRound(
        start=t,
        selected=np.asarray(selected, np.int64),
        client_ids=np.array([k for _, k in aggregated], np.int64),
        arrivals=np.array([e for e, _ in aggregated], np.float64),
        duration=float(t_next - t),
        params=w.copy(),
      )
    )
    t = t_next
  return rounds


# --------------------------------------------------------------------------
# Asynchronous training


def _asynchronous(
  params,
  update_fn,
  population,
  num_steps,
  concurrency,
  buffer_size,
  staleness,
  tau_max,
  seed,
  t_start,
  horizon,
  server_step,
) -> AsyncResult:
  """The event loop shared by :func:`fedbuff` and :func:`fed_async`.

  ``server_step(w, buffer) -> w`` with ``buffer`` a list of ``(w_start,
  delta, weight, s(tau))``.
  """
  w = _as_params(params)
  num_clients = population.num_clients
  version, task, t = 0, 0, _clock(t_start)
  heap = []  # (end, client, task, start version, completed, payload)
  in_flight: set[int] = set()
  buffer, buffer_ids, buffer_tau = [], [], []
  steps, stale, dropouts, dispatches = [], [], [], []
  due = np.zeros(0, np.int64)

  def idle_ids():
    return np.array(
      [k for k in range(num_clients) if k not in in_flight], np.int64
    )

  def dispatch(due):
    nonlocal task
    while len(in_flight) < concurrency:
      available = _available(population, idle_ids(), t, due)
      if not len(available):
        return
      k = int(_sample(population, available, seed, task, 1)[0])
      end, completed = population.run_task(k, t, task)
      payload = None
      if completed:
        delta, weight = update_fn(w.copy(), k, client_seed(seed, task, k))
        payload = (w.copy(), np.asarray(delta, np.float64), float(weight))
      heapq.heappush(heap, (float(end), k, task, version, completed, payload))
      dispatches.append((t, k, task, version))
      in_flight.add(k)
      task += 1

  while len(steps) < num_steps:
    dispatch(due)
    due = np.zeros(0, np.int64)
    next_event = heap[0][0] if heap else math.inf
    idle = idle_ids()
    if len(in_flight) < concurrency and len(idle):
      nxt = np.asarray(population.next_available(idle, t), np.float64)
      wake = float(nxt.min())
      if wake < next_event:
        if wake > horizon:
          break
        t, due = wake, idle[nxt <= wake]
        continue
    if not heap:
      _wait(
        population, idle if len(idle) else np.arange(num_clients), t, horizon
      )
    if next_event > horizon:
      break
    end, k, _, start_version, completed, payload = heapq.heappop(heap)
    t = end
    in_flight.discard(k)
    if not completed:
      dropouts.append((end, k))
      continue
    tau = version - start_version
    if tau_max is not None and tau > tau_max:
      stale.append((end, k, tau))
      continue
    w_start, delta, weight = payload
    buffer.append((w_start, delta, weight, float(staleness(tau))))
    buffer_ids.append(k)
    buffer_tau.append(tau)
    if len(buffer) == buffer_size:
      w = server_step(w, buffer)
      version += 1
      steps.append(
        ServerStep(
          version=version,
          time=t,
          client_ids=np.array(buffer_ids, np.int64),
          staleness=np.array(buffer_tau, np.int64),
          params=w.copy(),
        )
      )
      buffer, buffer_ids, buffer_tau = [], [], []
  return AsyncResult(
    steps=steps, stale=stale, dropouts=dropouts, dispatches=dispatches, time=t
  )


def _check_async(
  population,
  num_steps,
  concurrency,
  tau_max,
  seed,
  t_start,
  horizon,
  staleness,
  server_lr=1.0,
):
  _check_common(population, num_steps, server_lr, seed, t_start, horizon)
  _check_int("concurrency", concurrency, 1)
  if concurrency > population.num_clients:
    raise ValueError(
      f"concurrency ({concurrency}) exceeds the population "
      f"({population.num_clients} clients)."
    )
  if tau_max is not None:
    if not isinstance(tau_max, (int, np.integer)) or tau_max <= 0:
      raise ValueError(
        f"tau_max must be a positive int or None (no bound), got {tau_max!r}."
      )
  if not callable(staleness):
    raise ValueError(
      f"staleness must be a callable tau -> weight, got {staleness!r}."
    )


def fedbuff(
  params,
  update_fn: UpdateFn,
  population: Population,
  num_steps: int,
  concurrency: int,
  buffer_size: int,
  server_lr: float = 1.0,
  staleness: Callable[[int], float] | None = None,
  tau_max: int | None = None,
  example_weighted: bool = False,
  seed: int = 0,
  t_start: float = 0.0,
  horizon: float = math.inf,
) -> AsyncResult:
  r"""FedBuff (Nguyen et al. 2022): buffered asynchronous aggregation.

  Every ``buffer_size = K`` accepted arrivals,
  :math:`w \leftarrow w - \eta_g \frac1K \sum_i s(\tau_i) \Delta_i` (module
  docs for the event rules).

  Args:
    params: the initial model (a float64 array).
    update_fn: ``(params, client_id, rng_seed) -> (delta, weight)``.
    population: the clients.
    num_steps: server steps to run (fewer if ``horizon`` comes first).
    concurrency: clients training at once (``>= K``).
    buffer_size: ``K >= 1``.
    server_lr: ``eta_g``.
    staleness: ``s(tau)``; default :func:`fedbuff_staleness`.
    tau_max: discard arrivals with ``tau > tau_max`` (``None``: keep all).
    example_weighted: weight by ``n_i`` (``sum n_i s_i Delta_i / sum n_i``).
    seed: seeds sampling and the clients' ``rng_seed``.
    t_start: the clock at the start.
    horizon: stop when the next event is later than this.
  """
  staleness = fedbuff_staleness() if staleness is None else staleness
  _check_int("buffer_size (K)", buffer_size, 1)
  _check_async(
    population,
    num_steps,
    concurrency,
    tau_max,
    seed,
    t_start,
    horizon,
    staleness,
    server_lr,
  )
  if concurrency < buffer_size:
    raise ValueError(
      f"concurrency ({concurrency}) must be >= buffer_size K "
      f"({buffer_size}) (Nguyen et al. 2022 run K <= concurrency)."
    )

  def server_step(w, buffer):
    if example_weighted:
      total = sum(n * s * d for _, d, n, s in buffer)
      return w - server_lr * total / sum(n for _, _, n, _ in buffer)
    return w - server_lr * sum(s * d for _, d, _, s in buffer) / len(buffer)

  return _asynchronous(
    params,
    update_fn,
    population,
    num_steps,
    concurrency,
    buffer_size,
    staleness,
    tau_max,
    seed,
    t_start,
    horizon,
    server_step,
  )


def fed_async(
  params,
  update_fn: UpdateFn,
  population: Population,
  num_steps: int,
  concurrency: int,
  alpha: float,
  staleness: Callable[[int], float] | None = None,
  tau_max: int | None = None,
  seed: int = 0,
  t_start: float = 0.0,
  horizon: float = math.inf,
) -> AsyncResult:
  r"""FedAsync (Xie et al. 2019): one arrival per server step, mixing

  :math:`w \leftarrow (1 - \alpha s(\tau)) w + \alpha s(\tau) (w_{start} -
  \Delta)`.

  Args as :func:`fedbuff`; ``alpha`` in (0, 1]; ``staleness`` default
  :func:`constant` (Xie et al.'s ``s = 1``).
  """
  staleness = constant() if staleness is None else staleness
  _check_async(
    population,
    num_steps,
    concurrency,
    tau_max,
    seed,
    t_start,
    horizon,
    staleness,
  )
  _check_number("alpha", alpha, 0.0, strict=True)
  if alpha > 1:
    raise ValueError(f"alpha must lie in (0, 1], got {alpha!r}.")

  def server_step(w, buffer):
    ((w_start, delta, _, s),) = buffer
    a = alpha * s
    return (1.0 - a) * w + a * (w_start - delta)

  return _asynchronous(
    params,
    update_fn,
    population,
    num_steps,
    concurrency,
    1,
    staleness,
    tau_max,
    seed,
    t_start,
    horizon,
    server_step,
  )
