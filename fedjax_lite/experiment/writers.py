"""Metric writers: a run's per-round rows into experiment-tracking tools.

One small interface, :class:`MetricWriter` (``write_scalars(step,
scalars)``, ``write_hparams(hparams)``, ``flush()``, ``close()``), and one
writer per tool, named by :func:`make_writers`'s spec
(``"jsonl,tensorboard,wandb,mlflow"``):

* ``jsonl`` (:class:`JsonlWriter`): ``metrics.jsonl`` / ``metrics.csv``
  (:mod:`fedjax_lite.experiment.records`), always on in a run folder;
* ``tensorboard`` (:class:`TensorBoardWriter`): event files through
  tensorboardX in ``RUN_DIR/tensorboard/`` (a sweep: one subfolder per
  setting): ``tensorboard --logdir RUN_DIR/tensorboard``;
* ``wandb`` (:class:`WandbWriter`): a Weights & Biases run whose files go to
  ``RUN_DIR/wandb/``; with ``WANDB_MODE=offline`` nothing leaves the
  machine, and ``wandb sync RUN_DIR/wandb/offline-run-*`` uploads later;
* ``mlflow`` (:class:`MlflowWriter`): an MLflow run in the SQLite store
  ``RUN_DIR/mlflow.db`` (MLflow 3 refuses its ``file:`` store unless told
  otherwise, so the run folder holds the SQLite store it recommends):
  ``mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlflow.db``.

The tools are optional (``pip install "fedjax_lite[tracking]"``: tensorboardX,
wandb, mlflow-skinny with sqlalchemy and alembic for its SQLite store) and
imported when a writer is made.

In a run (:func:`~fedjax_lite.experiment.session.train`, ``python -m
fedjax_lite run --log ...``) every row written to ``metrics.jsonl`` goes to
every writer (:class:`Tracking`) with ``step = round``: train metrics, test
metrics and per-client quantiles, ``train_num_clients``,
``train_uplink_bytes`` when present and the timing columns, as float64
(non-finite values as float NaN/inf); ``write_hparams`` gets the resolved
config, flattened (:func:`flatten`). A sweep makes one tracking run per
setting (its seed and hyperparameter values are its hparams, not metrics):
a TensorBoard subfolder each, W&B runs grouped by the sweep folder's name,
MLflow runs in one experiment named after the sweep folder.

Precision read back: TensorBoard stores scalars as float32
(``simple_value``); W&B stores the JSON text of the float64 (NaN and
infinities as ``NaN``/``Infinity``); MLflow stores float64, NaN as NaN and
``+-inf`` as ``+-1.7976931348623157e308`` (its SQL store's rule).

Resume (``--resume``: the state after the checkpoint's round ``c``; rows
after ``c``, from before the crash, are computed again): every tool keeps
each round once.

* TensorBoard: the resumed session writes a new events file whose first
  event purges steps ``> c`` (tensorboardX ``purge_step=c + 1``); TensorBoard
  and its ``EventAccumulator`` then drop the earlier files' events after
  ``c``, and the recomputed rounds replace them. The earlier files hold
  every round up to ``c``: the writers are flushed before each checkpoint.
* MLflow: the same run (its id is kept in ``RUN_DIR/tracking.json``) is set
  running again; rounds up to the last step the store holds are not logged
  again (rows are logged whole): the
  recomputed rounds keep the values logged first, which equal them except
  the timing columns. Rows are logged at every flush, so the store holds
  every round up to ``c``.
* W&B: a new run folder with the same run id (an offline run cannot be
  resumed in place); rounds up to the last one ``metrics.jsonl`` held
  before the resume are not sent again, so the folders' histories are
  disjoint: sync the first with ``wandb sync``, the next ones with ``wandb
  sync --append`` (``tracking.json`` lists them in order). A kill can lose the rounds W&B had not yet written
  (its service writes them in the background): what the tool allows.

A writer added on a resume (``--log`` that the first session lacked) gets
the rows up to the checkpoint from ``metrics.jsonl`` first (a non-finite
value there is ``null``: it arrives as NaN).

Where the tools run. :func:`make_writers` runs each tool's writers
(:class:`TensorBoardWriter`, :class:`WandbWriter`, :class:`MlflowWriter`,
the only code that talks to the tools) in a process of the tool's own
(:mod:`fedjax_lite.experiment.writer_process`, started with the parent's
``sys.path``), one per tool and training process (a sweep's settings share
it), and gives the run a
:class:`ProcessWriter` per tool that hands each call over to it. Why: the
tools' start-up (importing mlflow ~0.75 s of CPU and opening its SQLite
store ~0.7 s; importing wandb and ``wandb.init``; importing tensorboardX)
and their per-row work would otherwise hold the training process's GIL
while it traces and compiles the first rounds; in a process of its own the
start-up runs on another core at the same time, and the training process
only encodes rows. The child is started as early as the run allows
(:func:`prestart`: ``python -m fedjax_lite run --log ...`` starts it right
after parsing its arguments, before JAX is imported; ``train``/``sweep``
before the engine is built) and starts the tool at once (:func:`preload`);
it imports neither JAX nor the engine (``FEDJAX_LITE_CPU_TUNING=0``, and
:mod:`fedjax_lite.experiment.writers` imports its JAX-using modules
lazily). It runs at nice :data:`WRITER_NICE` (19; ``FEDJAX_LITE_WRITER_NICE``
sets 0..19) in the training process's session and a process group of its
own: the training process's XLA devices wait on each other at every
cross-device reduce, so a core taken from one of them delays all, and at
the lowest priority the tool uses only the cycles the training leaves
idle. Measured on the README's main command (2 cores,
``experiments/benchmarks/writers.py --processes``): each tool, and all
three together, within 2% of its wall time (x0.978 to x1.009; at nice 0,
all three x1.015; BENCHMARKS.md).

* Calls go to the child as JSON lines on its stdin (floats as Python's
  ``json`` writes them: ``NaN``, ``Infinity`` and ``-Infinity`` stay what
  they are), written by a thread of the parent, so a row never waits for
  the tool; hparams are flattened (:func:`flatten`) before they go. The
  child reads its stdin in a thread of its own (the pipe never fills while
  the tool starts) and replies on its stdout (the tools' own output goes to
  stderr): errors and the end of each ``close``. Each child keeps its
  runs' ids in ``tracking.json`` itself, as soon as a run starts (under an
  ``flock`` of the run folder: the tools' processes share the file).
* ``flush`` (before each checkpoint) returns once the calls so far are in
  the pipe (at most :data:`HANDOFF_TIMEOUT_S`): what is in the pipe the
  child writes even if the parent is killed, so the tools hold every round
  up to each checkpoint, as the resume rules above need. ``close`` waits
  until the child has written everything and closed the tool's run, and
  the last writer's ``close`` until the child has exited (each at most
  :data:`CLOSE_TIMEOUT_S`; past it the child is killed and ``close`` raises
  :class:`WriterProcessError`).
* Errors are not lost: a child that fails (the library missing, the store
  unusable, W&B not logged in, the process dying) makes each of its writers'
  next ``write_scalars``, ``write_hparams`` or ``flush`` once the report has
  arrived, at the latest its ``close``, raise once, naming the tool and the
  child's error
  (:class:`~fedjax_lite.experiment.config.ConfigError` or
  :class:`~fedjax_lite._optional.MissingExtraError` when the child raised
  one, else :class:`WriterProcessError`); later calls do nothing.
* The child runs in a session of its own (Ctrl-C reaches the training
  process only, which stops cleanly and closes its writers) and ignores
  SIGINT. When the parent dies, even by SIGKILL, the child reads EOF on its
  stdin, writes every call it got, closes each run still open (MLflow
  status ``KILLED``, W&B exit code 1) and exits: no process is left behind,
  and ``--resume`` goes on as above.

Writers of one's own (any :class:`MetricWriter`) run in the training
process; :class:`StartInBackground` starts a slow one in a thread.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

# Light imports only: the writer processes import this module and must not
# import JAX (checkpoint and records do: imported where used).
from fedjax_lite._optional import MissingExtraError, install_hint, require
from fedjax_lite.experiment.config import ConfigError

WRITER_NAMES = ("jsonl", "tensorboard", "wandb", "mlflow")
# Where a run folder records its tracking runs (ids to resume them).
STATE_FILE = "tracking.json"
TENSORBOARD_DIR = "tensorboard"
MLFLOW_DB = "mlflow.db"
WANDB_PROJECT = "fedjax_lite"
# Waits on a writer process (see the module docstring). flush: until the
# calls so far are in its pipe; close: until it has closed the tool's run
# (its start-up included), then until it has exited.
HANDOFF_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 120.0
# The writer processes' nice value (``FEDJAX_LITE_WRITER_NICE`` overrides
# it; 0 keeps the training process's priority). See the module docstring.
WRITER_NICE = 19


def writer_nice() -> int:
  """The nice value the writer processes run at: ``FEDJAX_LITE_WRITER_NICE``
  (an integer 0..19) or :data:`WRITER_NICE`.

  Raises:
    ConfigError: the variable is set to anything else.
  """
  text = os.environ.get("FEDJAX_LITE_WRITER_NICE")
  if text is None or not text.strip():
    return WRITER_NICE
  try:
    nice = int(text)
  except ValueError:
    nice = -1
  if not 0 <= nice <= 19:
    raise ConfigError(
      "FEDJAX_LITE_WRITER_NICE must be an integer from 0 (the training "
      f"process's priority) to 19 (the lowest), got {text!r}."
    )
  return nice


class MetricWriter:
  """Where per-round metrics go.

  Subclasses implement :meth:`write_scalars`; the others default to doing
  nothing. A writer is made for one run (one setting of a sweep).
  """

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """Records ``scalars`` (name -> float, NaN/inf allowed) at ``step``
    (the round). Steps arrive in increasing order."""
    raise NotImplementedError

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Records the run's hyperparameters (flat name -> bool, int, float or
    str)."""

  def flush(self) -> None:
    """Makes everything written so far durable (called at checkpoints)."""

  def close(self) -> None:
    """Flushes and releases the writer; it takes no more writes."""


class Resume(NamedTuple):
  """What a resumed session tells its writers.

  Attributes:
    round: the checkpoint's round ``c``: the session recomputes from
      ``c + 1``.
    logged_round: the last round ``metrics.jsonl`` held before the resume
      dropped the rows after ``c`` (``>= c``; the rounds the session before
      wrote).
  """

  round: int
  logged_round: int


def parse_spec(spec: str | Sequence[str] | None) -> list[str]:
  """``"jsonl,tensorboard"`` (or ``["jsonl", "tensorboard"]``, or several
  comma lists) -> the writer names in order, without repeats.

  Raises:
    ValueError: an unknown name (the message lists the known ones) or a
      spec that is not a str or a sequence of str.
  """
  if spec is None:
    return []
  items = [spec] if isinstance(spec, str) else spec
  if not isinstance(items, (list, tuple)) or not all(
    isinstance(s, str) for s in items
  ):
    raise ValueError(
      "writers must be a comma-separated str of writer names (e.g. "
      f"'tensorboard,mlflow') or a list of them, got {spec!r}."
    )
  names: list[str] = []
  for item in items:
    for name in item.split(","):
      name = name.strip().lower()
      if not name:
        continue
      if name not in WRITER_NAMES:
        raise ValueError(
          f"unknown metric writer {name!r}; expected one of "
          f"{', '.join(WRITER_NAMES)} (comma-separated, e.g. "
          "'tensorboard,wandb')."
        )
      if name not in names:
        names.append(name)
  return names


def require_libraries(names: Iterable[str]) -> None:
  """Checks that the libraries the named writers need are installed
  (``importlib.util.find_spec``: found, not imported), so a missing one is
  the one-line ``pip install "fedjax_lite[tracking]"`` before any round.
  The tools are imported in their writer processes (:class:`ProcessWriter`),
  never in this one."""
  for name in names:
    for module in _LIBRARIES.get(name, ()):
      try:
        found = importlib.util.find_spec(module) is not None
      except (ImportError, ValueError):
        found = False
      if not found:
        raise MissingExtraError(install_hint(module, "tracking"), name=module)


_LIBRARIES = {
  "tensorboard": ("tensorboardX",),
  "wandb": ("wandb",),
  "mlflow": ("mlflow", "sqlalchemy", "alembic"),
}


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict:
  """A nested mapping as flat ``{"a.b": scalar}`` (hparams for the tools).

  Leaves keep bool, int, float and str values (numpy scalars become Python
  ones); None becomes ``"None"``; lists and tuples of scalars become their
  JSON text; anything else its ``str``.
  """
  out: dict = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flatten(value, name + "."))
    elif isinstance(value, (bool, int, float, str)):
      out[name] = value
    elif isinstance(value, np.generic):
      out[name] = value.item()
    elif value is None:
      out[name] = "None"
    elif isinstance(value, (list, tuple)):
      try:
        out[name] = json.dumps(list(value))
      except TypeError:
        out[name] = str(value)
    else:
      out[name] = str(value)
  return out


def read_state(run_dir: str | os.PathLike) -> dict:
  """``RUN_DIR/tracking.json``: the tracking runs of a run folder by tool
  and key (``{}`` when missing)."""
  path = Path(run_dir) / STATE_FILE
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    return {}
  except ValueError:  # torn by a crash: the ids are lost, runs start anew
    return {}


_STATE_LOCK = threading.Lock()


@contextlib.contextmanager
def _state_lock(run_dir: Path):
  """Holds ``run_dir``'s ``tracking.json`` for a read-modify-write: a lock
  of this process's threads and, where ``fcntl`` exists, an ``flock`` of
  the folder itself (the writer processes of the tools update the file
  each; no lock file is left behind)."""
  with _STATE_LOCK:
    try:
      import fcntl  # pylint: disable=g-import-not-at-top
    except ImportError:  # pragma: no cover - Windows: threads only
      yield
      return
    fd = os.open(run_dir, os.O_RDONLY)
    try:
      with contextlib.suppress(OSError):  # a file system without flock
        fcntl.flock(fd, fcntl.LOCK_EX)
      yield
    finally:
      os.close(fd)  # releases the flock


def _remember(run_dir: Path, tool: str, key: str, value: dict) -> None:
  """Records a tool's run ids under ``key`` in ``run_dir/tracking.json``,
  at once (a resume after a kill finds them): written atomically (a
  temporary file, fsync-ed, renamed over it) by the writer process that
  made the run. Not :func:`~fedjax_lite.experiment.checkpoint.
  atomic_write_text`, whose module imports JAX, which the writer processes
  do without."""
  run_dir.mkdir(parents=True, exist_ok=True)
  with _state_lock(run_dir):
    state = read_state(run_dir)
    state.setdefault(tool, {})[key] = value
    path = run_dir / STATE_FILE
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
      with os.fdopen(fd, "w") as f:
        f.write(json.dumps(state, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, path)
    except BaseException:
      with contextlib.suppress(OSError):
        os.unlink(tmp)
      raise


class StartInBackground(MetricWriter):
  """A writer of one's own that starts in a thread, so that a slow start-up
  overlaps the first round's compilation instead of adding to the run's
  wall time (the built-in tools start in processes of their own instead,
  :class:`ProcessWriter`: a thread still holds this process's GIL while
  it imports and starts).

  ``start()`` makes the real writer in a daemon thread. Until it is ready,
  ``write_hparams`` and ``write_scalars`` are held in order; ``flush``
  hands them over and flushes once the start is done and returns at once
  before (the tool lags; a run killed meanwhile loses no row: a resumed
  session gives every writer the rows up to its checkpoint from
  ``metrics.jsonl`` and each keeps what it lacks); ``close`` waits for the
  start, hands everything over and closes. An error of the start (e.g. W&B
  not logged in) is raised by the first ``flush`` after it or by ``close``.
  """

  def __init__(self, start):
    self._writer: MetricWriter | None = None
    self._error: BaseException | None = None
    self._held: list = []
    self._thread = threading.Thread(
      target=self._start, args=(start,), daemon=True
    )
    self._thread.start()

  def _start(self, start) -> None:
    try:
      self._writer = start()
    except BaseException as e:  # pylint: disable=broad-except
      self._error = e

  def ready(self) -> MetricWriter:
    """The started writer, with what was held handed over (waits)."""
    self._thread.join()
    if self._error is not None:
      error, self._error = self._error, None
      self._held = []
      raise error
    if self._held:
      held, self._held = self._held, []
      for method, args in held:
        getattr(self._writer, method)(*args)
    return self._writer

  @property
  def writer(self) -> MetricWriter | None:
    """The real writer once started (None before)."""
    return self._writer

  def write_scalars(self, step, scalars):
    if self._writer is None or self._held:
      self._held.append(("write_scalars", (step, dict(scalars))))
    else:
      self.ready().write_scalars(step, scalars)

  def write_hparams(self, hparams):
    if self._writer is None or self._held:
      self._held.append(("write_hparams", (dict(hparams),)))
    else:
      self.ready().write_hparams(hparams)

  def flush(self):
    if self._thread.is_alive():
      return
    self.ready().flush()

  def close(self):
    self.ready().close()


class JsonlWriter(MetricWriter):
  """``metrics.jsonl`` / ``metrics.csv`` in ``run_dir``: each step one row
  ``{"round": step, **scalars}`` (see :class:`~fedjax_lite.experiment.
  records.MetricsLog`); hparams go to ``hparams.json``.

  A run folder's own log is the session's :class:`MetricsLog`; this writer
  is for loops of one's own.
  """

  def __init__(self, run_dir: str | os.PathLike):
    from fedjax_lite.experiment.records import MetricsLog  # pylint: disable=g-import-not-at-top

    self.run_dir = Path(run_dir)
    self.run_dir.mkdir(parents=True, exist_ok=True)
    self.log = MetricsLog(self.run_dir)

  def write_scalars(self, step, scalars):
    self.log.append({"round": int(step), **scalars})

  def write_hparams(self, hparams):
    from fedjax_lite.experiment.checkpoint import atomic_write_text  # pylint: disable=g-import-not-at-top

    atomic_write_text(
      self.run_dir / "hparams.json",
      json.dumps(flatten(hparams), indent=1) + "\n",
    )

  def flush(self):
    self.log.sync()

  def close(self):
    self.log.close()


class TensorBoardWriter(MetricWriter):
  """TensorBoard event files in ``logdir`` through tensorboardX.

  Scalars are ``add_scalar(name, value, step)`` (float32); hparams are the
  HParams plugin's session-start summary (the plugin then lists the
  scalars as metrics). ``resume`` writes a purge event first, so readers
  drop the steps after the checkpoint that earlier files hold (see the
  module docstring).

  Args:
    logdir: the folder of this run's event files.
    resume: a resumed session's :class:`Resume`, or None.
    flush_secs: the longest time events wait in memory.
  """

  def __init__(
    self,
    logdir: str | os.PathLike,
    *,
    resume: Resume | None = None,
    flush_secs: int = 10,
  ):
    tbx = require("tensorboardX", "tracking")
    self.logdir = Path(logdir)
    earlier = len(list(self.logdir.glob("events.out.tfevents.*")))
    purge = resume.round + 1 if resume is not None and earlier else None
    # Steps up to the checkpoint are in the earlier files already.
    self._first = purge if purge is not None else 0
    # Event files are named by the second they were made in; the session's
    # number keeps a resume in the same second from overwriting a file and
    # sorts it after the earlier ones (readers load files in name order).
    self._writer = tbx.SummaryWriter(
      logdir=str(self.logdir),
      purge_step=purge,
      flush_secs=flush_secs,
      filename_suffix=f".{earlier:04d}",
    )

  def write_scalars(self, step, scalars):
    if step < self._first:
      return
    for name, value in scalars.items():
      self._writer.add_scalar(name, float(value), global_step=int(step))

  def write_hparams(self, hparams):
    summary = require("tensorboardX.summary", "tracking")
    _, session_start, _ = summary.hparams(flatten(hparams), {})
    self._writer.file_writer.add_summary(session_start)

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


class WandbWriter(MetricWriter):
  """A Weights & Biases run whose files go to ``run_dir/wandb/``.

  The mode follows wandb's own settings (``WANDB_MODE=offline``: files
  only, no network; ``wandb login`` for online runs); ``mode`` overrides
  them. The run's id is kept in ``run_dir/tracking.json`` under ``key``, so
  a resumed session continues the same run (see the module docstring).
  The writer does not capture the console (``console="off"``).

  Args:
    run_dir: the run (or sweep) folder.
    name: the run's display name.
    group: its group (a sweep's settings share the sweep's name).
    key: the run's key in ``tracking.json`` (a sweep: one per setting).
    project: the W&B project (default ``WANDB_PROJECT`` or
      ``"fedjax_lite"``).
    mode: ``"online"``, ``"offline"`` or ``"disabled"`` (None: wandb's
      settings).
    resume: a resumed session's :class:`Resume`, or None.
  """

  def __init__(
    self,
    run_dir: str | os.PathLike,
    *,
    name: str | None = None,
    group: str | None = None,
    key: str = "",
    project: str | None = None,
    mode: str | None = None,
    resume: Resume | None = None,
  ):
    wandb = require("wandb", "tracking")
    self.run_dir = Path(run_dir)
    known = read_state(self.run_dir).get("wandb", {}).get(key)
    run_id = known["id"] if known and resume is not None else None
    # Rounds the session before sent (see the module docstring).
    self._first = resume.logged_round + 1 if run_id else 0
    try:
      self.run = wandb.init(
        project=project or os.environ.get("WANDB_PROJECT") or WANDB_PROJECT,
        name=name,
        group=group,
        dir=str(self.run_dir),
        id=run_id,
        resume="allow" if run_id else None,
        mode=mode,
        reinit="create_new",
        settings=wandb.Settings(console="off"),
      )
    except wandb.errors.Error as e:  # e.g. not logged in
      raise ConfigError(
        f"the wandb writer could not start a W&B run: {e} To keep the run "
        "on this machine only, set WANDB_MODE=offline (then `wandb sync` "
        "its folder under wandb/)."
      ) from e
    folder = Path(self.run.dir).parent  # .../wandb/offline-run-*/
    try:
      folder = folder.resolve().relative_to(self.run_dir.resolve())
    except ValueError:  # WANDB_DIR or the like put it elsewhere
      pass
    # Every session's folder, in order: sync the first with `wandb sync`,
    # the others with `wandb sync --append`.
    dirs = (known.get("dirs", []) if run_id else []) + [str(folder)]
    _remember(self.run_dir, "wandb", key, {"id": self.run.id, "dirs": dirs})

  def write_scalars(self, step, scalars):
    if step < self._first:
      return
    self.run.log({k: float(v) for k, v in scalars.items()}, step=int(step))

  def write_hparams(self, hparams):
    self.run.config.update(flatten(hparams), allow_val_change=True)

  def close(self, exit_code: int = 0):
    """Finishes the run (``exit_code`` 1: its process was cut short)."""
    self.run.finish(exit_code=exit_code)


_MLFLOW_KEY = re.compile(r"[^\w\-. /]")


@contextlib.contextmanager
def _quiet_mlflow():
  """Silences the SQLite store's table creation (alembic's INFO lines and
  SQLAlchemy's deprecation warnings) while a client opens its store."""
  loggers = [logging.getLogger(n) for n in ("alembic", "mlflow.store.db")]
  levels = [lg.level for lg in loggers]
  for lg in loggers:
    lg.setLevel(logging.WARNING)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", DeprecationWarning)
      yield
  finally:
    for lg, level in zip(loggers, levels):
      lg.setLevel(level)


_STORE_LOCK = threading.Lock()


def _store_template(mlflow_client) -> Path:
  """An empty SQLite store of this MLflow version, made once per machine
  in ``$XDG_CACHE_HOME/fedjax_lite/mlflow/`` (default ``~/.cache``):
  creating a store's tables runs MLflow's ~60 schema migrations (~2 s),
  copying the empty store takes milliseconds."""
  import mlflow  # pylint: disable=g-import-not-at-top

  cache = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    / "fedjax_lite"
    / "mlflow"
  )
  template = cache / f"empty-{mlflow.__version__}.db"
  if not template.is_file():
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".empty-{mlflow.__version__}-{os.getpid()}.db"
    tmp.unlink(missing_ok=True)
    with _quiet_mlflow():
      mlflow_client.MlflowClient(
        tracking_uri=f"sqlite:///{tmp}"
      ).search_experiments()
    os.replace(tmp, template)
  return template


def _prepare_store(db: Path, mlflow_client) -> None:
  """Makes ``db`` a copy of the empty store template unless it exists
  (copied to a temporary name, then renamed: a half-copied store is never
  seen). A template that cannot be made or copied (a read-only home, say)
  leaves ``db`` to MLflow, which creates its tables itself."""
  with _STORE_LOCK:
    if db.exists():
      return
    try:
      template = _store_template(mlflow_client)
      tmp = db.with_name(f".{db.name}.{os.getpid()}.tmp")
      shutil.copyfile(template, tmp)
      os.replace(tmp, db)
    except OSError:
      pass


class MlflowWriter(MetricWriter):
  """An MLflow run in the SQLite store ``run_dir/mlflow.db``.

  Rows are held in memory and logged as ``log_batch`` calls of whole rows at
  each ``flush`` (before every checkpoint), every ``flush_secs`` and at
  ``close`` (one SQLite transaction per row cost ~10 ms); hparams are params (values as
  text, at most 6000 characters; on a resume the params already set keep
  their first values, as MLflow allows no change). The run's id is kept in
  ``run_dir/tracking.json`` under ``key``; a resumed session continues it
  (see the module docstring).

  Args:
    run_dir: the run (or sweep) folder.
    experiment: the MLflow experiment's name (made when missing).
    name: the run's name.
    key: the run's key in ``tracking.json`` (a sweep: one per setting).
    tags: more tags of the run.
    tracking_uri: another store (default: ``sqlite:///run_dir/mlflow.db``).
    resume: a resumed session's :class:`Resume`, or None.
    flush_secs: the longest time rows wait in memory (they are also logged
      at every ``flush``, i.e. before each checkpoint, and at ``close``).
  """

  def __init__(
    self,
    run_dir: str | os.PathLike,
    *,
    experiment: str,
    name: str | None = None,
    key: str = "",
    tags: Mapping[str, str] | None = None,
    tracking_uri: str | None = None,
    resume: Resume | None = None,
    flush_secs: float = 10.0,
  ):
    require_libraries(["mlflow"])
    self.flush_secs = float(flush_secs)
    self._pending: list = []
    self._flushed = time.monotonic()
    mlflow_client = require("mlflow.tracking", "tracking")
    self.entities = require("mlflow.entities", "tracking")
    self.run_dir = Path(run_dir).resolve()
    if tracking_uri is None:
      _prepare_store(self.run_dir / MLFLOW_DB, mlflow_client)
    uri = tracking_uri or f"sqlite:///{self.run_dir / MLFLOW_DB}"
    with _quiet_mlflow():
      self.client = mlflow_client.MlflowClient(tracking_uri=uri)
    known = read_state(self.run_dir).get("mlflow", {}).get(key)
    self._first = 0
    if known and resume is not None:
      self.run_id = known["run_id"]
      self.client.update_run(self.run_id, status="RUNNING")
      self._first = self._last_step() + 1
    else:
      found = self.client.get_experiment_by_name(experiment)
      experiment_id = (
        found.experiment_id
        if found is not None
        else self.client.create_experiment(
          experiment,
          artifact_location=(self.run_dir / "mlartifacts").as_uri(),
        )
      )
      run = self.client.create_run(
        experiment_id, run_name=name, tags=dict(tags or {})
      )
      self.run_id = run.info.run_id
      _remember(
        self.run_dir,
        "mlflow",
        key,
        {"run_id": self.run_id, "experiment_id": experiment_id},
      )

  def _last_step(self) -> int:
    """The last step any metric of the run has (-1: none)."""
    last = -1
    for name in self.client.get_run(self.run_id).data.metrics:
      for m in self.client.get_metric_history(self.run_id, name):
        last = max(last, int(m.step))
    return last

  def write_scalars(self, step, scalars):
    if step < self._first:
      return
    now = int(time.time() * 1000)
    self._pending.extend(
      self.entities.Metric(_MLFLOW_KEY.sub("_", k), float(v), now, int(step))
      for k, v in scalars.items()
    )
    if time.monotonic() - self._flushed > self.flush_secs:
      self.flush()

  def flush(self):
    """Logs the rows held since the last flush (whole rows, in ``log_batch``
    calls of at most the store's 1000 metrics)."""
    pending, self._pending = self._pending, []
    for i in range(0, len(pending), 1000):  # the store's batch limit
      self.client.log_batch(self.run_id, metrics=pending[i : i + 1000])
    self._flushed = time.monotonic()

  def write_hparams(self, hparams):
    have = self.client.get_run(self.run_id).data.params
    params = [
      self.entities.Param(_MLFLOW_KEY.sub("_", k)[:250], str(v)[:6000])
      for k, v in flatten(hparams).items()
    ]
    params = [p for p in params if p.key not in have]
    for i in range(0, len(params), 100):  # the store's batch limit
      self.client.log_batch(self.run_id, params=params[i : i + 100])

  def close(self, status: str = "FINISHED"):
    """Logs what is held and ends the run with ``status`` (``"KILLED"``:
    its process was cut short)."""
    self.flush()
    self.client.set_terminated(self.run_id, status=status)


# The writer class of each tool: what its writer process makes.
TOOL_WRITERS = {
  "tensorboard": TensorBoardWriter,
  "wandb": WandbWriter,
  "mlflow": MlflowWriter,
}


class WriterProcessError(RuntimeError):
  """A tool's writer process failed, died or did not finish in time (the
  message names the tool, the process and the child's error)."""


def _child_error(tool: str, pid: int, info: Mapping[str, str]) -> Exception:
  """The error the parent raises for a child's ``{"type", "message"}``: the
  child's ConfigError or MissingExtraError as such (their messages name the
  tool or its library: one line on the command line), else a
  :class:`WriterProcessError`."""
  kind, message = info.get("type", "Error"), info.get("message", "")
  if kind == "ConfigError":
    return ConfigError(message)
  if kind == "MissingExtraError":
    return MissingExtraError(message)
  return WriterProcessError(
    f"the {tool} writer failed in its process (pid {pid}): {kind}: {message}"
  )


def _exit_text(code: int | None) -> str:
  if code is None:
    return "still running"
  if code < 0:
    try:
      return f"killed by {signal.Signals(-code).name}"
    except ValueError:
      return f"killed by signal {-code}"
  return f"exit code {code}"


# The bootstrap of a writer process: the parent's sys.path (as
# multiprocessing's spawn does), then writer_process.main(tool).
_BOOTSTRAP = (
  "import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
  "from fedjax_lite.experiment.writer_process import main; "
  "sys.exit(main(sys.argv[2:]))"
)


class _ToolProcess:
  """The parent's end of one tool's writer process (see the module
  docstring): the child, a thread that writes the queued calls to its stdin
  and one that reads its replies. Shared by the tool's writers in this
  process; it ends when the last of them closes."""

  def __init__(self, tool: str):
    self.tool = tool
    self._cond = threading.Condition()
    self._queue: queue.SimpleQueue = queue.SimpleQueue()
    self._queued = 0  # calls queued (their sequence numbers)
    self._sent = 0  # calls written to the pipe
    self._next_id = 0
    self.users = 0  # writers not yet closing
    self.open_ids: set[int] = set()  # writers the child has not closed
    self.closed: set[int] = set()
    self.errors: dict[int, Exception] = {}
    self.fatal: Exception | None = None  # the child's error for all
    self.failed = False  # errors or fatal: the one check per call
    self.exited = False  # its replies ended: the child is gone
    self.ending = False  # the last writer closes: stdin is closed next
    env = dict(os.environ, FEDJAX_LITE_CPU_TUNING="0")  # no JAX set-up
    nice = str(writer_nice())
    try:
      self.proc = subprocess.Popen(
        [sys.executable, "-c", _BOOTSTRAP, json.dumps(sys.path), tool, nice],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        # Ctrl-C goes to the training process only (it closes the writers);
        # a process group of its own, not a session: the kernel weighs the
        # child's (lowered) priority against the training process's
        # threads only within one session (see writer_process).
        process_group=0 if os.name == "posix" else None,
      )
    except OSError as e:
      raise WriterProcessError(
        f"the {tool} writer's process could not start: {e}"
      ) from e
    self.pid = self.proc.pid
    self._sender = threading.Thread(
      target=self._send_loop, name=f"{tool}-writer-send", daemon=True
    )
    self._reader = threading.Thread(
      target=self._read_loop, name=f"{tool}-writer-read", daemon=True
    )
    self._sender.start()
    self._reader.start()

  # -- main thread
  def open(self, kwargs: Mapping[str, Any]) -> int:
    """A new writer's id; the child makes it (its errors come later)."""
    with self._cond:
      self._next_id += 1
      wid = self._next_id
      self.users += 1
      self.open_ids.add(wid)
    self.send(wid, "open", kwargs=kwargs)
    return wid

  def send(self, wid: int, op: str, **fields) -> int:
    """Queues one call (JSON: NaN and infinities as Python writes them);
    returns its sequence number."""
    data = json.dumps({"op": op, "id": wid, **fields}, default=str) + "\n"
    with self._cond:
      self._queued += 1
      self._queue.put((self._queued, data.encode()))
      return self._queued

  def handed_over(self, seq: int, timeout: float) -> bool:
    """Waits until call ``seq`` is in the pipe (or the child is gone)."""
    with self._cond:
      return self._cond.wait_for(
        lambda: self._sent >= seq or self.exited, timeout
      )

  def error_for(self, wid: int) -> Exception | None:
    with self._cond:
      return self.errors.get(wid) or self.fatal

  def release(self) -> None:
    """A writer closes: when it is the last one, the child's stdin ends
    after the calls queued (the child then exits) and new writers of the
    tool get a new process."""
    with _PROCESSES_LOCK, self._cond:
      self.users -= 1
      if self.users == 0:
        self._end()

  def end_if_unused(self) -> None:
    """Ends the child if no writer ever used it (its stdin closes; it
    exits)."""
    with _PROCESSES_LOCK, self._cond:
      if self.users == 0 and self._next_id == 0:
        self._end()

  def _end(self) -> None:
    """(Holding both locks.) The child's stdin ends after the calls
    queued, and new writers of the tool get a new process."""
    if self.ending:
      return
    self.ending = True
    if _PROCESSES.get(self.tool) is self:
      del _PROCESSES[self.tool]
    self._queue.put(None)

  def wait_closed(self, wid: int, timeout: float) -> bool:
    """Waits until the child has closed writer ``wid`` (or failed)."""
    with self._cond:
      return self._cond.wait_for(
        lambda: wid not in self.open_ids or self.exited, timeout
      )

  def wait_exit(self, timeout: float) -> bool:
    """Waits until the child has exited and its replies are read."""
    self._reader.join(timeout)
    return not self._reader.is_alive()

  def kill(self) -> None:
    with contextlib.suppress(OSError):
      self.proc.kill()

  # -- threads
  def _send_loop(self) -> None:
    stdin = self.proc.stdin
    while True:
      item = self._queue.get()
      if item is None:
        break
      seq, data = item
      more = not self._queue.empty()  # flushed with the next call
      if stdin is not None:
        try:
          stdin.write(data)
          if not more:
            stdin.flush()
        except (OSError, ValueError):  # the child is gone: its replies say why
          stdin = None
          more = False
      if not more:
        with self._cond:
          self._sent = seq  # in the pipe (or nowhere to go)
          self._cond.notify_all()
    with contextlib.suppress(OSError, ValueError):
      self.proc.stdin.close()  # EOF: the child closes what is open and exits

  def _read_loop(self) -> None:
    for line in self.proc.stdout:
      try:
        msg = json.loads(line)
      except ValueError:
        continue
      self._handle(msg)
    try:
      code = self.proc.wait(timeout=HANDOFF_TIMEOUT_S)
    except subprocess.TimeoutExpired:
      code = None
    with self._cond:
      self.exited = True
      if self.open_ids and self.fatal is None:
        self.fatal = WriterProcessError(
          f"the {self.tool} writer's process (pid {self.pid}) ended "
          f"({_exit_text(code)}) before its writers were closed; its "
          "output above may say why."
        )
      self.failed = self.failed or self.fatal is not None
      self._cond.notify_all()

  def _handle(self, msg: Mapping[str, Any]) -> None:
    with self._cond:
      wid = msg.get("id")
      if "error" in msg:
        self.errors[wid] = _child_error(self.tool, self.pid, msg["error"])
        self.open_ids.discard(wid)
        self.failed = True
      elif "fatal" in msg:
        self.fatal = _child_error(self.tool, self.pid, msg["fatal"])
        self.failed = True
      elif msg.get("closed"):
        self.closed.add(wid)
        self.open_ids.discard(wid)
      self._cond.notify_all()


_PROCESSES: dict[str, _ToolProcess] = {}  # tool -> its live writer process
_PROCESSES_LOCK = threading.Lock()


def _live_process(tool: str) -> _ToolProcess:
  """(Holding ``_PROCESSES_LOCK``.) ``tool``'s writer process, started
  unless a live one that has not failed is there."""
  process = _PROCESSES.get(tool)
  if process is None or process.exited or process.failed:
    process = _PROCESSES[tool] = _ToolProcess(tool)
  return process


class ProcessWriter(MetricWriter):
  """One run's writer of ``tool`` (``"tensorboard"``, ``"wandb"``,
  ``"mlflow"``), living in the tool's writer process: there
  ``TOOL_WRITERS[tool](**kwargs)`` is made (``kwargs``: JSON values, paths
  as str, a :class:`Resume` as its pair) and gets every call, in order.
  The process is started with the first such writer (so the tool's start-up
  runs while this process compiles) and shared by the tool's writers until
  the last one closes. See the module docstring for what waits how long
  and how errors arrive."""

  def __init__(self, tool: str, **kwargs):
    if tool not in TOOL_WRITERS:
      raise ValueError(
        f"no writer process for {tool!r}; expected one of "
        f"{', '.join(TOOL_WRITERS)}."
      )
    self.tool = tool
    self._raised = False  # the child's error was raised (once)
    self._closing = False
    self._closed = False
    with _PROCESSES_LOCK:
      self._process = _live_process(tool)
      self._id = self._process.open(kwargs)

  @property
  def pid(self) -> int:
    """The writer process's id."""
    return self._process.pid

  def _live(self) -> bool:
    """Whether calls still go to the child; raises its error once."""
    process = self._process
    if not process.failed:
      return not self._closing
    error = process.error_for(self._id)
    if error is None:
      return not self._closing
    if not self._raised:
      self._raised = True
      raise error
    return False

  def write_scalars(self, step, scalars):
    if self._live():
      self._process.send(
        self._id,
        "scalars",
        step=int(step),
        scalars={k: float(v) for k, v in scalars.items()},
      )

  def write_hparams(self, hparams):
    if self._live():
      self._process.send(self._id, "hparams", hparams=flatten(hparams))

  def flush(self):
    """Has the child flush the tool, once the calls so far are in its pipe
    (waits for that: at most :data:`HANDOFF_TIMEOUT_S`)."""
    if self._live():
      seq = self._process.send(self._id, "flush")
      self._process.handed_over(seq, HANDOFF_TIMEOUT_S)
      self._live()

  def start_close(self) -> None:
    """Asks the child to close the tool's run without waiting (so that
    :meth:`Tracking.close` closes every tool at once); :meth:`close`
    waits."""
    if self._closing:
      return
    self._closing = True
    self._process.send(self._id, "close")
    self._process.release()

  def close(self):
    """Closes the tool's run in the child and waits until it is written
    (the last writer of the process: until the child has exited), at most
    :data:`CLOSE_TIMEOUT_S` each; raises the child's error, if any was not
    raised yet."""
    self.start_close()
    if self._closed:
      return
    self._closed = True
    process = self._process
    done = process.wait_closed(self._id, CLOSE_TIMEOUT_S)
    if done and process.ending:
      done = process.wait_exit(CLOSE_TIMEOUT_S)
    if not done:
      process.kill()
      self._raised = True
      raise WriterProcessError(
        f"the {self.tool} writer's process (pid {process.pid}) did not "
        f"finish writing within {CLOSE_TIMEOUT_S:g} s; it was killed, and "
        "the tool's files may lack the last rows."
      )
    error = process.error_for(self._id)
    if error is not None and not self._raised:
      self._raised = True
      raise error


def preload(tool: str) -> None:
  """Imports ``tool``'s library (and the modules its writer opens a run
  with) in this process, and starts W&B's service: what a writer process
  does first, so the tool's start-up runs while the training process is
  still importing JAX and compiling. Errors are left to the writer's own
  start, which reports them (a missing library: the install hint)."""
  modules = {
    "tensorboard": ("tensorboardX", "tensorboardX.summary"),
    "wandb": ("wandb",),
    "mlflow": (
      "mlflow.tracking",
      "mlflow.entities",
      "mlflow.store.tracking.sqlalchemy_store",
    ),
  }.get(tool, ())
  try:
    for module in modules:
      importlib.import_module(module)
    if tool == "wandb":
      sys.modules["wandb"].setup()
    elif tool == "mlflow":
      _store_template(sys.modules["mlflow.tracking"])
  except Exception:  # pylint: disable=broad-except
    pass


def prestart(names: Iterable[str]) -> dict[str, int]:
  """Starts the writer processes of the named tools now (names that are
  not tools, ``jsonl`` say, are skipped), so their start-up
  (:func:`preload`) overlaps this process's imports and compilation; the
  writers made later (:func:`make_writers`) use them. A process started
  here and not used ends with :func:`discard_unused` or when this process
  exits (its stdin closes). Returns the processes' ids by tool."""
  pids = {}
  with _PROCESSES_LOCK:
    for tool in names:
      if tool not in TOOL_WRITERS:
        continue
      pids[tool] = _live_process(tool).pid
  return pids


def discard_unused() -> None:
  """Ends the writer processes that :func:`prestart` started and no writer
  uses (a run that failed before it made its writers)."""
  with _PROCESSES_LOCK:
    idle = [p for p in _PROCESSES.values() if p.users == 0 and not p.ending]
  for process in idle:
    process.end_if_unused()


def make_writers(
  spec: str | Sequence[str] | None,
  run_dir: str | os.PathLike,
  *,
  name: str | None = None,
  group: str | None = None,
  key: str = "",
  resume: Resume | None = None,
) -> list[MetricWriter]:
  """The writers ``spec`` names (see :func:`parse_spec`), for one run.

  Args:
    spec: ``"jsonl,tensorboard,wandb,mlflow"`` or a subset (a list of names
      works too).
    run_dir: the run folder: ``metrics.jsonl``, ``tensorboard/[key]``,
      ``wandb/``, ``mlflow.db`` and ``tracking.json`` go there.
    name: the run's name in W&B and MLflow (default: the folder's name).
    group: the W&B group (default: none) and the MLflow experiment
      (default: the folder's name); a sweep's settings share it.
    key: this run's key within the folder (a sweep: one per setting; its
      TensorBoard subfolder).
    resume: a resumed session's :class:`Resume`, or None.

  Raises:
    ValueError: an unknown writer name (listing the known ones).
    MissingExtraError: a tool's library is not installed.
  """
  names = parse_spec(spec)
  require_libraries(names)
  run_dir = Path(run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  out: list[MetricWriter] = []
  for writer in names:
    if writer == "jsonl":
      out.append(JsonlWriter(run_dir / key if key else run_dir))
    elif writer == "tensorboard":
      logdir = run_dir / TENSORBOARD_DIR
      out.append(
        ProcessWriter(
          "tensorboard",
          logdir=str(logdir / key if key else logdir),
          resume=resume,
        )
      )
    elif writer == "wandb":
      out.append(
        ProcessWriter(
          "wandb",
          run_dir=str(run_dir),
          name=name or run_dir.name,
          group=group,
          key=key,
          resume=resume,
        )
      )
    else:
      out.append(
        ProcessWriter(
          "mlflow",
          run_dir=str(run_dir),
          experiment=group or run_dir.name,
          name=name or run_dir.name,
          key=key,
          tags={"fedjax_lite.run_folder": str(run_dir.resolve())},
          resume=resume,
        )
      )
  return out


def setting_key(index: int, setting: Mapping[str, Any]) -> str:
  """A sweep setting's name in the tools: ``"setting3_seed=1_client_lr=0.1"``."""
  parts = [
    f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
    for k, v in setting.items()
  ]
  return "_".join([f"setting{index}", *parts])


def _number(value) -> float | None:
  """A row value as a float for the tools (None, i.e. non-finite in
  ``metrics.jsonl``: NaN); None for what is not a number."""
  if value is None:
    return math.nan
  if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
    return None
  return float(value)


class Tracking:
  """Routes the metric rows of a run, or of every setting of a sweep, to
  their writers.

  ``writers[i]`` are setting ``i``'s writers (a run: one list); a row goes
  to ``writers[row.get("setting", 0)]`` as ``write_scalars(row["round"],
  scalars)``, where ``scalars`` are its numeric columns except ``round``
  and ``constant`` (a sweep's setting columns).
  """

  def __init__(
    self,
    writers: Sequence[Sequence[MetricWriter]],
    constant: Iterable[str] = (),
  ):
    self.writers = [list(w) for w in writers]
    self.constant = {"round", "setting", *constant}
    self._closed = False

  @classmethod
  def open(
    cls,
    spec: str | Sequence[Any] | None,
    run_dir: str | os.PathLike | None,
    *,
    hparams: Mapping[str, Any],
    settings: Sequence[Mapping[str, Any]] | None = None,
    resume: Resume | None = None,
    history: Sequence[Mapping] = (),
  ) -> "Tracking | None":
    """The writers ``spec`` names for a run (``settings`` None) or for
    every setting of a sweep, with their hparams written, and the rows of
    ``history`` (a resumed session's rows up to the checkpoint) replayed
    to them (each keeps what it lacks; see the module docstring). ``spec``
    may hold :class:`MetricWriter` objects too (a run only). ``jsonl`` is
    left out: the session's log is the run folder's JSONL. None when no
    other writer is asked for.

    Raises:
      ValueError: an unknown writer name, writer objects given to a sweep,
        or writer names without a run folder.
    """
    items = (
      []
      if spec is None
      else [spec]
      if isinstance(spec, (str, MetricWriter))
      else list(spec)
    )
    objects = [w for w in items if isinstance(w, MetricWriter)]
    names = [
      n
      for n in parse_spec([w for w in items if not isinstance(w, MetricWriter)])
      if n != "jsonl"
    ]
    if objects and settings is not None:
      raise ValueError(
        "sweep(writers=...) takes writer names ("
        f"{', '.join(WRITER_NAMES)}): the sweep makes one writer per "
        f"setting; got the object(s) {objects!r}, each of which records one "
        "run."
      )
    if names and run_dir is None:
      raise ValueError(
        f"writers={names!r} need a run folder for their files; pass run_dir "
        "(or MetricWriter objects for an in-memory run)."
      )
    if not names and not objects:
      return None
    run_dir = None if run_dir is None else Path(run_dir)
    writers: list[list[MetricWriter]] = []
    constant: set = set()
    try:
      if settings is None:
        run = make_writers(names, run_dir, resume=resume) if names else []
        for w in run + objects:
          w.write_hparams(hparams)
        writers.append(run + objects)
      else:
        for i, setting in enumerate(settings):
          constant |= set(setting)
          key = setting_key(i, setting)
          run = make_writers(
            names,
            run_dir,
            name=f"{run_dir.name}/{key}",
            group=run_dir.name,
            key=key,
            resume=resume,
          )
          writers.append(run)
          for w in run:
            w.write_hparams({**hparams, **setting})
    except BaseException:
      cls(writers).close()
      raise
    out = cls(writers, constant)
    for row in history:
      out.write(row)
    return out

  def write(self, row: Mapping[str, Any]) -> None:
    """Sends one metric row to its setting's writers."""
    scalars = {}
    for k, v in row.items():
      if k in self.constant:
        continue
      x = _number(v)
      if x is not None:
        scalars[k] = x
    for w in self.writers[int(row.get("setting", 0) or 0)]:
      w.write_scalars(int(row["round"]), scalars)

  def flush(self) -> None:
    for ws in self.writers:
      for w in ws:
        w.flush()

  def close(self) -> None:
    """Closes every writer (all of them, even when one fails; the first
    error is raised)."""
    if self._closed:
      return
    self._closed = True
    error = None
    every = [w for ws in self.writers for w in ws]
    for w in every:  # every tool process closes its runs at once
      if isinstance(w, ProcessWriter):
        try:
          w.start_close()
        except Exception as e:  # pylint: disable=broad-except
          error = error or e
    for w in every:
      try:
        w.close()
      except Exception as e:  # pylint: disable=broad-except
        error = error or e
    if error is not None:
      raise error
