"""A session: an :class:`Experiment` run into a run folder, with checkpoints and resume.

A run folder ``runs/<name>-<timestamp>/`` holds:

* ``config.json``: the experiment file, its resolved config and the
  environment (written before the first round);
* ``metrics.jsonl`` / ``metrics.csv``: one row per round (``round``,
  ``train_<metric>``, ``train_num_clients``, ``round_time_s``,
  ``rounds_per_s``, ``wall_time``) and, on evaluation rounds,
  ``test_<metric>`` plus the per-client test accuracy quantiles
  ``test_accuracy_p10 ... p90`` (a non-finite value is ``null``, see
  :mod:`fedjax_lite.experiment.records`);
* with ``writers=`` (``--log``): ``tensorboard/``, ``wandb/``, ``mlflow.db``
  and ``tracking.json``, the same rows in experiment-tracking tools (see
  :mod:`fedjax_lite.experiment.writers`);
* ``curves.png``: convergence curves; ``summary.json``: final metrics;
* ``checkpoint.msgpack``: the latest full state (see
  :mod:`fedjax_lite.experiment.checkpoint`), written before the first round,
  at most every 60 s of wall time (more often while cheap), on SIGINT/SIGTERM
  and at the end (see :mod:`fedjax_lite.experiment.loop`).

A run killed in any way resumes from its last checkpoint; SIGINT (Ctrl-C) or
SIGTERM first finishes the current round and checkpoints, and :func:`train`
returns with ``interrupted=True`` (the command line then exits with ``128 +
signal number``: 130 or 143). Resuming restores the state and drops metric
rows after the checkpoint, so the resumed run computes bit-identical
parameters and metrics (timing columns aside).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np

from fedjax_lite import checks, distributed
from fedjax_lite.engine.round import Engine, EngineState
from fedjax_lite.experiment import checkpoint as ckpt
from fedjax_lite.experiment import config as cfglib
from fedjax_lite.experiment import loop
from fedjax_lite.experiment import writers as writerlib
from fedjax_lite.experiment.core import Experiment
from fedjax_lite.experiment.evaluator import Evaluator
from fedjax_lite.experiment.loop import Checkpointing, LoopResult, run_rounds
from fedjax_lite.experiment.records import MetricsLog, final_values
from fedjax_lite.experiment.runs import (
  PARAMS_FINITE,
  VmappedRounds,
  engine_for,
)
from fedjax_lite.experiment.run_folder import (
  data_mb_per_device,
  describe,
  finish,
  load_resume_state,
)


@dataclasses.dataclass
class RunResult:
  """What :func:`train` returns.

  Attributes:
    run_dir: the run folder (None for in-memory runs).
    state: the final (or interrupted) EngineState.
    rows: all metric rows of the run (including those before a resume).
    interrupted: True if a signal stopped the run early.
    signum: the signal that stopped it, if any.
    get_params: the algorithm's ``server_state -> params``.
    diverged: why the run stopped as diverged (a round's loss or the global
      model became non-finite), or None. ``state`` is then the last finite
      one (also the checkpoint's).
    diverged_round: the first non-finite round.
  """

  run_dir: Path | None
  state: EngineState
  rows: list
  interrupted: bool = False
  signum: int | None = None
  get_params: Callable[[Any], Any] | None = None
  diverged: str | None = None
  diverged_round: int | None = None

  @property
  def status(self) -> str:
    """``"finished"``, ``"interrupted"`` or ``"diverged"``."""
    if self.diverged is not None:
      return "diverged"
    return "interrupted" if self.interrupted else "finished"

  @property
  def params(self):
    """The global model's parameters (``algorithm.get_params``)."""
    return self.get_params(self.state.server)

  @property
  def final(self) -> dict:
    """The last value of every metric (test metrics from the last eval)."""
    return final_values(self.rows)


def train_row(metrics: dict) -> dict:
  """A round's scalar metrics as ``train_<name>`` columns (the total
  weight and private entries left out).

  ``train_num_clients`` is the engine's ``num_clients``: the clients whose
  updates the round aggregated (sampled, minus those dropped), so the
  uplink of a round is ``train_uplink_bytes * train_num_clients``.
  """
  row = {}
  for k, v in metrics.items():
    if k == "total_weight" or k.startswith("_"):
      continue
    a = np.asarray(v)
    if a.ndim == 0:
      row[f"train_{k}"] = float(a)
  return row


def eval_rounds(exp: Experiment) -> list[int]:
  """The rounds after which ``exp`` evaluates: every ``eval_every``-th and
  the last."""
  every = range(exp.eval_every, exp.num_rounds + 1, exp.eval_every or 1)
  return sorted(set(every if exp.eval_every else ()) | {exp.num_rounds})


def max_chunk(exp: Experiment) -> int:
  """The most rounds between two evaluations (the longest chunk of rounds
  an :func:`advance` runs in one call)."""
  ends = eval_rounds(exp)
  return max(b - a for a, b in zip([0] + ends[:-1], ends))


# A chunk of rounds takes at most about this long once the speed is known,
# so the progress bar moves and a signal is answered within it.
CHUNK_SECONDS = 1.0


def advance(
  sess: "Session", runs: VmappedRounds, columns: Sequence[dict] | None = None
) -> loop.Advance:
  """What :func:`train` and :func:`~fedjax_lite.experiment.sweeps.sweep`
  run rounds with: moves every setting of ``runs`` forward a chunk of
  rounds, returns one metric row per round and setting, evaluates after
  evaluation rounds and stops a diverged run (see :data:`loop.Advance`).

  A chunk ends at the next evaluation round, at most ``max_rounds`` (the
  loop's checkpoint and signal bounds) and, once the speed is known, after
  about ``min(seconds, CHUNK_SECONDS)`` of rounds (the first chunk is one
  round). Every row holds ``round``, ``train_<metric>``, ``round_time_s``
  and ``rounds_per_s`` (the chunk's average) and ``wall_time``, plus the
  test metrics on evaluation rounds; a sweep's rows start with
  ``columns[i]`` (its setting's index and values).

  With ``on_divergence="stop"``, the first round in which every setting
  diverged (:func:`loop.divergence`: non-finite metrics, every client
  dropped, or a non-finite global model) raises :class:`loop.Diverged` with
  the state after the round before it (rerun from the chunk's start: the
  rounds are deterministic) and the rows up to the diverged round.

  Args:
    sess: the session (experiment, data, evaluator, options, clock).
    runs: the settings' rounds (one setting, unstacked, for a run).
    columns: per setting, the leading columns of its rows (None: a run).
  """
  exp, data = sess.exp, sess.data
  ends = eval_rounds(exp)
  stop = sess.options.on_divergence == "stop"
  num = len(runs.settings)
  speed: dict = {}

  def by_setting(tree):  # [rounds, S, ...] host arrays, stacked or not
    return jax.tree.map(
      lambda a: np.asarray(a) if runs.stacked else np.asarray(a)[:, None],
      tree,
    )

  def rows_of(metrics, finite, t, n, dt):
    rows, reasons = [], []
    for k in range(n):
      diverged = []
      for i in range(num):
        m = {key: v[k, i] for key, v in metrics.items()}
        if stop:
          diverged.append(
            loop.divergence(m)
            or (None if finite[k, i] else "non-finite global model parameters")
          )
        row = {
          **(columns[i] if columns is not None else {}),
          "round": t + k + 1,
          **train_row(m),
          "round_time_s": dt / n,
          "rounds_per_s": n / max(dt, 1e-9),
        }
        rows.append(row)
      if stop and all(r is not None for r in diverged):
        reasons.append((k + 1, diverged))
        break
    return rows, reasons

  def step(state, t, max_rounds, seconds):
    n = min(max_rounds, next(e for e in ends if e > t) - t)
    n = (
      1
      if not speed
      else max(1, min(n, int(min(seconds, CHUNK_SECONDS) / speed["s"])))
    )
    tick = time.perf_counter()
    new, metrics = runs.run(state, data, n)
    metrics = by_setting(jax.device_get(metrics))
    finite = metrics.pop(PARAMS_FINITE)
    dt = time.perf_counter() - tick
    speed["s"] = dt / n
    rows, reasons = rows_of(metrics, finite, t, n, dt)
    if reasons:
      k, why = reasons[0]
      wall = sess.wall_time()
      for row in rows:
        row["wall_time"] = wall
      last = state if k == 1 else runs.run(state, data, k - 1)[0]
      reason = (
        why[0]
        if columns is None
        else "every setting diverged (setting 0: " + why[0] + ")"
      )
      raise loop.Diverged(reason, t + k, rows, last)
    if t + n in ends:  # the chunk's last round: its rows are the last num
      params = runs.params(new)
      for i, row in enumerate(rows[-num:]):
        row.update(sess.evaluator(runs.state_of(params, i)))
    wall = sess.wall_time()
    for row in rows:
      row["wall_time"] = wall
    return new, rows, n

  return step


def rounds_done(state: EngineState) -> int:
  """The rounds a state has done (a sweep's settings all did as many)."""
  return int(np.asarray(jax.device_get(state.round)).reshape(-1)[0])


@dataclasses.dataclass(frozen=True)
class RunOptions:
  """How a run goes: the keywords that :func:`train` and
  :func:`~fedjax_lite.experiment.sweeps.sweep` share.

  Attributes:
    resume: continue from ``run_dir/checkpoint.msgpack``.
    checkpoint_every: also checkpoint every this many rounds (0: off).
    checkpoint_every_seconds: the most wall time between two checkpoints,
      i.e. the most work a crash can lose (default 60; None: only at the
      start, on SIGINT/SIGTERM and at the end). Cheap checkpoints are
      written more often (see :mod:`fedjax_lite.experiment.loop`).
    progress: show a tqdm progress bar (``tqdm.auto``: a widget in
      Jupyter, text elsewhere).
    handle_signals: stop cleanly on SIGINT/SIGTERM (see the module
      docstring).
    desc: progress bar label (None: the experiment's name).
    on_ready: called once the session has loaded and checked what it
      resumes (the checkpoint, its round against ``num_rounds``), before it
      writes any file; a refused resume thus leaves the folder as it was
      (:func:`launch_file` writes the resumed record here).
    on_divergence: ``"stop"`` (default): a round whose loss or new global
      model is non-finite (a sweep: in every setting) (see :func:`~fedjax_lite.experiment.loop.
      divergence`) ends the run with status ``"diverged"``, keeping the
      last finite state as the checkpoint; ``"continue"``: keep going.
    identity: what the run's checkpoints record of the experiment they
      belong to (:func:`launch_file` sets the experiment file's name and
      the run folder's experiment hash); the state's leaf paths, shapes and
      dtypes are added by :class:`Session`. A resume whose identity differs
      is refused before any file is touched.
    writers: metric writers besides ``metrics.jsonl`` (always written):
      ``"tensorboard,wandb,mlflow"`` or a subset, a list of such names,
      and (a run, not a sweep) :class:`~fedjax_lite.experiment.writers.
      MetricWriter` objects, which the run closes at its end. Every row
      goes to every writer with ``step = round``; a sweep makes one
      tracking run per setting (see :mod:`fedjax_lite.experiment.writers`,
      also for what a resume does in each tool).
    callbacks: called after each round as ``fn(round, row, params)``, in
      order; ``params()`` is the global model after that round, on the
      rounds the callback's ``params_every`` names (see
      :mod:`fedjax_lite.experiment.loop`: chunks of rounds end there). A
      callback that raises stops the run
      (:class:`~fedjax_lite.experiment.loop.CallbackError`).
  """

  resume: bool = False
  checkpoint_every: int = 0
  checkpoint_every_seconds: float | None = 60.0
  progress: bool = True
  handle_signals: bool = True
  desc: str | None = None
  on_ready: Callable[[], None] | None = None
  on_divergence: str = "stop"
  identity: dict | None = None
  writers: Any = None
  callbacks: Sequence[Any] = ()

  def __post_init__(self):
    if self.on_divergence not in ("stop", "continue"):
      raise ValueError(
        "on_divergence must be 'stop' or 'continue', got "
        f"{self.on_divergence!r}."
      )
    w = self.writers
    items = [w] if isinstance(w, (str, writerlib.MetricWriter)) else w
    if w is not None and not (
      isinstance(items, (list, tuple))
      and all(isinstance(x, (str, writerlib.MetricWriter)) for x in items)
    ):
      raise ValueError(
        "writers must be writer names (e.g. 'tensorboard,mlflow' or "
        "['tensorboard', 'mlflow']) or MetricWriter objects, got "
        f"{w!r}."
      )
    if w is not None:
      writerlib.parse_spec([x for x in items if isinstance(x, str)])
    if callable(self.callbacks) or not isinstance(
      self.callbacks, (list, tuple)
    ):
      raise TypeError(
        "callbacks must be a list of callables fn(round, row, params), got "
        f"{self.callbacks!r}."
      )
    object.__setattr__(
      self, "callbacks", tuple(loop.Callback.of(c) for c in self.callbacks)
    )

  @classmethod
  def of(cls, caller: str, options: dict) -> "RunOptions":
    """``RunOptions(**options)``; an unknown keyword is a TypeError naming
    ``caller`` and the known ones."""
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(known))
    if unknown:
      raise TypeError(
        f"{caller}() got unknown keyword argument(s) {unknown}; "
        f"its run options are {known}."
      )
    return cls(**options)

  def checkpointing(self) -> Checkpointing:
    """The checkpoint policy these options ask for."""
    return Checkpointing(
      every_seconds=self.checkpoint_every_seconds,
      every_rounds=self.checkpoint_every,
    )


@dataclasses.dataclass
class Session:
  """What a run (:func:`train`) or a sweep sets up before its first round.

  Attributes:
    exp: the experiment.
    run_dir: the run folder (None: in memory only).
    engine: ``exp``'s Engine (see :func:`engine_for`).
    data: the training data on the devices.
    evaluator: the test-data :class:`Evaluator`.
    state: the initial state, or the checkpoint's when resuming.
    elapsed0: wall time of the run before this session (resumes).
    log: the metrics log, without the rows after the checkpoint.
    t0: ``time.perf_counter()`` when the session started.
    options: the run's :class:`RunOptions`.
    write: whether this process writes the run folder (process 0).
    tracking: the metric writers of ``options.writers`` (None: none), made
      by :meth:`open` and closed by :meth:`run`.
  """

  exp: Experiment
  run_dir: Path | None
  engine: Engine
  data: Any
  evaluator: Evaluator
  state: Any
  elapsed0: float
  log: MetricsLog
  t0: float
  options: RunOptions = RunOptions()
  write: bool = True
  tracking: writerlib.Tracking | None = None

  @property
  def start(self) -> int:
    """Rounds done before this session."""
    return rounds_done(self.state)

  @classmethod
  def open(
    cls,
    exp: Experiment,
    run_dir: str | os.PathLike | None,
    options: RunOptions,
    init: Callable[[Engine, Any], Any],
    *,
    write: bool = True,
    settings: Sequence[dict] | None = None,
  ) -> "Session":
    """Uploads the data, makes the initial state (``init(engine, data)``) and,
    when ``options.resume``, replaces it by ``run_dir``'s checkpoint. With
    ``write`` False (processes other than 0 of a multi-process run) the
    session reads ``run_dir``'s checkpoint but writes no file there.

    It then opens the metric writers of ``options.writers`` (one set per
    setting of a sweep: ``settings``), writes their hparams
    (:func:`tracking_hparams`) and, on a resume, replays the rows up to
    the checkpoint to them (each writer keeps what it lacks)."""
    resume = options.resume
    if run_dir is None and resume:
      raise ValueError("resume=True needs the run_dir holding the checkpoint.")
    names = _writer_names(options.writers)
    if names and run_dir is None:
      raise ValueError(
        f"writers={names!r} need a run folder for their files; pass run_dir "
        "(or MetricWriter objects for an in-memory run)."
      )
    writerlib.require_libraries(names)  # missing: one line, before any work
    if write:  # the tools start while the rounds compile
      writerlib.prestart(names)
    try:
      return cls._start(exp, run_dir, options, init, write, settings)
    except BaseException:
      writerlib.discard_unused()
      raise

  @classmethod
  def _start(cls, exp, run_dir, options, init, write, settings) -> "Session":
    resume = options.resume
    engine = engine_for(exp)
    try:
      data = engine.put_data(exp.train, placement=exp.placement)
      evaluator = Evaluator(exp, engine)
    except checks.DataError as e:  # one error line on the command line
      raise cfglib.ConfigError(" ".join(str(e).split())) from e
    state = init(engine, data)
    identity = {
      **(options.identity or {}),
      "state": ckpt.state_signature(state),
    }
    options = dataclasses.replace(options, identity=identity)
    run_dir = None if run_dir is None else Path(run_dir)
    elapsed0 = 0.0
    if resume:
      host_state, meta = load_resume_state(run_dir, state, identity)
      state = jax.device_put(host_state, engine.replicated)
      elapsed0 = float(meta.get("elapsed", 0.0))
    start = rounds_done(state)
    if start > exp.num_rounds:
      raise cfglib.ConfigError(
        f"num_rounds={exp.num_rounds} is below the round {start} of the "
        f"checkpoint in {run_dir}; expected num_rounds >= {start}."
      )
    if options.on_ready is not None:
      options.on_ready()
    writes = run_dir if write else None
    log = MetricsLog(writes, keep_until_round=start if writes else None)
    tracking = None
    if write:
      try:
        tracking = writerlib.Tracking.open(
          options.writers,
          run_dir,
          hparams=tracking_hparams(exp, run_dir, settings is not None),
          settings=settings,
          resume=None
          if not resume
          else writerlib.Resume(start, max(start, log.logged_round or 0)),
          history=log.rows,
        )
      except BaseException:
        log.close()
        raise
    return cls(
      exp,
      run_dir,
      engine,
      data,
      evaluator,
      state,
      elapsed0,
      log,
      time.perf_counter(),
      options,
      write,
      tracking,
    )

  def wall_time(self) -> float:
    """Wall time of the run so far, sessions before this one included."""
    return self.elapsed0 + (time.perf_counter() - self.t0)

  def run(
    self,
    advance,
    desc: str,
    params_of: Callable[[Any, dict], Any] | None = None,
  ) -> LoopResult:
    """:func:`~fedjax_lite.experiment.loop.run_rounds` from :attr:`start`
    to ``exp.num_rounds`` as :attr:`options` say (``desc``: the progress
    label when the options give none; ``params_of(state, row)``: the
    global parameters of the row's run, for callbacks). Closes the
    metric writers at the end, however the loop ends."""
    opts = self.options
    try:
      return run_rounds(
        advance,
        self.state,
        start=self.start,
        num_rounds=self.exp.num_rounds,
        log=self.log,
        run_dir=self.run_dir if self.write else None,
        checkpointing=opts.checkpointing(),
        elapsed0=self.elapsed0,
        progress=opts.progress,
        desc=opts.desc or desc,
        handle_signals=opts.handle_signals,
        identity=opts.identity,
        tracking=self.tracking,
        callbacks=opts.callbacks,
        params_of=params_of,
      )
    finally:
      if self.tracking is not None:
        self.tracking.close()


def _writer_names(writers) -> list[str]:
  """The writer names in a ``writers`` option, ``jsonl`` left out."""
  if writers is None or isinstance(writers, writerlib.MetricWriter):
    return []
  items = [writers] if isinstance(writers, str) else writers
  names = writerlib.parse_spec([w for w in items if isinstance(w, str)])
  return [n for n in names if n != "jsonl"]


def tracking_hparams(
  exp: Experiment, run_dir: Path | None, sweep: bool = False
) -> dict:
  """What the metric writers get as hparams: :func:`~fedjax_lite.
  experiment.run_folder.describe` of ``exp`` (model, algorithm, round
  config, ...), the resolved config of the run folder's record
  (``config.json``; a sweep's ``sweep.json``) when it has one, and the
  experiment's hyperparameters (a sweep adds each setting's own), flattened
  to ``{"a.b": scalar}``."""
  summary = dict(describe(exp))
  summary.pop("hparams", None)
  out = writerlib.flatten(summary)
  if run_dir is not None:
    record = run_dir / ("sweep.json" if sweep else "config.json")
    try:
      config = json.loads(record.read_text()).get("config")
    except (OSError, ValueError, AttributeError):
      config = None
    if isinstance(config, dict):
      out.update(writerlib.flatten(config))
  out.update(writerlib.flatten(dict(exp.hparams)))
  return out


def train(
  exp: Experiment,
  run_dir: str | os.PathLike | None = None,
  *,
  placement: str | None = None,
  **options,
) -> RunResult:
  """Runs ``exp`` (or resumes it) and writes the run folder.

  A run is the sweep of one setting (``exp.seed``, ``exp.algorithm``): the
  same :func:`advance` moves it forward, in chunks of rounds between
  evaluations, on the same compiled rounds (:class:`VmappedRounds`), with
  a state that carries no setting axis.

  In a multi-process run (:mod:`fedjax_lite.distributed`) every process calls
  this with the same arguments; all of them read a checkpoint to resume, and
  only process 0 writes the folder.

  Args:
    exp: the experiment.
    run_dir: the run folder (created if missing); None runs in memory only
      (no files, no checkpoints: handy in notebooks).
    placement: overrides ``exp.placement`` (``"replicated"``/``"sharded"``).
    **options: :class:`RunOptions` (``resume``, ``checkpoint_every``,
      ``checkpoint_every_seconds``, ``progress``, ``handle_signals``,
      ``desc``, ``on_divergence``, ``writers``, ``callbacks``).

  Returns:
    A :class:`RunResult`.
  """
  if placement is not None:
    exp = dataclasses.replace(exp, placement=placement)
  opts = RunOptions.of("train", options)
  write = distributed.is_main()
  if run_dir is not None and write:
    Path(run_dir).mkdir(parents=True, exist_ok=True)
  runs = VmappedRounds(exp, [exp.seed], None, max_chunk(exp), stacked=False)
  sess = Session.open(
    exp, run_dir, opts, lambda engine, data: runs.init(data), write=write
  )
  run_dir, log = sess.run_dir, sess.log
  out = sess.run(
    advance(sess, runs),
    exp.name or exp.algorithm.name,
    lambda state, row: runs.params(state),
  )
  if run_dir is not None and write:
    finish(
      run_dir,
      log.rows,
      exp,
      out.interrupted,
      {
        **(
          {}
          if out.diverged is None
          else {
            "status": "diverged",
            "diverged_round": out.diverged_round,
            "diverged_reason": out.diverged,
          }
        ),
        "checkpoints": out.checkpoints,
        "checkpoint_seconds": out.checkpoint_seconds,
        "placement": exp.placement,
        "processes": jax.process_count(),
        "train_data_mb_per_device": data_mb_per_device(sess.data),
      },
    )
  return RunResult(
    run_dir,
    out.state,
    list(log.rows),
    out.interrupted,
    out.signum,
    exp.algorithm.get_params,
    out.diverged,
    out.diverged_round,
  )
