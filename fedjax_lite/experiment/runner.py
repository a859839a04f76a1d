"""Runs an :class:`Experiment` into a run folder, with checkpoints and resume.

A run folder ``runs/<name>-<timestamp>/`` holds:

* ``config.json``: the experiment file, its resolved config and the
  environment (written before the first round);
* ``metrics.jsonl`` / ``metrics.csv``: one row per round (``round``,
  ``train_<metric>``, ``round_time_s``, ``rounds_per_s``, ``wall_time``) and,
  on evaluation rounds, ``test_<metric>`` plus the per-client test accuracy
  quantiles ``test_accuracy_p10 ... p90``;
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
import datetime
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from fedjax_lite import checks, distributed
from fedjax_lite._optional import require
from fedjax_lite.data.batching import LocalWork, to_device
from fedjax_lite.data.sharding import resident_bytes
from fedjax_lite.engine.evaluation import evaluate
from fedjax_lite.engine.round import Engine, EngineState
from fedjax_lite.experiment import checkpoint as ckpt
from fedjax_lite.experiment import config as cfglib
from fedjax_lite.experiment import loop, plots
from fedjax_lite.experiment.core import Experiment
from fedjax_lite.experiment.loop import (
  CHECKPOINT,
  Checkpointing,
  LoopResult,
  run_rounds,
)
from fedjax_lite.experiment.records import TIMING_KEYS, MetricsLog, final_values

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


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


def new_run_dir(out: str | os.PathLike, name: str) -> Path:
  """``out/<name>-<YYYYmmdd-HHMMSS>[-k]/``, created (never reused).

  Raises:
    ConfigError: the folder cannot be made (``out`` is read-only, a file,
      ...).
  """
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  base = Path(out) / f"{name}-{stamp}"
  path, k = base, 1
  while True:
    try:
      path.mkdir(parents=True, exist_ok=False)
      return path
    except FileExistsError:
      if not Path(out).is_dir():
        raise cfglib.ConfigError(
          f"--out {out}: not a folder; expected a writable folder for the "
          "run folders."
        ) from None
      k += 1
      path = Path(f"{base}-{k}")
    except OSError as e:
      raise cfglib.ConfigError(
        f"--out {out}: cannot create the run folder {path} "
        f"({e.strerror or e}); expected a writable folder."
      ) from None


def environment() -> dict:
  """Versions and devices, for config.json."""
  from fedjax_lite import runtime  # pylint: disable=g-import-not-at-top
  import fedjax_lite  # pylint: disable=g-import-not-at-top

  devs = jax.devices()
  return {
    "fedjax_lite": getattr(fedjax_lite, "__version__", "?"),
    "jax": jax.__version__,
    "python": platform.python_version(),
    "platform": devs[0].platform,
    "num_devices": len(devs),
    "machine": platform.machine(),
    "cpu_settings": runtime.settings(),
  }


def describe(exp: Experiment) -> dict:
  """A JSON summary of what an Experiment holds (for config.json)."""
  rc = exp.round_config
  return {
    "model": exp.model.name,
    "algorithm": exp.algorithm.name,
    "num_train_clients": exp.train.num_clients,
    "num_train_examples": exp.train.num_examples,
    "num_test_clients": None if exp.test is None else exp.test.num_clients,
    "round_config": json.loads(json.dumps(dataclasses.asdict(rc), default=str)),
    "num_rounds": exp.num_rounds,
    "eval_every": exp.eval_every,
    "seed": exp.seed,
    "hparams": dict(exp.hparams),
  }


_ENGINES: dict = {}
_MAX_ENGINES = 8


def engine_for(exp: Experiment) -> Engine:
  """The Engine of ``exp``'s algorithm and round config.

  Engines are cached (a few, most recent) by algorithm object, round config
  and mesh, so running the same experiment again (a resume, a notebook cell
  run twice, ``dataclasses.replace(exp, num_rounds=...)``) reuses the compiled
  round instead of compiling it again.
  """
  key = (id(exp.algorithm), exp.round_config, id(exp.mesh))
  hit = _ENGINES.pop(key, None)
  if hit is None or hit[0] is not exp.algorithm or hit[1] is not exp.mesh:
    hit = (
      exp.algorithm,
      exp.mesh,
      Engine(exp.algorithm, exp.round_config, exp.mesh),
    )
  _ENGINES[key] = hit  # most recent last
  while len(_ENGINES) > _MAX_ENGINES:
    _ENGINES.pop(next(iter(_ENGINES)))
  return hit[2]


def init_state(
  exp: Experiment, engine: Engine, seed: int | None = None, data=None
) -> EngineState:
  """The experiment's initial EngineState for ``seed`` (default its own);
  ``data`` (device data) lets a stateful aggregator size its state."""
  return engine.init(
    exp.initial_params(seed),
    seed=exp.engine_rng(seed),
    num_clients=exp.train.num_clients,
    data=data,
  )


class Evaluator:
  """Evaluates params on the experiment's test data (uploaded once)."""

  def __init__(self, exp: Experiment, engine: Engine):
    self.exp, self.mesh = exp, engine.mesh
    self.data = None
    if exp.test is not None:
      checks.model_features(
        exp.model, exp.test.features, "test data", labels_required=False
      )
      self.data = to_device(
        exp.test,
        LocalWork(batch_size=exp.eval_batch_size, num_epochs=1),
        "auto",
        sharding=NamedSharding(engine.mesh, P()),
      )

  def __call__(self, params) -> dict:
    """``{test_<metric>: mean, test_<q-metric>_pXX: quantile}``."""
    if self.data is None:
      return {}
    res = evaluate(
      self.exp.model,
      params,
      self.data,
      batch_size=self.exp.eval_batch_size,
      mesh=self.mesh,
    )
    row = {f"test_{k}": float(v) for k, v in res.mean.items()}
    qname = (
      "accuracy"
      if "accuracy" in res.per_client
      else next((k for k in res.per_client if k != "loss"), None)
    )
    if qname is not None:
      for k, v in res.quantiles(qname, QUANTILES).items():
        row[f"test_{qname}_{k}"] = v
    return row


def _train_row(metrics: dict) -> dict:
  row = {}
  for k, v in metrics.items():
    if k in ("num_clients", "total_weight"):
      continue
    a = np.asarray(v)
    if a.ndim == 0:
      row[f"train_{k}"] = float(a)
  return row


def _eval_due(exp: Experiment, t: int) -> bool:
  return t == exp.num_rounds or (exp.eval_every > 0 and t % exp.eval_every == 0)


def load_resume_state(run_dir: Path, target, identity: dict | None = None):
  """``(state, meta)`` from ``run_dir``'s checkpoint, shaped like ``target``.

  Raises :class:`~fedjax_lite.experiment.config.ConfigError` with what to do
  when the folder has no checkpoint (the run stopped before its first one
  was written: it can only be restarted), when the checkpoint is damaged,
  or when it belongs to another experiment or model (its recorded
  ``identity`` or its state's entries differ, see
  :func:`~fedjax_lite.experiment.checkpoint.load_checkpoint`).
  """
  path = run_dir / CHECKPOINT
  if not path.is_file():
    raise cfglib.ConfigError(
      f"{run_dir} has no {CHECKPOINT}: the run stopped before its first "
      "checkpoint was written, so it cannot be resumed; start it again "
      "(see config.json for its experiment and overrides)."
    )
  try:
    return ckpt.load_checkpoint(path, target, identity)
  except ValueError as e:  # DamagedCheckpointError, another state or identity
    raise cfglib.ConfigError(" ".join(str(e).split())) from None


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
    progress: show a tqdm progress bar.
    handle_signals: stop cleanly on SIGINT/SIGTERM (see the module
      docstring).
    desc: progress bar label (None: the experiment's name).
    on_ready: called once the session has loaded and checked what it
      resumes (the checkpoint, its round against ``num_rounds``), before it
      writes any file; a refused resume thus leaves the folder as it was
      (:func:`launch_file` writes the resumed record here).
    on_divergence: ``"stop"`` (default): a round whose loss or new global
      model is non-finite (see :func:`~fedjax_lite.experiment.loop.
      divergence`) ends the run with status ``"diverged"``, keeping the
      last finite state as the checkpoint; ``"continue"``: keep going.
    identity: what the run's checkpoints record of the experiment they
      belong to (:func:`launch_file` sets the experiment file's name and
      the run folder's experiment hash); the state's leaf paths, shapes and
      dtypes are added by :class:`Session`. A resume whose identity differs
      is refused before any file is touched.
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

  def __post_init__(self):
    if self.on_divergence not in ("stop", "continue"):
      raise ValueError(
        "on_divergence must be 'stop' or 'continue', got "
        f"{self.on_divergence!r}."
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

  @property
  def start(self) -> int:
    """Rounds done before this session."""
    return int(self.state.round)

  @classmethod
  def open(
    cls,
    exp: Experiment,
    run_dir: str | os.PathLike | None,
    options: RunOptions,
    init: Callable[[Engine, Any], Any],
    *,
    write: bool = True,
  ) -> "Session":
    """Uploads the data, makes the initial state (``init(engine, data)``) and,
    when ``options.resume``, replaces it by ``run_dir``'s checkpoint. With
    ``write`` False (processes other than 0 of a multi-process run) the
    session reads ``run_dir``'s checkpoint but writes no file there."""
    resume = options.resume
    if run_dir is None and resume:
      raise ValueError("resume=True needs the run_dir holding the checkpoint.")
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
    start = int(state.round)
    if start > exp.num_rounds:
      raise cfglib.ConfigError(
        f"num_rounds={exp.num_rounds} is below the round {start} of the "
        f"checkpoint in {run_dir}; expected num_rounds >= {start}."
      )
    if options.on_ready is not None:
      options.on_ready()
    writes = run_dir if write else None
    log = MetricsLog(writes, keep_until_round=start if writes else None)
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
    )

  def wall_time(self) -> float:
    """Wall time of the run so far, sessions before this one included."""
    return self.elapsed0 + (time.perf_counter() - self.t0)

  def run(self, advance, desc: str) -> LoopResult:
    """:func:`~fedjax_lite.experiment.loop.run_rounds` from :attr:`start`
    to ``exp.num_rounds`` as :attr:`options` say (``desc``: the progress
    label when the options give none)."""
    opts = self.options
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
    )


def train(
  exp: Experiment,
  run_dir: str | os.PathLike | None = None,
  *,
  placement: str | None = None,
  **options,
) -> RunResult:
  """Runs ``exp`` (or resumes it) and writes the run folder.

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
      ``desc``).

  Returns:
    A :class:`RunResult`.
  """
  if placement is not None:
    exp = dataclasses.replace(exp, placement=placement)
  opts = RunOptions.of("train", options)
  write = distributed.is_main()
  if run_dir is not None and write:
    Path(run_dir).mkdir(parents=True, exist_ok=True)
  sess = Session.open(
    exp,
    run_dir,
    opts,
    lambda engine, data: init_state(exp, engine),
    write=write,
  )
  run_dir, log = sess.run_dir, sess.log

  def advance(state, t, max_rounds, seconds):
    del max_rounds, seconds  # one round at a time
    tick = time.perf_counter()
    state, metrics = sess.engine.round(state, sess.data)
    metrics = jax.device_get(metrics)
    dt = time.perf_counter() - tick
    row = {
      "round": t + 1,
      **_train_row(metrics),
      "round_time_s": dt,
      "rounds_per_s": 1.0 / max(dt, 1e-9),
    }
    params = exp.algorithm.get_params(state.server)
    if opts.on_divergence == "stop":
      reason = loop.divergence(metrics, params)
      if reason is not None:
        row["wall_time"] = sess.wall_time()
        raise loop.Diverged(reason, t + 1, [row])
    if _eval_due(exp, t + 1):
      row.update(sess.evaluator(params))
    row["wall_time"] = sess.wall_time()
    return state, [row], 1

  out = sess.run(advance, exp.name or exp.algorithm.name)
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


def data_mb_per_device(data) -> list[float]:
  """MiB of training data each of this process's devices holds."""
  per_device = resident_bytes(data)["per_device"]
  return [round(per_device[k] / 2**20, 3) for k in sorted(per_device)]


def finish(
  run_dir: Path,
  rows: Sequence[dict],
  exp: Experiment,
  interrupted: bool,
  extra: dict | None = None,
) -> None:
  """Writes ``curves.png`` and ``summary.json`` for the rows so far
  (``extra``: e.g. checkpoints written and their cost in this session)."""
  title = f"{exp.name or run_dir.name}: {exp.algorithm.name}, {exp.model.name}"
  fig = plots.plot_curves(rows, None, title)
  fig.savefig(run_dir / "curves.png", dpi=110)
  final = final_values(rows, TIMING_KEYS)
  rate = [r["rounds_per_s"] for r in rows[1:] if "rounds_per_s" in r]
  summary = {
    "status": "interrupted" if interrupted else "finished",
    "rounds_done": rows[-1]["round"] if rows else 0,
    "num_rounds": exp.num_rounds,
    "final": final,
    "median_rounds_per_s": float(np.median(rate)) if rate else None,
    "wall_time": rows[-1].get("wall_time") if rows else None,
    **(extra or {}),
  }
  ckpt.atomic_write_text(run_dir / "summary.json", cfglib.dumps(summary))


# ------------------------------------------------------------ experiment files
def run_name(ef: cfglib.ExperimentFile, exp: Experiment) -> str:
  base = exp.name or ef.name
  return f"{base}-{ef.arg}" if ef.arg else base


def restart_command(record: dict, command: str = "run") -> str:
  """The command line that starts ``record``'s run (or sweep) afresh."""
  parts = ["python -m fedjax_lite", command, record["experiment"]["spec"]]
  sets = [f"{k}={v}" for k, v in (record.get("overrides") or {}).items()]
  if sets:
    parts += ["--set"] + sets
  if command == "sweep":
    parts += ["--seeds", ",".join(str(s) for s in record["seeds"])]
    for name, values in record.get("grid", {}).items():
      parts += ["--grid", f"{name}=" + ",".join(f"{v:g}" for v in values)]
  return " ".join(parts)


def read_record(run_dir: str | os.PathLike, command: str = "run") -> dict:
  """The saved record of a run (``config.json``) or sweep (``sweep.json``)
  folder to resume, checked: clear errors for a folder that is not one, or
  that has no checkpoint yet."""
  rdir = Path(run_dir)
  name = "sweep.json" if command == "sweep" else "config.json"
  other = "config.json" if command == "sweep" else "sweep.json"
  if not rdir.is_dir():
    raise cfglib.ConfigError(
      f"--resume {rdir}: no such folder; expected a "
      f"folder written by `python -m fedjax_lite "
      f"{command}`."
    )
  if not (rdir / name).is_file():
    if (rdir / other).is_file():
      kind = "run" if command == "sweep" else "sweep"
      raise cfglib.ConfigError(
        f"--resume {rdir}: that is a {kind} folder; resume it with "
        f"`python -m fedjax_lite {kind} --resume {rdir}`."
      )
    raise cfglib.ConfigError(
      f"--resume {rdir}: not a {command} folder (no {name}); expected a "
      f"folder written by `python -m fedjax_lite {command}`."
    )
  try:
    record = json.loads((rdir / name).read_text())
  except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError too
    raise cfglib.ConfigError(
      f"--resume {rdir}: {rdir / name} is not valid JSON ({e}); expected "
      f"the record `python -m fedjax_lite {command}` wrote."
    ) from None
  if not (
    isinstance(record, dict)
    and isinstance(record.get("experiment"), dict)
    and "spec" in record["experiment"]
    and isinstance(record.get("config"), dict)
  ):
    raise cfglib.ConfigError(
      f"--resume {rdir}: {rdir / name} holds no experiment spec and "
      f"config (a {type(record).__name__}); expected the record "
      f"`python -m fedjax_lite {command}` wrote."
    )
  if not (rdir / CHECKPOINT).is_file():
    raise cfglib.ConfigError(
      f"--resume {rdir}: no {CHECKPOINT} there (the {command} stopped "
      "before its first checkpoint), so it cannot be resumed, only "
      f"restarted: {restart_command(record, command)}"
    )
  return record


def run_record(
  ef: cfglib.ExperimentFile, cfg, overrides, exp: Experiment, **extra
) -> dict:
  """What ``config.json`` / ``sweep.json`` hold: the experiment file, its
  resolved config and overrides, a summary, the environment, the time."""
  if isinstance(overrides, dict):
    over = {k: str(v) for k, v in overrides.items()}
  else:
    over = cfglib.parse_overrides(overrides)
  return {
    "experiment": {
      "spec": ef.spec,
      "file": str(ef.path),
      "arg": ef.arg,
      "sha256": ef.sha256(),
    },
    "config_class": f"{type(cfg).__module__}.{type(cfg).__qualname__}",
    "config": cfglib.config_to_dict(cfg),
    "overrides": over,
    **extra,
    "experiment_summary": describe(exp),
    "environment": environment(),
    "created": datetime.datetime.now().isoformat(timespec="seconds"),
    "resumes": [],
  }


def note_resume(
  record: dict, ef: cfglib.ExperimentFile, cfg, overrides
) -> None:
  """Records a resume (and warns if the experiment file changed)."""
  if record["experiment"].get("sha256") != ef.sha256():
    tqdm = require("tqdm", "experiment").tqdm

    tqdm.write(
      f"warning: {ef.path} changed since this run started; "
      "resuming with the current file."
    )
  record["config"] = cfglib.config_to_dict(cfg)
  over = (
    {k: str(v) for k, v in overrides.items()}
    if isinstance(overrides, dict)
    else cfglib.parse_overrides(overrides)
  )
  record.setdefault("resumes", []).append(
    {
      "time": datetime.datetime.now().isoformat(timespec="seconds"),
      "overrides": over,
    }
  )


def prepare(
  spec: str | None,
  overrides: Sequence[str] | dict = (),
  resume: str | os.PathLike | None = None,
  command: str = "run",
):
  """Loads an experiment file (or a run folder's) and resolves its config.

  Returns:
    ``(experiment_file, config, record)`` where ``record`` is the saved
    ``config.json`` (``sweep.json``) when resuming, else None.
  """
  record = None
  if resume is not None:
    record = read_record(resume, command)
    if spec is None:
      spec = record["experiment"]["spec"]
  if spec is None:
    raise cfglib.ConfigError(
      "no experiment given; expected "
      "experiments/<name>.py[:arg] (or --resume RUN_DIR)"
    )
  ef = cfglib.load_experiment_file(spec)
  cfg = ef.get_config()
  if record is not None:
    cfg = cfglib.config_from_dict(cfg, record["config"])
  cfg = cfglib.apply_overrides(cfg, overrides)
  return ef, cfg, record


def run_file(
  spec: str | None,
  overrides: Sequence[str] | dict = (),
  *,
  out: str | os.PathLike = "runs",
  resume: str | os.PathLike | None = None,
  placement: str | None = None,
  **options,
) -> RunResult:
  """``python -m fedjax_lite run``: build, run and record an experiment file.

  Args:
    spec: ``path.py[:arg]`` (optional when resuming: taken from config.json).
    overrides: ``["field=value", ...]`` applied to the config.
    out: parent folder of new run folders.
    resume: a run folder to continue (its config plus ``overrides``).
    placement: overrides the experiment's data placement (see :func:`train`).
    **options: the other :class:`RunOptions` (``checkpoint_every``,
      ``checkpoint_every_seconds``, ``progress``, ``handle_signals``).
  """
  return launch_file(
    "run",
    spec,
    overrides,
    out,
    resume,
    lambda exp, run_dir, record, **kw: train(exp, run_dir, **kw),
    placement=placement,
    **options,
  )


def launch_file(
  command: str,
  spec: str | None,
  overrides,
  out,
  resume,
  launch: Callable[..., Any],
  new_record: Callable[[Experiment], dict] | None = None,
  **options,
):
  """What :func:`run_file` and ``sweep_file`` share: loads the experiment
  file (or the folder's, when resuming), makes the run folder (or notes the
  resume), writes its record (a resume: only once the session has checked
  the checkpoint, see ``RunOptions.on_ready``), then returns ``launch(exp, run_dir, record,
  resume=..., desc=<folder name>, **options)``.

  Args:
    command: ``"run"`` (record ``config.json``) or ``"sweep"`` (record
      ``sweep.json``, folder name ending in ``-sweep``).
    spec: ``path.py[:arg]`` (optional when resuming).
    overrides: applied to the config.
    out: parent folder of new run folders.
    resume: the folder to continue, or None.
    launch: runs the experiment (:func:`train`, ``sweep``).
    new_record: ``exp -> {field: value}`` more fields for a new record
      (called before the folder is made, so it may check and raise).
    **options: passed on to ``launch``.
  """
  ef, cfg, record = prepare(spec, overrides, resume, command=command)
  exp = ef.build(cfg)
  main = distributed.is_main()  # process 0 writes files
  if resume is None:
    extra = new_record(exp) if new_record is not None else {}
    suffix = "-sweep" if command == "sweep" else ""
    run_dir = new_run_dir(out, run_name(ef, exp) + suffix) if main else None
    run_dir = Path(distributed.broadcast_text(str(run_dir)))
    record = run_record(ef, cfg, overrides, exp, **extra)
  else:
    run_dir = Path(resume)
    note_resume(record, ef, cfg, overrides)
  name = "sweep.json" if command == "sweep" else "config.json"
  # What this folder's checkpoints belong to: the experiment file (by name
  # and argument) and the hash it had when the run started (an edited file
  # still resumes, with a warning; a checkpoint of another run does not).
  identity = {
    "experiment": f"{Path(ef.path).name}:{ef.arg or ''}",
    "experiment_sha256": record["experiment"]["sha256"],
  }

  def write_record():
    ckpt.atomic_write_text(run_dir / name, cfglib.dumps(record))

  if main and resume is None:
    write_record()
  return launch(
    exp,
    run_dir,
    record,
    resume=resume is not None,
    desc=run_dir.name,
    # a resume writes its record once the checkpoint has been checked
    on_ready=write_record if main and resume is not None else None,
    identity=identity,
    **options,
  )


def script_main(file: str, get_config, run, argv=None) -> dict:
  """``main()`` of a script-style experiment file (one the runner's
  :class:`Experiment` does not fit, e.g. vertical FL): ``python
  experiments/X.py [--smoke] [--out runs] [--set field=value ...]`` calls
  ``run(config, run_dir)`` with a fresh ``<out>/X-<time>/`` folder and prints
  the summary it returns."""
  import argparse  # pylint: disable=g-import-not-at-top

  name = Path(file).stem
  p = argparse.ArgumentParser(prog=f"python {file}")
  p.add_argument("--smoke", action="store_true", help="a seconds-long run")
  p.add_argument("--out", default="runs", help="parent of the run folder")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
  args = p.parse_args(argv)
  cfg = cfglib.apply_overrides(
    get_config("smoke" if args.smoke else ""), args.set
  )
  run_dir = new_run_dir(args.out, name)
  summary = run(cfg, run_dir)
  print(json.dumps(summary, indent=1))
  print(f"wrote {run_dir}")
  return summary
