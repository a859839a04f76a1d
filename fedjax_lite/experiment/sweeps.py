r"""Vectorized sweeps: several seeds and hyperparameter settings as ONE computation.

:func:`sweep` runs every (grid point, seed) setting of an experiment as the
runs of one engine round (:class:`~fedjax_lite.experiment.runs.VmappedRounds`;
see there) and records them like a run: ``sweep.json``, ``metrics.jsonl``
with a ``setting`` column, ``curves.png`` (mean +- std over seeds per grid
point), ``summary.md`` and a crash-safe ``checkpoint.msgpack`` of all
settings' states (``python -m fedjax_lite sweep --resume DIR``). With
``writers=`` (``--log``) each setting is its own tracking run: a
TensorBoard subfolder ``tensorboard/setting<i>_seed=..``, a W&B run in the
group named after the sweep folder, an MLflow run in the experiment named
after it (see :mod:`fedjax_lite.experiment.writers`).

Hyperparameters must be declared by the experiment (``Experiment.hparams`` +
``algorithm_fn``); anything that changes shapes (clients per round, batch size,
model) cannot be vmapped: run it separately and overlay with ``compare``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Mapping, Sequence

import jax
import numpy as np

from fedjax_lite.engine.round import EngineState
from fedjax_lite.experiment import checkpoint as ckpt
from fedjax_lite.experiment import plots
from fedjax_lite.experiment.core import Experiment
from fedjax_lite.experiment.records import (
  final_table,
  setting_label,
)
from fedjax_lite.experiment.files import launch_file
from fedjax_lite.experiment.runs import (
  VmappedRounds,
  check_grid,
  make_settings,
)
from fedjax_lite.experiment.session import (
  RunOptions,
  Session,
  advance,
  max_chunk,
)


@dataclasses.dataclass
class SweepResult:
  """What :func:`sweep` returns.

  Attributes:
    run_dir: the sweep folder (None for in-memory sweeps).
    settings: per setting ``{"seed": int, <hparam>: float, ...}``.
    state: the final EngineStates stacked on a leading ``[S]`` axis.
    rows: metric rows of all settings (column ``setting`` = index).
    num_traces: how often the settings' rounds were traced.
    interrupted: True if a signal stopped the sweep early.
    signum: the signal that stopped it, if any.
    diverged: why the sweep stopped as diverged (every setting's round
      became non-finite), or None; ``state`` is then the last finite one.
    diverged_round: that round.
  """

  run_dir: Path | None
  settings: list
  state: EngineState
  rows: list
  num_traces: int = 0
  interrupted: bool = False
  signum: int | None = None
  diverged: str | None = None
  diverged_round: int | None = None

  def setting_rows(self, i: int) -> list:
    return [r for r in self.rows if r["setting"] == i]

  def groups(self) -> dict:
    """``{hyperparameter label: [rows of each seed]}`` (for band plots)."""
    out: dict = {}
    for i, s in enumerate(self.settings):
      out.setdefault(setting_label(s), []).append(self.setting_rows(i))
    return out

  def state_of(self, i: int) -> EngineState:
    return jax.tree.map(lambda a: a[i], self.state)

  def table(
    self,
    keys: Sequence[str] = (
      "train_loss",
      "train_accuracy",
      "test_loss",
      "test_accuracy",
      "test_accuracy_p10",
    ),
  ) -> str:
    """Markdown table: final metrics per grid point, mean +- std over seeds."""
    return final_table(self.groups(), keys)


def _seed_list(exp: Experiment, seeds: Sequence[int] | int) -> list[int]:
  if isinstance(seeds, (int, np.integer)):
    if seeds < 1:
      raise ValueError(f"seeds must be >= 1, got {seeds}.")
    seeds = [exp.seed + i for i in range(int(seeds))]
  seeds = [int(s) for s in seeds]
  if not seeds or len(set(seeds)) != len(seeds):
    raise ValueError(f"seeds must be distinct and non-empty, got {seeds}.")
  return seeds


def sweep(
  exp: Experiment,
  seeds: Sequence[int] | int = 1,
  grid: Mapping[str, Sequence[float]] | None = None,
  run_dir: str | os.PathLike | None = None,
  **options,
) -> SweepResult:
  """Runs every (grid point, seed) setting of ``exp`` as the runs of one round.

  The settings advance together (:class:`VmappedRounds`) with the same
  :func:`~fedjax_lite.experiment.session.advance` as a single run (which is
  the sweep of one setting); each computes what its separate run computes.
  With ``on_divergence="stop"`` the sweep stops at the first round in which
  every setting diverged.

  Args:
    exp: the experiment; ``exp.seed`` is the first seed when ``seeds`` is an
      int.
    seeds: a count (``exp.seed + 0 .. n-1``) or explicit seeds.
    grid: ``{hparam name: values}`` over names declared in ``exp.hparams``.
    run_dir: folder for metrics, checkpoint, curves.png, summary.md (None:
      in memory only).
    **options: :class:`~fedjax_lite.experiment.session.RunOptions`, as for
      :func:`~fedjax_lite.experiment.session.train` (``writers`` by name
      only; a callback's ``params()`` gives the row's setting's params).

  Returns:
    A :class:`SweepResult`.
  """
  if jax.process_count() > 1:
    raise NotImplementedError(
      "sweeps run in one process; run each setting with `train` (or `python "
      "-m fedjax_lite run`) for multi-process runs."
    )
  opts = RunOptions.of("sweep", options)
  grid = dict(grid or {})
  check_grid(exp, grid)
  seeds = _seed_list(exp, seeds)
  runs = VmappedRounds(exp, seeds, grid, max_chunk(exp))
  settings = runs.settings
  sess = Session.open(
    exp,
    run_dir,
    opts,
    lambda engine, data: runs.init(data),
    settings=settings,
  )
  run_dir = sess.run_dir
  columns = [{"setting": i, **s} for i, s in enumerate(settings)]
  out = sess.run(
    advance(sess, runs, columns),
    f"sweep x{len(settings)}",
    lambda state, row: runs.state_of(runs.params(state), row["setting"]),
  )
  res = SweepResult(
    run_dir,
    settings,
    out.state,
    list(sess.log.rows),
    runs.num_traces,
    out.interrupted,
    out.signum,
    out.diverged,
    out.diverged_round,
  )
  if run_dir is not None:
    title = (
      f"{exp.name or run_dir.name}: {exp.algorithm.name}, "
      f"{len(seeds)} seed(s) per setting (mean ± std)"
    )
    plots.plot_runs(res.groups(), run_dir / "curves.png", title)
    ckpt.atomic_write_text(run_dir / "summary.md", res.table() + "\n")
  return res


def sweep_file(
  spec: str | None,
  overrides: Sequence[str] = (),
  *,
  seeds: Sequence[int] | int = 1,
  grid: Mapping | None = None,
  out: str | os.PathLike = "runs",
  resume: str | os.PathLike | None = None,
  **options,
) -> SweepResult:
  """``python -m fedjax_lite sweep``: a vmapped sweep of an experiment file.

  Args:
    spec: ``path.py[:arg]`` (optional when resuming).
    overrides: ``["field=value", ...]`` applied to the config.
    seeds: a count or explicit seeds (ignored when resuming: the sweep's).
    grid: ``{hparam name: values}`` (ignored when resuming).
    out: parent folder of new sweep folders.
    resume: a sweep folder to continue.
    **options: the other :class:`~fedjax_lite.experiment.session.RunOptions`
      (``checkpoint_every``, ``checkpoint_every_seconds``, ``progress``,
      ``handle_signals``, ``writers``, ``callbacks``).
  """

  def new_record(exp: Experiment) -> dict:
    seed_list = _seed_list(exp, seeds)
    points = {k: [float(v) for v in vs] for k, vs in dict(grid or {}).items()}
    check_grid(exp, points)
    return {
      "seeds": seed_list,
      "grid": points,
      "settings": make_settings(seed_list, points),
    }

  def launch(exp, run_dir, record, **kw):
    return sweep(exp, record["seeds"], record["grid"], run_dir, **kw)

  return launch_file(
    "sweep",
    spec,
    overrides,
    out,
    resume,
    launch,
    new_record,
    **options,
  )
