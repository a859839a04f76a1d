"""Run folders and their records.

A run folder ``runs/<name>-<timestamp>/`` (a sweep's ends in ``-sweep``)
holds:

* ``config.json`` (a sweep: ``sweep.json``): the experiment file, its
  resolved config and overrides, a summary of the experiment, the
  environment and every resume (written before the first round);
* ``metrics.jsonl`` / ``metrics.csv``: one row per round (and per setting of
  a sweep; see :mod:`fedjax_lite.experiment.records`);
* ``checkpoint.msgpack``: the latest full state (see
  :mod:`fedjax_lite.experiment.checkpoint` and
  :mod:`fedjax_lite.experiment.loop`);
* ``curves.png`` and ``summary.json`` (a sweep: ``summary.md``).

``config.json``'s ``environment`` and ``summary.json``'s ``provenance`` are
:func:`provenance`: package versions, Python, platform, devices, process
count, CPU settings, and the experiment file's hash and git commit. Files
and folders are made with the modes a plain ``open()``/``mkdir`` gives (the
umask applies).

This module makes folders (:func:`new_run_dir`), writes and reads their
records (:func:`run_record`, :func:`read_record`, :func:`note_resume`,
:func:`restart_command`), loads the checkpoint a resume continues from
(:func:`load_resume_state`) and writes a finished run's curves and summary
(:func:`finish`).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from fedjax_lite._optional import require
from fedjax_lite.data.sharding import resident_bytes
from fedjax_lite.experiment import checkpoint as ckpt
from fedjax_lite.experiment import config as cfglib
from fedjax_lite.experiment import plots
from fedjax_lite.experiment.core import Experiment
from fedjax_lite.experiment.loop import CHECKPOINT
from fedjax_lite.experiment.records import TIMING_KEYS, final_values


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


# Distributions a run's numbers depend on (always recorded) and optional
# ones recorded when installed (read from their metadata, never imported).
CORE_PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "msgpack")
OPTIONAL_PACKAGES = (
  "chex",
  "orbax-checkpoint",
  "tensorstore",
  "scipy",
  "scikit-learn",
  "dp-accounting",
  "cryptography",
  "phe",
  "h5py",
  "matplotlib",
  "tqdm",
  "tensorboardX",
  "wandb",
  "mlflow-skinny",
  "jax-cuda12-plugin",
  "jax-cuda12-pjrt",
  "jax-cuda13-plugin",
  "jax-cuda13-pjrt",
  "libtpu",
)
# Environment variables that change XLA's devices, threads or numerics.
CPU_ENV_VARS = (
  "XLA_FLAGS",
  "JAX_PLATFORMS",
  "JAX_ENABLE_X64",
  "JAX_DEFAULT_MATMUL_PRECISION",
  "FEDJAX_LITE_CPU_TUNING",
  "FEDJAX_LITE_LIBRARY_FUSIONS",
  "OMP_NUM_THREADS",
  "MKL_NUM_THREADS",
  "OPENBLAS_NUM_THREADS",
)
GIT_TIMEOUT_S = 5.0


def package_versions() -> dict:
  """``{distribution: version}``: fedjax_lite, :data:`CORE_PACKAGES` (None
  when one is missing) and the installed :data:`OPTIONAL_PACKAGES`, read
  with ``importlib.metadata`` (nothing is imported)."""
  import fedjax_lite  # pylint: disable=g-import-not-at-top

  versions: dict = {"fedjax_lite": getattr(fedjax_lite, "__version__", None)}
  for name in CORE_PACKAGES + OPTIONAL_PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      if name in CORE_PACKAGES:
        versions[name] = None
  return versions


def _git(folder: Path, *args: str) -> str | None:
  """``git -C folder *args``'s stdout, or None (no git, not a checkout, an
  error or :data:`GIT_TIMEOUT_S` passed). Takes no lock in the checkout
  (``GIT_OPTIONAL_LOCKS=0``)."""
  try:
    out = subprocess.run(
      ["git", "-C", str(folder), *args],
      capture_output=True,
      text=True,
      timeout=GIT_TIMEOUT_S,
      check=False,
      env={**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"},
    )
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout if out.returncode == 0 else None


def git_state(path: str | os.PathLike) -> dict | None:
  """The git checkout holding ``path`` (a file or folder), or None.

  Returns:
    ``{"commit": <HEAD's sha>, "dirty": <tracked files differ from HEAD>,
    "root": <the checkout's top folder>}``; untracked files (run folders,
    say) do not make it dirty (``git status --porcelain
    --untracked-files=no``). None when git is missing, ``path`` is in no
    checkout, the checkout has no commit yet, or git takes longer than
    :data:`GIT_TIMEOUT_S` seconds.
  """
  path = Path(path)
  folder = path if path.is_dir() else path.parent
  if not folder.is_dir():
    return None
  commit = _git(folder, "rev-parse", "HEAD")
  if commit is None:
    return None
  status = _git(folder, "status", "--porcelain", "--untracked-files=no")
  root = _git(folder, "rev-parse", "--show-toplevel")
  return {
    "commit": commit.strip(),
    "dirty": None if status is None else bool(status.strip()),
    "root": None if root is None else root.strip(),
  }


def cpu_settings() -> dict:
  """The CPU settings in force: what :func:`fedjax_lite.runtime.
  configure_cpu` applied (``applied``, ``num_cpu_devices``,
  ``library_fusions``, ``xla_flags``), the usable cores, JAX's
  ``jax_num_cpu_devices`` and the set :data:`CPU_ENV_VARS`."""
  from fedjax_lite import runtime  # pylint: disable=g-import-not-at-top

  try:
    num_cpu = jax.config.jax_num_cpu_devices
  except AttributeError:  # pragma: no cover - older jax
    num_cpu = None
  return {
    **runtime.settings(),
    "usable_cores": runtime.usable_cores(),
    "jax_num_cpu_devices": num_cpu,
    "env": {k: os.environ[k] for k in CPU_ENV_VARS if k in os.environ},
  }


def provenance(experiment_file: str | os.PathLike | None = None) -> dict:
  """What a run's numbers came from: versions, machine, devices, settings.

  Written to ``config.json`` (``environment``) when a run starts and to
  ``summary.json`` (``provenance``) when it ends; JSON-serialisable, for
  tracking tools to log as hyperparameters. It asks JAX for its devices,
  which starts JAX's backend: outside a run, call it after
  :func:`fedjax_lite.configure_cpu`.

  Args:
    experiment_file: the experiment file; adds its hash and, when it lies
      in a git checkout, the commit and whether tracked files differ.

  Returns:
    ``{"packages": {distribution: version} (see :func:`package_versions`),
    "python": "3.11.9", "python_implementation", "platform" (e.g.
    ``Linux-6.1-x86_64-with-glibc2.36``), "machine", "backend" (``cpu``,
    ``gpu``, ``tpu``), "device_kind" (``jax.devices()[0].device_kind``),
    "num_devices", "num_local_devices", "process_count", "process_index",
    "cpu_settings" (see :func:`cpu_settings`), "experiment": {"file",
    "sha256", "git_commit", "git_dirty", "git_root"} (only with
    ``experiment_file``; the git fields are None outside a checkout)}``.
  """
  devs = jax.devices()
  out = {
    "packages": package_versions(),
    "python": platform.python_version(),
    "python_implementation": platform.python_implementation(),
    "platform": platform.platform(),
    "machine": platform.machine(),
    "backend": jax.default_backend(),
    "device_kind": devs[0].device_kind,
    "num_devices": len(devs),
    "num_local_devices": jax.local_device_count(),
    "process_count": jax.process_count(),
    "process_index": jax.process_index(),
    "cpu_settings": cpu_settings(),
  }
  if experiment_file is not None:
    path = Path(experiment_file)
    try:
      sha = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
      sha = None
    git = git_state(path) or {}
    out["experiment"] = {
      "file": str(path),
      "sha256": sha,
      "git_commit": git.get("commit"),
      "git_dirty": git.get("dirty"),
      "git_root": git.get("root"),
    }
  return out


def environment(experiment_file: str | os.PathLike | None = None) -> dict:
  """``config.json``'s ``environment``: :func:`provenance`."""
  return provenance(experiment_file)


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
    "train_eval_clients": int(exp.train_eval_sample().size),
    "seed": exp.seed,
    "hparams": dict(exp.hparams),
  }


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
  (``extra``: e.g. checkpoints written and their cost in this session).

  ``summary.json`` also holds :func:`provenance` (``provenance``) as of the
  end of the run, for the experiment file that ``run_dir``'s
  ``config.json`` names (its hash and git state may differ from the start's
  in ``config.json``'s ``environment`` when it was edited meanwhile)."""
  title = f"{exp.name or run_dir.name}: {exp.algorithm.name}, {exp.model.name}"
  fig = plots.plot_curves(rows, None, title)
  plots.save(fig, run_dir / "curves.png")
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
    "provenance": provenance(recorded_experiment_file(run_dir)),
  }
  ckpt.atomic_write_text(run_dir / "summary.json", cfglib.dumps(summary))


def recorded_experiment_file(run_dir: Path) -> str | None:
  """The experiment file ``run_dir``'s ``config.json`` (or ``sweep.json``)
  names, or None (no record, or one without it)."""
  for name in ("config.json", "sweep.json"):
    try:
      record = json.loads((Path(run_dir) / name).read_text())
    except (OSError, ValueError):
      continue
    file = (record.get("experiment") or {}) if isinstance(record, dict) else {}
    if isinstance(file, dict) and isinstance(file.get("file"), str):
      return file["file"]
  return None


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


def load_record_file(path: Path, where: str, command: str = "run") -> dict:
  """The record (``config.json`` / ``sweep.json``) at ``path``, checked to
  hold an experiment spec and a config; anything else is a ConfigError
  starting with ``where`` (e.g. ``--resume DIR``)."""
  try:
    record = json.loads(path.read_text())
  except (OSError, ValueError, UnicodeDecodeError) as e:  # JSONDecodeError
    raise cfglib.ConfigError(
      f"{where}: {path} is unreadable or not valid JSON ({e}); expected "
      f"the record `python -m fedjax_lite {command}` wrote."
    ) from None
  if not (
    isinstance(record, dict)
    and isinstance(record.get("experiment"), dict)
    and "spec" in record["experiment"]
    and isinstance(record.get("config"), dict)
  ):
    raise cfglib.ConfigError(
      f"{where}: {path} holds no experiment spec and config (a "
      f"{type(record).__name__}); expected the record `python -m "
      f"fedjax_lite {command}` wrote."
    )
  return record


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
  record = load_record_file(rdir / name, f"--resume {rdir}", command)
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
    "environment": environment(ef.path),
    "created": datetime.datetime.now().isoformat(timespec="seconds"),
    "resumes": [],
  }


def note_resume(
  record: dict, ef: cfglib.ExperimentFile, cfg, overrides
) -> None:
  """Records a resume (and warns if the experiment file changed)."""
  if record["experiment"].get("sha256") != ef.sha256():
    tqdm = require("tqdm.auto", "experiment").tqdm

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
