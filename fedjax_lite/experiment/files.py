"""Experiment files into run folders: the ``run`` and ``sweep`` commands'
shared launching, and the ``main()`` of script-style experiment files.

* :func:`prepare`: load an experiment file (or a run folder's, to resume)
  and resolve its config with the overrides;
* :func:`launch_file`: make the run folder (or note the resume), write its
  record, then run the experiment (:func:`run_file` with
  :func:`~fedjax_lite.experiment.session.train`,
  :func:`~fedjax_lite.experiment.sweeps.sweep_file` with
  :func:`~fedjax_lite.experiment.sweeps.sweep`);
* :func:`script_main`: ``python experiments/X.py [--smoke]`` for experiment
  files that do not build an :class:`Experiment`.

Running as several processes: :mod:`fedjax_lite.experiment.launch`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from fedjax_lite import distributed
from fedjax_lite.experiment import checkpoint as ckpt
from fedjax_lite.experiment import config as cfglib
from fedjax_lite.experiment.core import Experiment
from fedjax_lite.experiment.run_folder import (
  new_run_dir,
  note_resume,
  read_record,
  run_name,
  run_record,
)
from fedjax_lite.experiment.session import RunResult, train


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


def run_script_file(
  ef: cfglib.ExperimentFile, overrides: Sequence[str] | dict = (), out="runs"
) -> tuple[Path, dict]:
  """``python -m fedjax_lite run X.py[:arg]`` for a script-style file (one
  that defines ``run(config, run_dir)`` instead of ``build``, e.g. vertical
  FL): ``run`` gets the resolved config and a fresh ``<out>/X-<time>/``
  folder, whose ``config.json`` records the file, its hash and the config;
  returns ``(run_dir, summary)``."""
  cfg = cfglib.apply_overrides(ef.get_config(), overrides)
  run_dir = new_run_dir(out, ef.name + (f"-{ef.arg}" if ef.arg else ""))
  record = {
    "experiment": {"file": str(ef.path), "arg": ef.arg, "sha256": ef.sha256()},
    "config": cfglib.config_to_dict(cfg),
    "overrides": list(overrides)
    if not isinstance(overrides, dict)
    else {k: str(v) for k, v in overrides.items()},
  }
  ckpt.atomic_write_text(run_dir / "config.json", cfglib.dumps(record))
  return run_dir, ef.module.run(cfg, run_dir)


def script_main(file: str, get_config, run, argv=None) -> dict:
  """``main()`` of a script-style experiment file (one that
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
