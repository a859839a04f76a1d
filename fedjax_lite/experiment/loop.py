"""The round loop shared by :func:`~fedjax_lite.experiment.train` and
:func:`~fedjax_lite.experiment.sweep`: metric rows, progress bar, signals and
crash-safe checkpoints.

Crash safety. A run folder gets a checkpoint before its first round and then
periodically, bounded by wall time, so a run killed without warning (SIGKILL,
an out-of-memory kill, a preempted job, a power cut) loses at most
``Checkpointing.every_seconds`` of work (default 60 s). Checkpoints are also
written more often while they are cheap: the gap between two checkpoints is
``max(1 s, cost / overhead)`` where ``cost`` is how long the last one took,
so writing them stays under ``overhead`` (default 1%) of the run. Each
checkpoint first fsyncs ``metrics.jsonl``, then atomically replaces
``checkpoint.msgpack``; a resume drops metric rows after the checkpoint's
round, so every round appears exactly once.

SIGINT (Ctrl-C) or SIGTERM: the current chunk of rounds finishes, a
checkpoint is written, and the loop returns ``interrupted=True``.

Every round's rows go, in this order, to the metrics log, to the metric
writers (:class:`~fedjax_lite.experiment.writers.Tracking`, flushed at
each checkpoint before it is written) and to the callbacks.

Callbacks. ``callbacks=[fn, ...]``: after each round, in order, every
callback is called as ``fn(round, row, params)`` for every row of that
round (a sweep: one per setting, in setting order), where ``row`` is the
round's metric row (floats; NaN/inf as they are) and ``params()`` returns
the global model's parameters after that round (a sweep: the row's
setting's). Rounds run in jitted chunks and parameters exist only at a
chunk's end, so a callback states how often it reads them:
``fn.params_every = k`` (or :class:`Callback`) makes every ``k``-th round
(``round % k == 0``) end a chunk, where ``params()`` is that round's
parameters; on other rounds ``params()`` raises ValueError instead of
returning another round's. The default, ``k = 1``, ends a chunk after
every round; ``k = 0`` for a callback that never reads parameters leaves
the chunks as they are. The cost: one more dispatch of the compiled
rounds and one more host transfer of the chunk's metrics per chunk end
(the rounds do not compile again), which matters only when rounds take
less time than a dispatch; ``params()`` itself costs nothing until called.
A callback that raises stops the run with :class:`CallbackError` naming the
round; no checkpoint is written then, so the last one (before the failed
round) and ``metrics.jsonl`` stay consistent: a resume drops the rows after
it. The round at which a run stops as diverged is logged but not passed
to the callbacks (its non-finite model is not kept).
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import numpy as np

from fedjax_lite.engine.round import tree_finite
from fedjax_lite._optional import require
from fedjax_lite.experiment import checkpoint as ckpt
from fedjax_lite.experiment.records import MetricsLog

CHECKPOINT = "checkpoint.msgpack"
MIN_GAP_SECONDS = 1.0


@dataclasses.dataclass(frozen=True)
class Callback:
  """A per-round callback and how often it reads the global parameters.

  Attributes:
    fn: called as ``fn(round, row, params)`` after each round (see the
      module docstring).
    params_every: ``params()`` works every this many rounds (``round %
      params_every == 0``), where chunks of rounds end; 0: never (chunks
      as they would be). Default 1: every round.
  """

  fn: Callable[[int, dict, Callable[[], Any]], Any]
  params_every: int = 1

  def __post_init__(self):
    if not callable(self.fn):
      raise TypeError(
        f"a callback must be callable as fn(round, row, params), got "
        f"{self.fn!r}."
      )
    k = self.params_every
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
      raise ValueError(
        f"params_every of callback {self.name} must be an int >= 0 (0: it "
        f"never reads params), got {k!r}."
      )

  @property
  def name(self) -> str:
    return getattr(self.fn, "__qualname__", None) or repr(self.fn)

  @classmethod
  def of(cls, obj) -> "Callback":
    """``obj`` as a Callback: itself, or a callable with its
    ``params_every`` attribute (default 1)."""
    if isinstance(obj, cls):
      return obj
    return cls(obj, getattr(obj, "params_every", 1))

  def __call__(self, round_index: int, row: dict, params) -> Any:
    return self.fn(round_index, row, params)


class CallbackError(RuntimeError):
  """A callback raised; the run stopped after the round it was told.

  Attributes:
    round: that round.
    checkpoint_round: the round of the run folder's last checkpoint (None:
      no run folder), from which a resume continues.
  """

  def __init__(self, message: str, round_index: int, checkpoint_round):
    super().__init__(message)
    self.round = round_index
    self.checkpoint_round = checkpoint_round


class _Params:
  """``params()`` for one row: the parameters after the row's round, when
  the callback may read them there (see the module docstring)."""

  def __init__(self, row, state, params_of, every: int):
    self.row, self.state, self.params_of = row, state, params_of
    self.every = every

  def __call__(self):
    t = self.row.get("round")
    if self.every == 0:
      raise ValueError(
        "this callback has params_every=0 (it never reads params); set "
        "params_every to k >= 1 to read them every k-th round."
      )
    if t % self.every != 0:
      raise ValueError(
        f"params() at round {t}: this callback reads params every "
        f"{self.every} rounds (params_every={self.every}), and round {t} "
        f"is not one; call it when round % {self.every} == 0."
      )
    if self.state is None or self.params_of is None:
      raise ValueError(
        f"params() at round {t}: the parameters after this round were not kept."
      )
    return self.params_of(self.state, self.row)


@dataclasses.dataclass(frozen=True)
class Checkpointing:
  """When a run writes checkpoints.

  Attributes:
    every_seconds: the longest wall time between two checkpoints (the most
      work a crash can lose); None turns time-based checkpoints off.
    every_rounds: also checkpoint every this many rounds (0: off).
    overhead: checkpoint more often than ``every_seconds`` while writing
      them costs at most this share of the run's wall time (0: never early).
  """

  every_seconds: float | None = 60.0
  every_rounds: int = 0
  overhead: float = 0.01

  def __post_init__(self):
    if self.every_seconds is not None and not (
      isinstance(self.every_seconds, (int, float))
      and not isinstance(self.every_seconds, bool)
      and self.every_seconds > 0
    ):
      raise ValueError(
        f"checkpoint every_seconds must be a positive number "
        f"of seconds or None (off), got "
        f"{self.every_seconds!r}."
      )
    if (
      isinstance(self.every_rounds, bool)
      or not isinstance(self.every_rounds, int)
      or self.every_rounds < 0
    ):
      raise ValueError(
        f"checkpoint every_rounds must be an int >= 0 (0: "
        f"off), got {self.every_rounds!r}."
      )
    if not 0 <= self.overhead < 1:
      raise ValueError(
        f"checkpoint overhead must be in [0, 1), got {self.overhead!r}."
      )

  def gap(self, cost: float) -> float:
    """Seconds between time-based checkpoints, given the last one's cost."""
    if self.every_seconds is None:
      return math.inf
    early = cost / self.overhead if self.overhead > 0 else math.inf
    return min(float(self.every_seconds), max(MIN_GAP_SECONDS, early))


class StopOnSignal:
  """Turns SIGINT/SIGTERM into a request to stop after the current chunk.

  A second SIGINT while stopping raises KeyboardInterrupt (hard stop). Only
  active in the main thread; elsewhere it is a no-op.
  """

  def __init__(self, enabled: bool = True):
    self.enabled = (
      enabled and threading.current_thread() is threading.main_thread()
    )
    self.signum: int | None = None
    self._old: dict = {}

  def _handler(self, signum, frame):
    del frame
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signum = signum
    tqdm = require("tqdm.auto", "experiment").tqdm

    tqdm.write(
      f"received {signal.Signals(signum).name}: finishing the "
      "current round and writing a checkpoint ..."
    )

  @property
  def requested(self) -> bool:
    return self.signum is not None

  def agreed(self) -> bool:
    """Whether to stop now: :attr:`requested` in ANY process of a
    multi-process run (all processes call this after the same round, so they
    stop together instead of one waiting for the others in a collective)."""
    import jax  # pylint: disable=g-import-not-at-top

    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    import numpy as np  # pylint: disable=g-import-not-at-top

    flags = multihost_utils.process_allgather(np.int32(self.signum or 0))
    signum = int(np.max(flags))
    if signum and self.signum is None:
      self.signum = signum
    return signum != 0

  def __enter__(self):
    if self.enabled:
      for s in (signal.SIGINT, signal.SIGTERM):
        self._old[s] = signal.signal(s, self._handler)
    return self

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)
    self._old = {}


class Diverged(Exception):
  """Raised by an ``advance`` whose rounds became non-finite (see
  :func:`divergence`).

  Attributes:
    reason: why.
    round: the first non-finite round.
    rows: the metric rows of the chunk's rounds up to ``round`` (rows of
      earlier, finite rounds included).
    state: the state after round ``round - 1`` (None: the state the
      ``advance`` was given, which is then round ``round - 1``'s).
  """

  def __init__(
    self,
    reason: str,
    round_index: int,
    rows: Sequence[dict],
    state: Any = None,
  ):
    super().__init__(reason)
    self.reason, self.round, self.rows = reason, int(round_index), list(rows)
    self.state = state


# Metrics for which +inf is a legitimate value (not a divergence).
UNBOUNDED_METRICS = ("dp_epsilon",)


def divergence(metrics: Mapping[str, Any], params: Any = None) -> str | None:
  """Why a round diverged, or None.

  A round diverged when any of its reported float metrics (training loss
  and the like, averaged over the clients that took part) is NaN or
  infinite, when every sampled client's update was non-finite (the engine
  dropped them all: ``num_clients == 0`` and ``dropped_nonfinite > 0``), or
  when a parameter of the new global model is non-finite. A privacy budget
  (``dp_epsilon``) of ``+inf`` is a value, not a divergence: a DP run
  without noise (noise multiplier 0) spends an infinite budget.

  Args:
    metrics: the round's metrics (host values, scalars).
    params: the new global parameters (checked with one reduction on their
      device), or None.
  """
  bad = sorted(
    k
    for k, v in metrics.items()
    if not k.startswith("_")
    and np.ndim(v) == 0
    and np.issubdtype(np.asarray(v).dtype, np.inexact)
    and not np.isfinite(v)
    and not (k.endswith(UNBOUNDED_METRICS) and float(v) == np.inf)
  )
  if bad:
    return "non-finite " + ", ".join(f"{k}={float(metrics[k])}" for k in bad)
  dropped = float(metrics.get("dropped_nonfinite", 0.0))
  if dropped > 0 and float(metrics.get("num_clients", 1.0)) == 0:
    return f"all {dropped:g} sampled clients sent non-finite updates"
  if params is not None and not bool(_tree_finite(params)):
    return "non-finite global model parameters"
  return None


_tree_finite = jax.jit(tree_finite)


class LoopResult(NamedTuple):
  """What :func:`run_rounds` returns.

  Attributes:
    state: the final (or interrupted) state.
    interrupted: a signal stopped the loop early.
    signum: that signal.
    checkpoints: checkpoints written by this call, the first (before any
      round) and the last (at the end or on a signal) included.
    checkpoint_seconds: wall time spent writing them.
    diverged: why the run stopped as diverged (see :class:`Diverged`), or
      None; the checkpoint then holds the last finite state.
    diverged_round: the first non-finite round.
  """

  state: Any
  interrupted: bool
  signum: int | None
  checkpoints: int = 0
  checkpoint_seconds: float = 0.0
  diverged: str | None = None
  diverged_round: int | None = None


# advance(state, t, max_rounds, seconds) -> (state, rows, rounds_done):
# runs 1 <= rounds_done <= max_rounds rounds after round t, ideally within
# ``seconds`` of wall time, and returns their metric rows. It raises
# Diverged (with the last finite state) for rounds that became non-finite.
Advance = Callable[[Any, int, int, float], tuple[Any, Sequence[dict], int]]


def _postfix(rows: Sequence[dict], history: Sequence[dict]) -> dict:
  """Progress-bar numbers: the chunk's last round, averaged over runs."""
  if not rows:
    return {}
  last = [r for r in rows if r.get("round") == rows[-1].get("round")]
  out = {}
  for key, label, fmt in (
    ("train_loss", "loss", ".4f"),
    ("train_accuracy", "acc", ".3f"),
  ):
    vals = [r[key] for r in last if isinstance(r.get(key), (int, float))]
    if vals:
      out[label] = f"{sum(vals) / len(vals):{fmt}}"
  for r in reversed(history):
    if isinstance(r.get("test_accuracy"), (int, float)):
      tests = [
        q["test_accuracy"]
        for q in history
        if q.get("round") == r["round"] and "test_accuracy" in q
      ]
      out["test_acc"] = f"{sum(tests) / len(tests):.3f}"
      break
  return out


def run_rounds(
  advance: Advance,
  state,
  *,
  start: int,
  num_rounds: int,
  log: MetricsLog,
  run_dir: Path | None,
  checkpointing: Checkpointing = Checkpointing(),
  elapsed0: float = 0.0,
  progress: bool = True,
  desc: str = "",
  handle_signals: bool = True,
  identity: dict | None = None,
  tracking=None,
  callbacks: Sequence[Any] = (),
  params_of: Callable[[Any, Mapping], Any] | None = None,
) -> LoopResult:
  """Advances ``state`` from round ``start`` to ``num_rounds``.

  Args:
    advance: runs the next rounds (see :data:`Advance`).
    state: the state after round ``start`` (a flax-serializable pytree).
    start: rounds already done.
    num_rounds: the last round.
    log: receives every round's rows (in memory when it has no folder).
    run_dir: where ``checkpoint.msgpack`` goes (None: no checkpoints).
    checkpointing: when to checkpoint (see :class:`Checkpointing`).
    elapsed0: wall time of the run before this call (resumes).
    progress: show a tqdm progress bar.
    desc: its label.
    handle_signals: stop cleanly on SIGINT/SIGTERM.
    identity: recorded in every checkpoint's meta (see
      :func:`~fedjax_lite.experiment.checkpoint.check_identity`).
    tracking: a :class:`~fedjax_lite.experiment.writers.Tracking` that gets
      every row and is flushed before each checkpoint (the caller closes
      it), or None.
    callbacks: called after each round (see the module docstring):
      callables ``fn(round, row, params)`` or :class:`Callback`.
    params_of: ``(state, row) -> params``: the global parameters of the
      row's run in ``state`` (what callbacks' ``params()`` returns).

  Raises:
    CallbackError: a callback raised (the run stopped after that round).
  """
  tqdm = require("tqdm.auto", "experiment").tqdm
  callbacks = [Callback.of(c) for c in callbacks]
  every = sorted({c.params_every for c in callbacks} - {0})

  t0 = time.perf_counter()

  written = [0, 0.0]
  saved = [None]  # the round of the last checkpoint

  def emit(rows, state_at: dict) -> None:
    """Logs ``rows``, writes them to the tracking writers and calls the
    callbacks; ``state_at``: {round: the state after it} where known."""
    for row in rows:
      log.append(row)
      if tracking is not None:
        tracking.write(row)
      if not callbacks:
        continue
      t = row.get("round")
      state_t = state_at.get(t)
      for c in callbacks:
        try:
          c(t, dict(row), _Params(row, state_t, params_of, c.params_every))
        except Exception as e:
          where = (
            ""
            if run_dir is None
            else f"; the last checkpoint (round {saved[0]}) in {run_dir} "
            "resumes it"
          )
          raise CallbackError(
            f"callback {c.name} raised after round {t} "
            f"({type(e).__name__}: {e}); the run stopped there{where}.",
            t,
            saved[0],
          ) from e

  def save(t: int) -> float:
    """Checkpoints round ``t``; returns the seconds it took."""
    tick = time.perf_counter()
    written[0] += 1
    log.sync()
    if tracking is not None:
      tracking.flush()
    ckpt.save_checkpoint(
      run_dir / CHECKPOINT,
      state,
      {
        "round": t,
        "elapsed": elapsed0 + (tick - t0),
        "num_rows": len(log.rows),
        "time": datetime.datetime.now().isoformat(timespec="seconds"),
        **({"identity": identity} if identity else {}),
      },
    )
    written[1] += time.perf_counter() - tick
    saved[0] = t
    return time.perf_counter() - tick

  t = start
  cost = save(t) if run_dir is not None else 0.0
  last_save = time.perf_counter()
  bar = tqdm(
    total=num_rounds,
    initial=start,
    unit="round",
    desc=desc,
    disable=not progress,
    dynamic_ncols=True,
  )
  stopper = StopOnSignal(handle_signals)
  interrupted = False
  diverged = None
  try:
    with stopper:
      while t < num_rounds:
        if run_dir is None:
          seconds = math.inf
        else:
          seconds = max(
            0.0, checkpointing.gap(cost) - (time.perf_counter() - last_save)
          )
        max_rounds = num_rounds - t
        if checkpointing.every_rounds and run_dir is not None:
          max_rounds = min(
            max_rounds,
            checkpointing.every_rounds - t % checkpointing.every_rounds,
          )
        for k in every:  # callbacks read params there: end a chunk
          max_rounds = min(max_rounds, k - t % k)
        tick = time.perf_counter()
        try:
          state, rows, done = advance(state, t, max_rounds, seconds)
        except Diverged as e:
          # Keep the last finite state (round e.round - 1) as the checkpoint;
          # the diverged round's rows follow it in the log (a resume drops
          # them).
          diverged = e
          if e.state is not None:
            state = e.state
          t = e.round - 1
          emit([r for r in e.rows if r.get("round", t) <= t], {t: state})
          if run_dir is not None:
            save(t)
          for row in e.rows:  # the diverged round: no callbacks
            if row.get("round", t) > t:
              log.append(row)
              if tracking is not None:
                tracking.write(row)
          break
        dt = time.perf_counter() - tick
        t += done
        emit(rows, {t: state})
        post = _postfix(rows, log.rows)
        post["rounds/s"] = (
          f"{bar.format_dict.get('rate') or done / max(dt, 1e-9):.1f}"
        )
        bar.set_postfix(post, refresh=False)
        bar.update(done)
        stop = stopper.agreed()
        if run_dir is None:
          if stop and t < num_rounds:
            interrupted = True
            break
          continue
        now = time.perf_counter()
        due = (now - last_save >= checkpointing.gap(cost)) or (
          checkpointing.every_rounds and t % checkpointing.every_rounds == 0
        )
        if stop and t < num_rounds:
          interrupted = True
          save(t)
          break
        if due and t < num_rounds:
          cost = save(t)
          last_save = time.perf_counter()
      else:
        if run_dir is not None:
          save(t)
  finally:
    bar.close()
    log.close()
  return LoopResult(
    state,
    interrupted,
    stopper.signum if interrupted else None,
    written[0],
    written[1],
    None if diverged is None else diverged.reason,
    None if diverged is None else diverged.round,
  )
