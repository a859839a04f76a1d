"""A run's global model as a file of its own: ``export_params`` and ``load_params``.

::

  python -m fedjax_lite export runs/fedavg_synthetic-20250101-120000 \\
      --out params.msgpack [--round N] [--format msgpack|orbax] [--overwrite]

:func:`export_params` writes only the global model's parameters
(``algorithm.get_params`` of the checkpoint's server state, whatever the
algorithm keeps beside them) as flax msgpack (nested dicts of arrays), or as
an orbax folder. It reads the run folder and writes nothing there.
:func:`load_params` reads them back (``Model.load_params`` also checks them
against a model). Evaluating an exported model of
``experiments/fedavg_synthetic.py``::

  model = fl.models.logistic_regression(60, 10)
  _, test = fl.datasets.fedprox_synthetic(1.0, 1.0, num_clients=30, seed=0)
  print(fl.evaluate(model, model.load_params("params.msgpack"), test).mean)

which prints the run's final ``test_accuracy`` and ``test_loss``.

Rounds: a run folder's checkpoint holds the latest state only, so
``round=None`` (or the checkpoint's round) exports the checkpoint's params,
and an earlier ``round=N`` recomputes them: the run's recorded experiment
(``config.json``: the experiment file and its resolved config) is replayed
in memory from round 0 to N with the run's compiled rounds. Rounds are
deterministic (sampling is ``fold_in(rng, round)``; a resumed run is
bit-identical), so on the same machine and device count the replay gives
the run's round-N model bit for bit. A replay is refused when the
experiment file changed since the run started (its hash differs), and
checked: its per-round training metrics must match ``metrics.jsonl`` (to
1e-4 relative), else it stops naming the first round that differs. Rounds
after the checkpoint cannot be exported (the run has not computed them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, NamedTuple

import flax.serialization
import jax
import numpy as np

from fedjax_lite._optional import MissingExtraError
from fedjax_lite.experiment import checkpoint as ckpt
from fedjax_lite.experiment import config as cfglib
from fedjax_lite.experiment.core import Experiment
from fedjax_lite.experiment.loop import CHECKPOINT
from fedjax_lite.experiment.records import read_jsonl
from fedjax_lite.experiment.run_folder import load_record_file
from fedjax_lite.models import params_io

FORMATS = ("msgpack", "orbax")
# Relative tolerance of the replay's check against the recorded metrics.
REPLAY_RTOL = 1e-4


class Exported(NamedTuple):
  """What :func:`export_params` wrote.

  Attributes:
    path: the file (msgpack) or folder (orbax).
    round: the round whose global model it holds.
    source: ``"checkpoint"`` or ``"replay"`` (see the module docstring).
    params: the parameters written (numpy leaves).
  """

  path: Path
  round: int
  source: str
  params: Any


def load_params(path: str | os.PathLike, target: Any = None) -> Any:
  """Parameters written by :func:`export_params` (either format).

  Args:
    path: the msgpack file or orbax folder.
    target: None, or a pytree the params must fit (e.g.
      ``model.init(key)``): every leaf's path, shape and dtype is checked
      and the params come back in its structure.

  Returns:
    The params with numpy leaves, in the exported structure (flax models'
    params: nested dicts; see :func:`fedjax_lite.models.params_io.
    read_params`).
  """
  return params_io.read_params(path, target)


def _check_args(run_dir, out, round_, fmt) -> tuple[Path, Path]:
  if not isinstance(run_dir, (str, os.PathLike)):
    raise TypeError(
      f"run_dir must be a path (str or os.PathLike), got "
      f"{type(run_dir).__name__}."
    )
  if not isinstance(out, (str, os.PathLike)) or not str(out):
    raise TypeError(
      f"out must be a file path (str or os.PathLike), got {out!r:.80}."
    )
  if fmt not in FORMATS:
    raise cfglib.ConfigError(f"format must be one of {FORMATS}, got {fmt!r}.")
  if round_ is not None and (
    isinstance(round_, bool)
    or not isinstance(round_, (int, np.integer))
    or round_ < 0
  ):
    raise cfglib.ConfigError(
      f"round (--round) must be None (the checkpoint's round) or an int "
      f">= 0, got {round_!r}."
    )
  return Path(run_dir), Path(out)


def _inside(path: Path, folder: Path) -> bool:
  path, folder = path.resolve(), folder.resolve()
  return path == folder or folder in path.parents


def _check_out(out: Path, run_dir: Path, fmt: str, overwrite: bool) -> None:
  """Refuses an ``out`` inside the run folder, an existing one without
  ``overwrite``, and one of the wrong kind (a folder for msgpack, a folder
  that is not an orbax checkpoint for orbax)."""
  if _inside(out, run_dir):
    raise cfglib.ConfigError(
      f"--out {out} lies inside the run folder {run_dir}; export writes "
      "outside it so the run folder stays as the run left it. Expected a "
      "path elsewhere, e.g. --out params.msgpack."
    )
  if not (out.exists() or out.is_symlink()):
    return
  if not overwrite:
    raise cfglib.ConfigError(
      f"--out {out} already exists; pass --overwrite (overwrite=True) to "
      "replace it, or choose another path."
    )
  if fmt == "msgpack" and out.is_dir():
    raise cfglib.ConfigError(
      f"--out {out} is a folder; format 'msgpack' writes a file, expected "
      "a file path (or --format orbax for a folder)."
    )
  if fmt == "orbax" and out.is_dir() and not _is_orbax_folder(out):
    raise cfglib.ConfigError(
      f"--out {out} is a folder that holds no orbax checkpoint; --overwrite "
      "replaces only an earlier export. Expected a new path."
    )


def _is_orbax_folder(path: Path) -> bool:
  return (path / "_CHECKPOINT_METADATA").is_file() or (
    path / "_METADATA"
  ).is_file()


def read_run(run_dir: Path) -> dict:
  """``run_dir``'s ``config.json``, checked: a run folder with a
  checkpoint (:class:`~fedjax_lite.experiment.config.ConfigError` naming
  what is missing otherwise)."""
  if not run_dir.is_dir():
    raise cfglib.ConfigError(
      f"RUN_DIR {run_dir}: no such folder; expected a folder written by "
      "`python -m fedjax_lite run`."
    )
  if (run_dir / "sweep.json").is_file():
    raise cfglib.ConfigError(
      f"RUN_DIR {run_dir} is a sweep folder (its checkpoint holds every "
      "setting); export exports run folders. Run the setting you want with "
      "`python -m fedjax_lite run ... --set seed=S` and export that."
    )
  record_path = run_dir / "config.json"
  if not record_path.is_file():
    raise cfglib.ConfigError(
      f"RUN_DIR {run_dir}: not a run folder (no config.json); expected a "
      "folder written by `python -m fedjax_lite run`."
    )
  record = load_record_file(record_path, f"RUN_DIR {run_dir}")
  if not (run_dir / CHECKPOINT).is_file():
    raise cfglib.ConfigError(
      f"RUN_DIR {run_dir} has no {CHECKPOINT}: the run stopped before its "
      "first checkpoint, so it holds no model to export."
    )
  return record


def build_experiment(record: dict) -> tuple[cfglib.ExperimentFile, Experiment]:
  """The experiment file a run record names and the Experiment it builds
  with the recorded config."""
  ef = cfglib.load_experiment_file(record["experiment"]["spec"])
  cfg = cfglib.config_from_dict(ef.get_config(), record["config"])
  return ef, ef.build(cfg)


def _read_checkpoint(path: Path, identity: dict) -> dict:
  try:
    raw = ckpt.read_checkpoint(path)
    ckpt.check_identity(path, dict(raw.get("meta") or {}), identity)
  except (ValueError, FileNotFoundError) as e:
    raise cfglib.ConfigError(" ".join(str(e).split())) from None
  if not isinstance(raw.get("state"), dict) or "server" not in raw["state"]:
    raise cfglib.ConfigError(
      f"checkpoint {path} holds no server state (keys "
      f"{sorted(raw.get('state') or {})}); expected a run's checkpoint."
    )
  return raw


def params_from_checkpoint(exp: Experiment, raw: dict, path: Path) -> Any:
  """The global model's params in a decoded checkpoint (see
  :func:`~fedjax_lite.experiment.checkpoint.read_checkpoint`):
  ``exp.algorithm.get_params`` of its server state, restored into the
  structure of ``exp.algorithm.server_init(exp.initial_params())`` (traced
  with ``jax.eval_shape``: nothing is computed)."""
  alg = exp.algorithm
  target = jax.eval_shape(lambda: alg.server_init(exp.initial_params()))
  try:
    server = params_io.fit_params(
      target,
      raw["state"]["server"],
      f"checkpoint {path} (server state)",
      f"the server state of {alg.name}",
    )
  except ValueError as e:
    raise cfglib.ConfigError(" ".join(str(e).split())) from None
  return jax.tree.map(np.asarray, alg.get_params(server))


def _recorded(value) -> float:
  try:
    return float(value)  # "nan" / "inf" strings too
  except (TypeError, ValueError):
    return float("nan")


def replay_params(
  exp: Experiment, num_rounds: int, run_dir: Path | None = None
) -> Any:
  """The global model after ``num_rounds`` rounds of ``exp``, recomputed.

  Runs the rounds as :func:`~fedjax_lite.experiment.train` does (the same
  :class:`~fedjax_lite.experiment.VmappedRounds` program, from
  ``exp``'s initial state), in memory. With ``run_dir``, each round's
  training metrics are compared with the run's ``metrics.jsonl`` rows
  (relative tolerance :data:`REPLAY_RTOL`).

  Raises:
    ConfigError: a replayed round's metric differs from the recorded one.
  """
  # Imported here: the session imports the engine's rounds (heavy).
  from fedjax_lite.experiment.runs import PARAMS_FINITE, VmappedRounds  # pylint: disable=g-import-not-at-top
  from fedjax_lite.experiment.session import max_chunk, train_row  # pylint: disable=g-import-not-at-top

  runs = VmappedRounds(exp, [exp.seed], None, max_chunk(exp), stacked=False)
  data = runs.engine.put_data(exp.train, placement=exp.placement)
  state = runs.init(data)
  recorded = {}
  if run_dir is not None:
    recorded = {
      r.get("round"): r for r in read_jsonl(run_dir / "metrics.jsonl")
    }
  t = 0
  while t < num_rounds:
    n = min(runs.max_rounds, num_rounds - t)
    state, metrics = runs.run(state, data, n)
    metrics = dict(jax.device_get(metrics))
    metrics.pop(PARAMS_FINITE, None)
    for k in range(n):
      row = train_row({key: v[k] for key, v in metrics.items()})
      want = recorded.get(t + k + 1, {})
      for key in sorted(set(row) & set(want)):
        a, b = row[key], _recorded(want[key])
        if not np.isclose(a, b, rtol=REPLAY_RTOL, atol=1e-7, equal_nan=True):
          raise cfglib.ConfigError(
            f"replaying {run_dir} to round {num_rounds}: round {t + k + 1} "
            f"gives {key}={a!r} but the run recorded {b!r}; the experiment's "
            "data or code no longer computes the run's rounds (or this "
            f"machine has another device setup: {jax.device_count()} "
            "devices here). Export the checkpoint's round instead (no "
            "--round)."
          )
    t += n
  return jax.tree.map(np.asarray, jax.device_get(runs.params(state)))


def _placement(run_dir: Path, exp: Experiment) -> str:
  """The data placement the run used (``summary.json``; else the
  experiment's)."""
  try:
    summary = json.loads((run_dir / "summary.json").read_text())
  except (OSError, ValueError):
    return exp.placement
  placement = summary.get("placement") if isinstance(summary, dict) else None
  return placement if placement in ("replicated", "sharded") else exp.placement


def write_params(
  out: Path, params: Any, fmt: str = "msgpack", overwrite: bool = False
) -> None:
  """Writes ``params`` to ``out``: flax msgpack of their state dict
  (atomically, mode as ``open()`` gives it), or an orbax folder
  (``StandardCheckpointer``; an existing one is replaced only with
  ``overwrite``)."""
  host = jax.tree.map(np.asarray, jax.device_get(params))
  if fmt == "msgpack":
    data = flax.serialization.msgpack_serialize(
      flax.serialization.to_state_dict(host)
    )
    ckpt.atomic_write_bytes(out, data)
    return
  ocp = params_io.orbax_checkpoint()
  target = out.resolve()
  if overwrite and target.exists() and not target.is_dir():
    target.unlink()
  target.parent.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(target, host, force=overwrite)


def export_params(
  run_dir: str | os.PathLike,
  out: str | os.PathLike,
  *,
  round: int | None = None,  # pylint: disable=redefined-builtin
  format: str = "msgpack",  # pylint: disable=redefined-builtin
  overwrite: bool = False,
) -> Exported:
  """Writes the global model's parameters of a run folder to ``out``.

  Args:
    run_dir: a folder written by ``python -m fedjax_lite run`` (or
      :func:`~fedjax_lite.experiment.run_file`) holding its checkpoint.
    out: the file to write (``format="orbax"``: a folder); not inside
      ``run_dir``.
    round: None: the checkpoint's round (the final one of a finished run);
      an earlier round ``N >= 0`` is recomputed by replaying the recorded
      experiment (see the module docstring); a later one is refused,
      naming the rounds available.
    format: ``"msgpack"`` (flax msgpack of the params' state dict) or
      ``"orbax"`` (needs orbax-checkpoint).
    overwrite: replace an existing ``out`` (else refused).

  Returns:
    :class:`Exported`: the path, round, source and params.

  Raises:
    ConfigError: ``run_dir`` is not a run folder with a checkpoint, ``out``
      exists (without ``overwrite``) or lies in ``run_dir``, ``round`` is
      after the checkpoint's, or a replay does not reproduce the run.
    MissingExtraError: ``format="orbax"`` without orbax-checkpoint.
  """
  run_dir, out = _check_args(run_dir, out, round, format)
  record = read_run(run_dir)
  _check_out(out, run_dir, format, overwrite)
  if format == "orbax":
    params_io.orbax_checkpoint()  # refuse before any work
  ef, exp = build_experiment(record)
  path = run_dir / CHECKPOINT
  raw = _read_checkpoint(
    path,
    {
      "experiment": f"{Path(ef.path).name}:{ef.arg or ''}",
      "experiment_sha256": record["experiment"].get("sha256"),
    },
  )
  done = int(np.asarray(raw["state"].get("round", -1)).reshape(-1)[0])
  if round is None or round == done:
    params = params_from_checkpoint(exp, raw, path)
    rnd, source = done, "checkpoint"
  elif round > done:
    raise cfglib.ConfigError(
      f"--round {round}: {run_dir}'s checkpoint is at round {done}, the "
      f"last round the run computed; rounds 0..{done} can be exported "
      f"(round {done} from the checkpoint, earlier ones by replaying the "
      "run)."
    )
  else:
    if ef.sha256() != record["experiment"].get("sha256"):
      raise cfglib.ConfigError(
        f"--round {round}: {ef.path} changed since the run started (its "
        "sha256 differs from config.json's), so replaying it would not "
        "compute the run's rounds; export the checkpoint's round "
        f"({done}) instead, or restore the file."
      )
    exp = dataclasses.replace(exp, placement=_placement(run_dir, exp))
    params = replay_params(exp, int(round), run_dir)
    rnd, source = int(round), "replay"
  write_params(out, params, format, overwrite)
  return Exported(out, rnd, source, params)


# ------------------------------------------------------------ command line
def add_export_parser(subparsers) -> argparse.ArgumentParser:
  """Adds the ``export`` command to ``subparsers`` (an argparse
  ``add_subparsers()`` result); :func:`export_command` runs it."""
  e = subparsers.add_parser(
    "export",
    help="write a run's global model parameters to a file",
    formatter_class=argparse.RawDescriptionHelpFormatter,
    description="Write the global model's parameters of a run folder (its "
    "checkpoint's, or an earlier round's by replaying the run) to a file "
    "of their own. The run folder is only read.",
    epilog="Read them back with fl.experiment.load_params(FILE) or "
    "model.load_params(FILE) (checked against the model), e.g.\n"
    "  model = fl.models.logistic_regression(60, 10)\n"
    "  _, test = fl.datasets.fedprox_synthetic(1.0, 1.0, num_clients=30)\n"
    '  print(fl.evaluate(model, model.load_params("params.msgpack"), '
    "test).mean)",
  )
  e.add_argument("run_dir", metavar="RUN_DIR", help="a run folder")
  e.add_argument(
    "--out",
    required=True,
    metavar="FILE",
    help="the file to write (--format orbax: a folder), outside RUN_DIR",
  )
  e.add_argument(
    "--round",
    type=int,
    default=None,
    metavar="N",
    help="the round to export (default: the checkpoint's, i.e. the last "
    "one); an earlier round is recomputed by replaying the run",
  )
  e.add_argument(
    "--format",
    choices=FORMATS,
    default="msgpack",
    help="flax msgpack (default) or an orbax checkpoint folder",
  )
  e.add_argument(
    "--overwrite", action="store_true", help="replace an existing --out"
  )
  return e


def export_command(args: argparse.Namespace) -> int:
  """Runs ``python -m fedjax_lite export``: 0 when written; 2 with one
  ``error: ...`` line on stderr for bad input."""
  try:
    res = export_params(
      args.run_dir,
      args.out,
      round=args.round,
      format=args.format,
      overwrite=args.overwrite,
    )
  except (cfglib.ConfigError, MissingExtraError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  n = sum(int(np.size(a)) for a in jax.tree.leaves(res.params))
  how = "from the checkpoint" if res.source == "checkpoint" else "replayed"
  print(
    f"wrote {res.path}: the global model of {args.run_dir} after round "
    f"{res.round} ({how}), {n} parameters in "
    f"{len(jax.tree.leaves(res.params))} arrays"
  )
  return 0
