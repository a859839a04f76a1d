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
    tqdm = require("tqdm", "experiment").tqdm

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
  """
  tqdm = require("tqdm", "experiment").tqdm

  t0 = time.perf_counter()

  written = [0, 0.0]

  def save(t: int) -> float:
    """Checkpoints round ``t``; returns the seconds it took."""
    tick = time.perf_counter()
    written[0] += 1
    log.sync()
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
          for row in e.rows:
            if row.get("round", t) <= t:
              log.append(row)
          if run_dir is not None:
            save(t)
          for row in e.rows:
            if row.get("round", t) > t:
              log.append(row)
          break
        dt = time.perf_counter() - tick
        t += done
        for row in rows:
          log.append(row)
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
