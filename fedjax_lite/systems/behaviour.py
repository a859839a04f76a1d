r"""A seeded, deterministic model of when and how fast clients train.

Layer: depends on jax only (never ``engine/`` or ``algorithms/``); the
float64 event-driven reference (:mod:`fedjax_lite.systems.reference`) and the
jitted engine read the same draws from it.

Every draw is a pure function of ``(seed, stream, client id)``: the key is
``fold_in(fold_in(PRNGKey(seed), stream), client_id)``, so a client's speed,
network delays, time-zone and online fraction are the same whenever and in
whatever order they are asked for, and nothing of size ``[population]`` is
ever stored (memory O(number of clients asked about)). Per-task draws
(compute jitter, dropout) use the task's key instead of the seed:
``fold_in(task_key, client_id)``, with ``task_key = task_key(seed, task)``
for a round number (synchronous rounds) or a dispatch number (asynchronous
training).

A training task of ``n`` local steps that client ``k`` starts at ``t_0``:

.. math::

  T_k = t_0 + D_k + n \, c_k \, J_{k,j} + U_k,
  \qquad J_{k,j} = \exp(\sigma_J Z_{k,j}),\ Z_{k,j} \sim N(0, 1),

with ``c_k`` seconds per local step (or per example, with ``n`` counting
examples), ``D_k`` / ``U_k`` the download / upload
delays (per client, drawn once) and ``J`` a per-task multiplicative jitter
(median 1; ``jitter = sigma_J = 0`` turns it off). With probability ``p`` (the
per-task ``dropout``) the client leaves before finishing, at
``t_0 + V (T_k - t_0)``, ``V ~ U(0, 1)``; its finish time is then ``+inf``.
Availability is checked when a task starts (the simulators assign tasks only
to available clients); a client that goes offline later still finishes unless
it drops out.

Distributions (parameters named as in the literature):

* :class:`LogNormal` ``(mu, sigma)``: :math:`X = e^{\mu + \sigma Z}`, median
  :math:`e^\mu`, mean :math:`e^{\mu + \sigma^2/2}` (the default);
* :class:`Pareto` ``(scale, alpha)``: :math:`P(X > x) = (x_m / x)^\alpha`
  for :math:`x \ge x_m`, tail index :math:`\alpha`;
* :class:`LogLogistic` ``(alpha, beta)``: :math:`P(X > x) = 1 / (1 +
  (x/\alpha)^\beta)`, median :math:`\alpha`, tail index :math:`\beta`;
* :class:`Constant` ``(value)``.

Availability (``is_available(client_ids, t)``, ``next_available(client_ids,
t)``; times in seconds):

* :class:`AlwaysAvailable`;
* :class:`Diurnal` ``(online_fraction, period=86400, time_zones=24)``: client
  ``k`` has offset :math:`o_k = P j_k / Z` (``j_k`` uniform in ``0..Z-1``; a
  continuous uniform offset in ``[0, P)`` with ``time_zones=None``) and
  online fraction ``f_k`` (the given value, or uniform in ``[lo, hi]`` for a
  pair); it is online at ``t`` iff :math:`(t + o_k) \bmod P < f_k P`;
* :class:`WindowTrace` ``(windows)``: ``[num_clients, num_windows, 2]``
  half-open ``[start, end)`` windows (``start == end`` pads);
* :class:`SlotTrace` ``(online, slot_seconds, periodic=True)``: a boolean
  ``[num_clients, num_slots]`` matrix; slot ``s`` covers
  ``[s * slot_seconds, (s + 1) * slot_seconds)``, repeating with period
  ``num_slots * slot_seconds`` when ``periodic``.

All methods take ``client_ids`` of any shape (integers) and broadcast scalar
``t`` / ``num_steps``; they are jittable and vmappable (call them inside
``jax.jit``: the model is a Python constant closed over). Times use JAX's
default float dtype (float32 unless ``jax_enable_x64``): at float32, times of
about a day carry errors of a few milliseconds. Ids past a trace's
``num_clients`` are clamped by JAX indexing and are the caller's error.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np

# Streams of per-client draws (folded into the seed's key before the id).
_STEP, _DOWNLOAD, _UPLOAD, _ZONE, _FRACTION, _TASK = range(6)
# fold_in data of a task key's sampling priorities.
_SAMPLING = 0x73616D70


def _check_finite(name: str, value) -> None:
  if not isinstance(value, numbers.Real) or math.isnan(value):
    raise ValueError(f"{name} must be a finite number, got {value!r}.")
  if math.isinf(value):
    raise ValueError(f"{name} must be finite, got {value!r}.")


def _check_positive(name: str, value, allow_zero: bool = False) -> None:
  _check_finite(name, value)
  if value < 0 or (value == 0 and not allow_zero):
    bound = ">= 0" if allow_zero else "> 0"
    raise ValueError(f"{name} must be {bound}, got {value!r}.")


def _float():
  return jnp.result_type(float)


def _ids(client_ids) -> jax.Array:
  ids = jnp.asarray(client_ids)
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(
      f"client_ids must be integers, got dtype {ids.dtype}; pass client "
      "indices, e.g. jnp.arange(n)."
    )
  return ids


def _scalar_or_like(name: str, value, ids: jax.Array) -> jax.Array:
  """``value`` as floats, broadcast against ``ids`` (scalar or same shape)."""
  value = jnp.asarray(value, _float())
  if value.ndim and value.shape != ids.shape:
    raise ValueError(
      f"{name} has shape {value.shape}, expected a scalar or client_ids' "
      f"shape {ids.shape}."
    )
  return jnp.broadcast_to(value, ids.shape)


def _per_client(seed: int, stream: int, ids: jax.Array, sample) -> jax.Array:
  """``sample(key)`` for each id, key = fold_in(fold_in(key(seed), stream), id).

  ``sample`` must be hashable (a method of a frozen dataclass): the draw is
  compiled once per (stream, sample, shape) for eager callers.
  """
  return _per_client_jit(seed, stream, ids, sample)


@functools.partial(jax.jit, static_argnums=(1, 3))
def _per_client_jit(seed, stream, ids, sample):
  base = jax.random.fold_in(jax.random.PRNGKey(seed), stream)
  keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(ids.ravel())
  return jax.vmap(sample)(keys).reshape(ids.shape)


def task_key(seed: int, task) -> jax.Array:
  """The key of task ``task`` (a round or dispatch number) for ``seed``."""
  base = jax.random.fold_in(jax.random.PRNGKey(seed), _TASK)
  return jax.random.fold_in(base, task)


# --------------------------------------------------------------------------
# Distributions


@dataclasses.dataclass(frozen=True)
class LogNormal:
  r""":math:`X = e^{\mu + \sigma Z}`, :math:`Z \sim N(0, 1)`."""

  mu: float
  sigma: float

  def __post_init__(self):
    _check_finite("LogNormal.mu", self.mu)
    _check_positive("LogNormal.sigma", self.sigma, allow_zero=True)

  @classmethod
  def from_median(cls, median: float, sigma: float) -> "LogNormal":
    _check_positive("LogNormal median", median)
    return cls(math.log(median), sigma)

  @property
  def mean(self) -> float:
    return math.exp(self.mu + 0.5 * self.sigma**2)

  @property
  def median(self) -> float:
    return math.exp(self.mu)

  def sample(self, key: jax.Array) -> jax.Array:
    z = jax.random.normal(key, (), _float())
    return jnp.exp(self.mu + self.sigma * z)


@dataclasses.dataclass(frozen=True)
class Pareto:
  r"""Pareto type I: :math:`X = x_m U^{-1/\alpha}`, :math:`U \sim U(0, 1]`.

  :math:`P(X > x) = (x_m / x)^\alpha`; mean :math:`\alpha x_m / (\alpha - 1)`
  for :math:`\alpha > 1` (infinite otherwise), median
  :math:`x_m 2^{1/\alpha}`.
  """

  scale: float
  alpha: float

  def __post_init__(self):
    _check_positive("Pareto.scale", self.scale)
    _check_positive("Pareto.alpha", self.alpha)

  @property
  def median(self) -> float:
    return self.scale * 2.0 ** (1.0 / self.alpha)

  def sample(self, key: jax.Array) -> jax.Array:
    u = 1.0 - jax.random.uniform(key, (), _float())  # (0, 1]
    return self.scale * u ** (-1.0 / self.alpha)


@dataclasses.dataclass(frozen=True)
class LogLogistic:
  r"""Log-logistic (Fisk): :math:`X = \alpha (U / (1 - U))^{1/\beta}`.

  :math:`P(X > x) = 1 / (1 + (x / \alpha)^\beta)`: median :math:`\alpha`,
  tail index :math:`\beta`.
  """

  alpha: float
  beta: float

  def __post_init__(self):
    _check_positive("LogLogistic.alpha", self.alpha)
    _check_positive("LogLogistic.beta", self.beta)

  @property
  def median(self) -> float:
    return self.alpha

  def sample(self, key: jax.Array) -> jax.Array:
    u = jax.random.uniform(key, (), _float())  # [0, 1)
    return self.alpha * (u / (1.0 - u)) ** (1.0 / self.beta)


@dataclasses.dataclass(frozen=True)
class Constant:
  """Every client draws ``value``."""

  value: float

  def __post_init__(self):
    _check_positive("Constant.value", self.value, allow_zero=True)

  @property
  def median(self) -> float:
    return self.value

  def sample(self, key: jax.Array) -> jax.Array:
    del key
    return jnp.asarray(self.value, _float())


Distribution = Union[LogNormal, Pareto, LogLogistic, Constant]


# --------------------------------------------------------------------------
# Availability


@dataclasses.dataclass(frozen=True)
class AlwaysAvailable:
  """Every client is online at every time."""

  def is_available(self, seed: int, ids: jax.Array, t: jax.Array) -> jax.Array:
    del seed, t
    return jnp.ones(ids.shape, bool)

  def next_available(self, seed, ids, t):
    del seed
    return t


@dataclasses.dataclass(frozen=True)
class Diurnal:
  r"""Daily on/off windows: online iff :math:`(t + o_k) \bmod P < f_k P`.

  Args:
    online_fraction: ``f`` in (0, 1], the share of each period a client is
      online, or a pair ``(lo, hi)``: ``f_k ~ U[lo, hi]`` per client.
    period: ``P`` in seconds (a day).
    time_zones: ``Z``: offsets ``o_k = P j_k / Z``, ``j_k`` uniform in
      ``{0, ..., Z-1}``; ``None``: ``o_k ~ U[0, P)``.
  """

  online_fraction: float | tuple[float, float] = 0.5
  period: float = 86400.0
  time_zones: int | None = 24

  def __post_init__(self):
    fractions = self.online_fraction
    if not isinstance(fractions, tuple):
      fractions = (fractions,)
    if len(fractions) not in (1, 2):
      raise ValueError(
        "Diurnal.online_fraction must be a number or a pair (lo, hi), got "
        f"{self.online_fraction!r}."
      )
    for f in fractions:
      _check_finite("Diurnal.online_fraction", f)
      if not 0 < f <= 1:
        raise ValueError(
          f"Diurnal.online_fraction must lie in (0, 1], got "
          f"{self.online_fraction!r}."
        )
    if len(fractions) == 2 and fractions[0] > fractions[1]:
      raise ValueError(
        "Diurnal.online_fraction (lo, hi) needs lo <= hi, got "
        f"{self.online_fraction!r}."
      )
    _check_positive("Diurnal.period", self.period)
    if self.time_zones is not None and (
      not isinstance(self.time_zones, int) or self.time_zones < 1
    ):
      raise ValueError(
        f"Diurnal.time_zones must be a positive int or None, got "
        f"{self.time_zones!r}."
      )

  def offsets(self, seed: int, ids: jax.Array) -> jax.Array:
    """``o_k`` in seconds, per client."""
    return _per_client(seed, _ZONE, ids, self._sample_offset)

  def fractions(self, seed: int, ids: jax.Array) -> jax.Array:
    """``f_k`` per client."""
    f = self.online_fraction
    if not isinstance(f, tuple):
      return jnp.full(ids.shape, f, _float())
    return _per_client(seed, _FRACTION, ids, self._sample_fraction)

  def _sample_offset(self, key):
    if self.time_zones is None:
      return jax.random.uniform(key, (), _float()) * self.period
    j = jax.random.randint(key, (), 0, self.time_zones)
    return j.astype(_float()) * (self.period / self.time_zones)

  def _sample_fraction(self, key):
    lo, hi = self.online_fraction
    return jax.random.uniform(key, (), _float(), lo, hi)

  def _phase(self, seed, ids, t):
    return jnp.mod(t + self.offsets(seed, ids), self.period)

  def is_available(self, seed, ids, t):
    return self._phase(seed, ids, t) < self.fractions(seed, ids) * self.period

  def next_available(self, seed, ids, t):
    phase = self._phase(seed, ids, t)
    online = phase < self.fractions(seed, ids) * self.period
    return jnp.where(online, t, t + (self.period - phase))


@dataclasses.dataclass(frozen=True, eq=False)
class WindowTrace:
  """Online windows ``[start, end)`` per client, ``[num_clients, W, 2]``.

  Windows with ``start == end`` are padding; ``start`` and ``end`` may be
  ``+inf`` (padding) but not NaN, and ``end >= start``.
  """

  windows: np.ndarray

  def __post_init__(self):
    w = np.asarray(self.windows, np.float64)
    if w.ndim != 3 or w.shape[-1] != 2:
      raise ValueError(
        f"WindowTrace.windows has shape {w.shape}, expected "
        "[num_clients, num_windows, 2] (start, end)."
      )
    if np.isnan(w).any():
      raise ValueError("WindowTrace.windows contains NaN.")
    bad = np.argwhere(w[..., 1] < w[..., 0])
    if bad.size:
      k, j = bad[0]
      raise ValueError(
        f"WindowTrace.windows[{k}, {j}] ends before it starts: "
        f"({w[k, j, 0]}, {w[k, j, 1]})."
      )
    if not (w[..., 1] > w[..., 0]).any():
      raise ValueError(
        "WindowTrace.windows: no client is ever available (every window "
        "is empty)."
      )
    object.__setattr__(self, "windows", w)

  @property
  def num_clients(self) -> int:
    return self.windows.shape[0]

  def is_available(self, seed, ids, t):
    del seed
    w = jnp.asarray(self.windows, _float())[ids]
    t = t[..., None]
    return ((w[..., 0] <= t) & (t < w[..., 1])).any(-1)

  def next_available(self, seed, ids, t):
    del seed
    w = jnp.asarray(self.windows, _float())[ids]
    start, end = w[..., 0], w[..., 1]
    t = t[..., None]
    candidate = jnp.where(
      (end > start) & (end > t), jnp.maximum(start, t), jnp.inf
    )
    return candidate.min(-1)


@dataclasses.dataclass(frozen=True, eq=False)
class SlotTrace:
  """A boolean ``[num_clients, num_slots]`` matrix of online time slots."""

  online: np.ndarray
  slot_seconds: float
  periodic: bool = True

  def __post_init__(self):
    online = np.asarray(self.online)
    if online.ndim != 2:
      raise ValueError(
        f"SlotTrace.online has shape {online.shape}, expected "
        "[num_clients, num_slots]."
      )
    if online.dtype != bool:
      raise ValueError(
        f"SlotTrace.online must be boolean, got dtype {online.dtype}."
      )
    if not online.any():
      raise ValueError(
        "SlotTrace.online: no client is ever available (all False)."
      )
    _check_positive("SlotTrace.slot_seconds", self.slot_seconds)
    object.__setattr__(self, "online", online)

  @property
  def num_clients(self) -> int:
    return self.online.shape[0]

  def _slot(self, t):
    return jnp.floor(t / self.slot_seconds).astype(jnp.int32)

  def is_available(self, seed, ids, t):
    del seed
    num_slots = self.online.shape[1]
    s = self._slot(t)
    inside = jnp.ones_like(s, bool) if self.periodic else (s >= 0)
    inside &= self.periodic | (s < num_slots)
    s = jnp.mod(s, num_slots)
    return inside & jnp.asarray(self.online)[ids, s]

  def next_available(self, seed, ids, t):
    del seed
    num_slots = self.online.shape[1]
    s = self._slot(t)
    first = s if self.periodic else jnp.maximum(s, 0)
    pos = first[..., None] + jnp.arange(num_slots).reshape(
      (1,) * first.ndim + (num_slots,)
    )  # [..., S]
    inside = self.periodic | (pos < num_slots)
    on = jnp.asarray(self.online)[ids[..., None], jnp.mod(pos, num_slots)]
    on &= inside
    j = jnp.argmax(on, axis=-1)
    p = jnp.take_along_axis(pos, j[..., None], -1)[..., 0]
    time = jnp.where(p == s, t, p.astype(_float()) * self.slot_seconds)
    return jnp.where(on.any(-1), time, jnp.inf)


Availability = Union[AlwaysAvailable, Diurnal, WindowTrace, SlotTrace]


# --------------------------------------------------------------------------
# The model


class TaskTimes(NamedTuple):
  """One training task per client (arrays of client_ids' shape).

  finish: arrival time at the server, ``+inf`` for a dropout.
  end: when the client stops (``finish``, or the time it leaves).
  completed: False for a dropout.
  """

  finish: jax.Array
  end: jax.Array
  completed: jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class ClientBehaviour:
  """Seeded client speeds, delays, availability and dropout.

  Args:
    seed: the seed every per-client draw derives from.
    step_seconds: ``c_k``, seconds per local step (default log-normal, median
      0.05 s, sigma 0.8: about an order of magnitude between the 5th and 95th
      percentile).
    download_seconds: ``D_k``, model download delay.
    upload_seconds: ``U_k``, update upload delay.
    jitter: ``sigma_J`` >= 0, per-task log-normal jitter of compute time.
    dropout: ``p`` in [0, 1], per-(client, task) probability of leaving before
      finishing (uniformly within the task's duration).
    availability: :class:`AlwaysAvailable`, :class:`Diurnal`,
      :class:`WindowTrace` or :class:`SlotTrace`.
  """

  seed: int = 0
  step_seconds: Distribution = LogNormal(math.log(0.05), 0.8)
  download_seconds: Distribution = LogNormal(math.log(2.0), 0.5)
  upload_seconds: Distribution = LogNormal(math.log(4.0), 0.5)
  jitter: float = 0.0
  dropout: float = 0.0
  availability: Availability = AlwaysAvailable()

  def __post_init__(self):
    if not isinstance(self.seed, (int, np.integer)):
      raise ValueError(
        f"ClientBehaviour.seed must be an int, got {self.seed!r}."
      )
    for name in ("step_seconds", "download_seconds", "upload_seconds"):
      dist = getattr(self, name)
      if not hasattr(dist, "sample"):
        raise ValueError(
          f"ClientBehaviour.{name} must be a distribution (LogNormal, "
          f"Pareto, LogLogistic, Constant), got {dist!r}."
        )
    _check_positive("ClientBehaviour.jitter", self.jitter, allow_zero=True)
    _check_finite("ClientBehaviour.dropout", self.dropout)
    if not 0 <= self.dropout <= 1:
      raise ValueError(
        f"ClientBehaviour.dropout must lie in [0, 1], got {self.dropout!r}."
      )
    if not hasattr(self.availability, "is_available"):
      raise ValueError(
        "ClientBehaviour.availability must be AlwaysAvailable, Diurnal, "
        f"WindowTrace or SlotTrace, got {self.availability!r}."
      )

  # Per-client draws (fixed for the client's lifetime).

  def step_time(self, client_ids) -> jax.Array:
    """``c_k``: seconds per local step."""
    ids = _ids(client_ids)
    return _per_client(self.seed, _STEP, ids, self.step_seconds.sample)

  def download_time(self, client_ids) -> jax.Array:
    """``D_k``: seconds to download the model."""
    ids = _ids(client_ids)
    return _per_client(self.seed, _DOWNLOAD, ids, self.download_seconds.sample)

  def upload_time(self, client_ids) -> jax.Array:
    """``U_k``: seconds to upload the update."""
    ids = _ids(client_ids)
    return _per_client(self.seed, _UPLOAD, ids, self.upload_seconds.sample)

  # Availability.

  def is_available(self, client_ids, t) -> jax.Array:
    """Whether each client is online at time ``t`` (bool, ids' shape)."""
    ids = _ids(client_ids)
    t = _scalar_or_like("t", t, ids)
    return self._is_available(ids, t)

  def next_available(self, client_ids, t) -> jax.Array:
    """The first time ``>= t`` each client is online (``+inf``: never)."""
    ids = _ids(client_ids)
    t = _scalar_or_like("t", t, ids)
    return self._next_available(ids, t)

  # Compiled once per model and shape for eager callers (inlined under jit).

  @functools.partial(jax.jit, static_argnums=0)
  def _is_available(self, ids, t):
    return self.availability.is_available(self.seed, ids, t)

  @functools.partial(jax.jit, static_argnums=0)
  def _next_available(self, ids, t):
    return self.availability.next_available(self.seed, ids, t)

  # Tasks.

  def task_times(self, client_ids, num_steps, t_start, key) -> TaskTimes:
    r"""Times of a task of ``num_steps`` local steps started at ``t_start``.

    .. math::

      T_k = t_0 + D_k + n\,c_k\,e^{\sigma_J Z_{k}} + U_k

    and, with probability ``dropout``, the client leaves at
    :math:`t_0 + V (T_k - t_0)` and ``finish = +inf``. ``Z_k``, the dropout
    coin and ``V`` come from ``fold_in(key, client_id)`` (``key``: e.g.
    :func:`task_key` of the round), so they are per (client, task).
    """
    ids = _ids(client_ids)
    steps = _scalar_or_like("num_steps", num_steps, ids)
    t0 = _scalar_or_like("t_start", t_start, ids)
    if key.shape != jax.random.PRNGKey(0).shape:
      raise ValueError(
        f"key has shape {key.shape}, expected one PRNGKey of shape "
        f"{jax.random.PRNGKey(0).shape} (see task_key)."
      )
    return self._task_times(ids, steps, t0, key)

  @functools.partial(jax.jit, static_argnums=0)
  def _task_times(self, ids, steps, t0, key) -> TaskTimes:
    jitter, p = self.jitter, self.dropout

    def per_task(k):
      k_z, k_drop, k_when = jax.random.split(k, 3)
      z = jax.random.normal(k_z, (), _float())
      drop = jax.random.uniform(k_drop, (), _float()) < p
      when = jax.random.uniform(k_when, (), _float())
      return jnp.exp(jitter * z), drop, when

    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(ids.ravel())
    factor, drop, when = jax.vmap(per_task)(keys)
    factor, drop, when = (x.reshape(ids.shape) for x in (factor, drop, when))
    duration = (
      self.download_time(ids)
      + steps * self.step_time(ids) * factor
      + self.upload_time(ids)
    )
    finish = t0 + duration
    leave = t0 + when * duration
    return TaskTimes(
      finish=jnp.where(drop, jnp.inf, finish),
      end=jnp.where(drop, leave, finish),
      completed=~drop,
    )

  def sampling_priority(self, client_ids, task) -> jax.Array:
    r"""``u_{k,j} ~ U(0, 1)``: client ``k``'s priority in task ``j``.

    The simulators sample the available clients with the smallest
    priorities (uniform sampling without replacement from the available
    clients): all of a synchronous round's clients in its task, one client
    per dispatch (task = dispatch number) in asynchronous training. Drawn
    from ``fold_in(fold_in(task_key(seed, j), SAMPLING), k)``.
    """
    ids = _ids(client_ids)
    return self._priority(ids, jnp.asarray(task, jnp.int32))

  @functools.partial(jax.jit, static_argnums=0)
  def _priority(self, ids, task):
    base = jax.random.fold_in(task_key(self.seed, task), _SAMPLING)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(ids.ravel())
    u = jax.vmap(lambda k: jax.random.uniform(k, (), _float()))(keys)
    return u.reshape(ids.shape)

  def latency(self, client_ids, num_steps, t_start, key) -> jax.Array:
    r"""Finish time of each client's task, ``+inf`` for a dropout.

    :math:`T_k = t_0 + D_k + n\,c_k\,e^{\sigma_J Z_k} + U_k` (see
    :meth:`task_times`).
    """
    return self.task_times(client_ids, num_steps, t_start, key).finish
