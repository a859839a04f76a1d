"""The ``python -m fedjax_lite`` command line: run, sweep and compare experiments.

  python -m fedjax_lite run experiments/fedavg_synthetic.py[:smoke] \\
      [--set client_lr=0.03 num_rounds=50] [--out runs] [--checkpoint-every N]
      [--log tensorboard,wandb,mlflow]
  python -m fedjax_lite run --resume runs/fedavg_synthetic-20250101-120000
  python -m fedjax_lite sweep experiments/fedavg_synthetic.py --seeds 8 \\
      [--grid client_lr=0.01,0.03,0.1]
  python -m fedjax_lite sweep --resume runs/fedavg_synthetic-sweep-...
  python -m fedjax_lite compare runs/a runs/b --out runs/compare \\
      [--x rounds|seconds|bytes] [--smooth 0.6] [--format png|svg]
  python -m fedjax_lite export runs/fedavg_synthetic-... --out params.msgpack \\
      [--round N] [--format msgpack|orbax]
  python -m fedjax_lite launch --processes 2 experiments/fedavg_synthetic.py \
      [run options]        # one run as 2 processes (jax.distributed)

``python -m fedjax_lite run experiments/x.py --help`` also lists the
experiment's config fields (what ``--set`` accepts).
"""

from __future__ import annotations

import argparse
import errno
import signal
import sys
from pathlib import Path
from typing import Sequence

from fedjax_lite._optional import MissingExtraError, require
from fedjax_lite.experiment import export
from fedjax_lite.experiment.config import (
  ConfigError,
  describe_config,
  load_experiment_file,
  parse_overrides,
)

EPILOG_RUN = """\
Experiment files define get_config(arg="") -> frozen dataclass and
build(config) -> fedjax_lite.experiment.Experiment; ":arg" is passed to
get_config (e.g. ":smoke" for a seconds-long run). Outputs go to
OUT/<name>-<timestamp>/: config.json, metrics.jsonl, metrics.csv, curves.png,
summary.json (with the provenance: package versions, devices, CPU
settings, the experiment file's git commit), checkpoint.msgpack.
`python -m fedjax_lite export RUN_DIR` writes the trained model's params on
their own. Checkpoints are written before the first
round and at most every 60 s (--checkpoint-every-seconds), so a killed run
(even SIGKILL) resumes with --resume; Ctrl-C or SIGTERM finishes the current
round, checkpoints and exits with 128+signal (130/143).
--log tensorboard,wandb,mlflow also sends every row to those tools (files in
the run folder: tensorboard/, wandb/ (WANDB_MODE=offline: no network),
mlflow.db); see fedjax_lite.experiment.writers."""


def _spec_help(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
  """Adds the experiment's config fields to --help when a file is named."""
  specs = [a for a in argv if not a.startswith("-") and ".py" in a]
  if not specs or not ({"-h", "--help"} & set(argv)):
    return
  try:
    ef = load_experiment_file(specs[0])
    cfg = ef.get_config()
    doc = (ef.module.__doc__ or "").strip()
    parser.epilog = (parser.epilog or "") + (
      f"\n\n{ef.path.name}: {doc.splitlines()[0] if doc else ''}\n"
      f"config fields (--set name=value), {type(cfg).__name__} for arg "
      f"{ef.arg!r}:\n{describe_config(cfg)}"
    )
  except ConfigError as e:
    parser.epilog = (
      parser.epilog or ""
    ) + f"\n\n(could not load {specs[0]}: {e})"


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
  p = argparse.ArgumentParser(
    prog="python -m fedjax_lite",
    description="fedjax_lite experiments: run, sweep, compare, launch and export.",
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog="Run `python -m fedjax_lite <command> --help` for details.",
  )
  sub = p.add_subparsers(
    dest="command", metavar="{run,sweep,compare,launch,export}"
  )
  sub.required = True

  r = sub.add_parser(
    "run",
    help="run (or resume) one experiment file",
    formatter_class=argparse.RawDescriptionHelpFormatter,
    description="Run an experiment file: progress bar, metrics, curves, "
    "checkpoints.",
    epilog=EPILOG_RUN,
  )
  r.add_argument(
    "experiment",
    nargs="?",
    help="experiments/<name>.py[:arg] (optional with --resume)",
  )
  _common(r)
  r.add_argument(
    "--resume",
    metavar="RUN_DIR",
    help="continue the run in RUN_DIR from its checkpoint "
    "(--set applies on top of its saved config, e.g. to "
    "raise num_rounds)",
  )
  _checkpoint_args(r)
  _divergence_arg(r, "a round", "the run")
  r.add_argument(
    "--placement",
    choices=("replicated", "sharded"),
    default=None,
    help="where the training clients live: every device holds all of them "
    "(replicated), or each holds ~1/devices of them (sharded); default: "
    "the experiment's (replicated unless it says)",
  )
  mp = r.add_argument_group(
    "multi-process runs (jax.distributed; see `launch` for one machine)"
  )
  mp.add_argument(
    "--coordinator",
    metavar="HOST:PORT",
    help="process 0's address; every process of the run gets the same one",
  )
  mp.add_argument("--num-processes", type=int, metavar="N")
  mp.add_argument("--process-id", type=int, metavar="I", help="0 .. N-1")
  mp.add_argument(
    "--local-devices",
    type=int,
    metavar="D",
    help="CPU devices of this process (default: one per core)",
  )
  mp.add_argument(
    "--timeout",
    type=int,
    default=120,
    metavar="S",
    help="seconds to wait for the coordinator and the other processes",
  )

  s = sub.add_parser(
    "sweep",
    help="run several seeds / hyperparameters as ONE computation",
    formatter_class=argparse.RawDescriptionHelpFormatter,
    description="Vectorized sweep: every setting (seed x grid point) "
    "advances in one jitted computation: the settings are runs of "
    "one pooled engine round (their clients share the blocks), each "
    "with its own seed, hyperparameters and aggregator state.",
    epilog="Seeds vary the initial params and the sampling/client rng (the "
    "data is built once from the base config). --grid names must be "
    "declared by the experiment in Experiment.hparams (with "
    "algorithm_fn). Outputs: OUT/<name>-sweep-<timestamp>/ with "
    "sweep.json, metrics.jsonl/csv (a 'setting' column), curves.png "
    "(mean +- std over seeds per grid point), summary.md.",
  )
  s.add_argument(
    "experiment",
    nargs="?",
    help="experiments/<name>.py[:arg] (optional with --resume)",
  )
  _common(s)
  s.add_argument(
    "--resume",
    metavar="SWEEP_DIR",
    help="continue the sweep in SWEEP_DIR from its checkpoint "
    "(its seeds and grid; --set applies on top)",
  )
  _checkpoint_args(s)
  _divergence_arg(s, "a round in which every setting diverged", "the sweep")
  s.add_argument(
    "--seeds",
    default="1",
    metavar="N|S1,S2,..",
    help="N seeds (config seed, seed+1, ...) or an explicit "
    "comma-separated list (default 1)",
  )
  s.add_argument(
    "--grid",
    action="extend",
    nargs="+",
    default=[],
    metavar="NAME=V1,V2,..",
    help="values of a sweepable hyperparameter (repeatable; "
    "settings are the product of all grids and seeds)",
  )

  c = sub.add_parser(
    "compare",
    help="overlay several runs' curves and tabulate final metrics",
    description="Overlay convergence curves of run (or sweep) folders into "
    "one figure and write a markdown table of final metrics.",
  )
  c.add_argument("runs", nargs="+", metavar="RUN_DIR")
  c.add_argument(
    "--out",
    required=True,
    metavar="DIR",
    help="folder for compare.png and compare.md",
  )
  c.add_argument(
    "--labels",
    nargs="+",
    metavar="LABEL",
    help="legend labels, one per RUN_DIR (default: folder names)",
  )
  c.add_argument("--title", default=None)
  c.add_argument(
    "--x",
    choices=("rounds", "seconds", "bytes"),
    default="rounds",
    help="x-axis: rounds (default), wall-clock seconds since the start, or "
    "cumulative uplink bytes (the runs' uplink_bytes)",
  )
  c.add_argument(
    "--smooth",
    type=float,
    default=0.0,
    metavar="W",
    help="exponential moving average weight in [0, 1) (TensorBoard's "
    "smoothing; 0: raw curves, the default)",
  )
  c.add_argument(
    "--format",
    dest="fmt",
    choices=("png", "svg"),
    default="png",
    help="figure format (default png)",
  )

  la = sub.add_parser(
    "launch",
    help="run one experiment as N processes on this machine",
    formatter_class=argparse.RawDescriptionHelpFormatter,
    description="Start N `run` processes joined by jax.distributed (CPU "
    "collectives over localhost). The client axis spans processes x devices;"
    " with --placement sharded each process holds only its clients.",
    epilog="Everything after the launcher's options goes to `run`, e.g.\n"
    "  python -m fedjax_lite launch --processes 2 --devices 4 \\\n"
    "      experiments/fedavg_synthetic.py --placement sharded --set "
    "num_rounds=5 --log tensorboard\n(--log is checked before any process "
    "starts; process 0 writes the metrics and the tools' files.)\n"
    "On a cluster start `run` on every host with "
    "--coordinator/--num-processes/--process-id instead (see "
    "fedjax_lite.experiment.launch).",
  )
  la.add_argument("--processes", type=int, required=True, metavar="N")
  la.add_argument(
    "--devices",
    type=int,
    default=None,
    metavar="D",
    help="CPU devices in all, a multiple of N (default: one per core)",
  )
  la.add_argument("--port", type=int, default=None, help="coordinator port")
  la.add_argument(
    "--timeout",
    type=int,
    default=120,
    metavar="S",
    help="seconds processes wait for each other to start",
  )
  la.add_argument(
    "--log-dir",
    default="runs",
    metavar="DIR",
    help="where the logs of processes 1..N-1 go (default: runs)",
  )
  la.add_argument(
    "run_args",
    nargs="*",
    metavar="RUN_ARGS",
    help="the `run` command's arguments (experiment file, options)",
  )
  ex = export.add_export_parser(sub)
  return p, {"run": r, "sweep": s, "compare": c, "launch": la, "export": ex}


def _common(p: argparse.ArgumentParser) -> None:
  p.add_argument(
    "--set",
    dest="overrides",
    action="extend",
    nargs="+",
    default=[],
    metavar="FIELD=VALUE",
    help="override config fields, typed by the config dataclass (repeatable)",
  )
  p.add_argument(
    "--out",
    default="runs",
    metavar="DIR",
    help="parent folder of the run folder (default: runs)",
  )
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.add_argument(
    "--log",
    action="append",
    default=[],
    metavar="WRITERS",
    help="also send the metrics to these tools, comma-separated: "
    "tensorboard, wandb, mlflow (jsonl, metrics.jsonl/csv, is always on; "
    "files go to the run folder; needs fedjax_lite[tracking]). Give it "
    "again with --resume: the tools then continue their runs",
  )


def _divergence_arg(p: argparse.ArgumentParser, when: str, what: str) -> None:
  p.add_argument(
    "--on-divergence",
    choices=("stop", "continue"),
    default="stop",
    help=f"{when} with a non-finite loss or model: stop {what} with "
    "status 'diverged' and exit 3, keeping the last finite checkpoint "
    "(default), or continue",
  )


def _checkpoint_args(p: argparse.ArgumentParser) -> None:
  p.add_argument(
    "--checkpoint-every-seconds",
    type=float,
    default=60.0,
    metavar="S",
    help="the most wall time between two checkpoints, i.e. the "
    "most work a crash can lose (default 60; cheap "
    "checkpoints are written more often); 0 turns "
    "time-based checkpoints off",
  )
  p.add_argument(
    "--checkpoint-every",
    type=int,
    default=0,
    metavar="N",
    help="also checkpoint every N rounds (default 0: off)",
  )


def _checkpointing(args) -> dict:
  if args.checkpoint_every < 0:
    raise ConfigError(
      f"--checkpoint-every must be >= 0, got {args.checkpoint_every}."
    )
  if args.checkpoint_every_seconds < 0:
    raise ConfigError(
      f"--checkpoint-every-seconds must be >= 0 (0: off), got "
      f"{args.checkpoint_every_seconds}."
    )
  return {
    "checkpoint_every": args.checkpoint_every,
    "checkpoint_every_seconds": args.checkpoint_every_seconds or None,
  }


def parse_seeds(text: str) -> int | list[int]:
  """``"8"`` -> 8 (a count: the config's seed and the next 7);
  ``"0,3,5"`` -> ``[0, 3, 5]``."""
  try:
    if "," in text:
      return [int(x) for x in text.split(",") if x.strip()]
    n = int(text)
  except ValueError:
    raise ConfigError(
      f"--seeds expects a count (e.g. 8) or a list (e.g. 0,1,2), got {text!r}."
    ) from None
  if n < 1:
    raise ConfigError(f"--seeds must be >= 1, got {n}.")
  return n


def parse_grid(items: Sequence[str]) -> dict[str, list[float]]:
  """``["client_lr=0.01,0.1"]`` -> ``{"client_lr": [0.01, 0.1]}``."""
  for item in items:
    if not item.partition("=")[0].strip() or "=" not in item:
      raise ConfigError(
        f"--grid {item!r} is not NAME=V1,V2,... "
        "(e.g. --grid client_lr=0.01,0.03,0.1)."
      )
  grid: dict = {}
  for name, values in parse_overrides(items).items():
    try:
      grid[name] = [float(v) for v in values.split(",") if v.strip()]
    except ValueError:
      raise ConfigError(
        f"--grid {name}: expected comma-separated numbers, got {values!r}."
      ) from None
    if not grid[name]:
      raise ConfigError(f"--grid {name}= has no values.")
  return grid


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  parser, subs = build_parser()
  if argv and argv[0] in subs:
    _spec_help(subs[argv[0]], argv[1:])
  if argv and argv[0] == "launch":
    own, run_args = _split_launch_args(argv[1:])
    args = parser.parse_args(["launch", *own])
    args.run_args = run_args
  else:
    args = parser.parse_args(argv)
  try:
    if args.command in ("run", "sweep", "compare"):
      # Plots and the progress bar: refuse before any round, not after.
      require("matplotlib", "experiment")
      require("tqdm", "experiment")
    if args.command in ("run", "sweep"):
      args.log = _writer_spec(args.log)
      if args.log and not getattr(args, "process_id", None):
        # Only process 0 writes; the tools start while JAX is imported.
        from fedjax_lite.experiment import writers  # pylint: disable=g-import-not-at-top

        writers.prestart(args.log)
    if args.command == "launch":
      return _launch_processes(args)
    if args.command == "export":
      return export.export_command(args)
    if args.command == "run":
      _join_processes(args)
      return _run(args)
    if args.command == "sweep":
      return _sweep(args)
    return _compare(args)
  except (ConfigError, MissingExtraError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except OSError as e:
    if e.errno not in _DISK_FULL:
      raise
    print(_disk_full_message(e, args.command), file=sys.stderr)
    return 2
  finally:
    if "fedjax_lite.experiment.writers" in sys.modules:
      # A run that failed before making its writers: end the processes
      # started for them (after a run they are gone already).
      sys.modules["fedjax_lite.experiment.writers"].discard_unused()


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _disk_full_message(e: OSError, command: str) -> str:
  """One line for a full disk (or quota): which file, and how to go on.

  Checkpoints and records are written atomically (a temporary file renamed
  into place), so the last complete checkpoint is still there."""
  where = e.filename or "the run folder"
  msg = f"error: {e.strerror or 'no space left'} while writing {where}"
  folder = Path(e.filename).parent if e.filename else None
  record = "sweep.json" if command == "sweep" else "config.json"
  if folder is not None and (folder / record).is_file():
    msg += (
      f"; the last checkpoint in {folder} is intact. Free space, then resume "
      f"with: python -m fedjax_lite {command} --resume {folder}"
    )
  else:
    msg += "; free space and run the command again"
  return msg


_LAUNCH_OPTIONS = (
  "--processes",
  "--devices",
  "--port",
  "--timeout",
  "--log-dir",
)


def _split_launch_args(argv: Sequence[str]) -> tuple[list, list]:
  """The launcher's own options (anywhere on the line) and the rest, which
  goes to `run` in its order (``--`` is dropped)."""
  own, rest, i = [], [], 0
  while i < len(argv):
    token = argv[i]
    name = token.split("=", 1)[0]
    if name in _LAUNCH_OPTIONS:
      take = 1 if "=" in token else 2
      own += argv[i : i + take]
      i += take
    elif token in ("-h", "--help"):
      own.append(token)
      i += 1
    else:
      if token != "--":
        rest.append(token)
      i += 1
  return own, rest


def _writer_spec(items: Sequence[str]) -> list[str]:
  """``--log`` values -> writer names (jsonl left out: always on), their
  libraries imported now (a missing one: the install hint, exit 2)."""
  from fedjax_lite.experiment import writers  # pylint: disable=g-import-not-at-top

  try:
    names = [n for n in writers.parse_spec(list(items)) if n != "jsonl"]
  except ValueError as e:
    raise ConfigError(f"--log: {e}") from None
  writers.require_libraries(names)
  return names


def _run_args_log(run_args: Sequence[str]) -> list[str]:
  """The ``--log`` values among a launch's run arguments."""
  out = []
  for i, token in enumerate(run_args):
    if token == "--log" and i + 1 < len(run_args):
      out.append(run_args[i + 1])
    elif token.startswith("--log="):
      out.append(token.split("=", 1)[1])
  return out


def _launch_processes(args) -> int:
  from fedjax_lite.experiment.launch import launch  # pylint: disable=g-import-not-at-top

  # Check --log before starting any process (only process 0 writes).
  _writer_spec(_run_args_log(args.run_args))
  if not args.run_args:
    raise ConfigError(
      "`launch` needs the run's arguments, e.g. `launch --processes 2 "
      "experiments/fedavg_synthetic.py`."
    )
  if args.processes is None or args.processes < 1:
    raise ConfigError(f"--processes must be >= 1, got {args.processes}.")
  try:
    return launch(
      args.run_args,
      args.processes,
      args.devices,
      port=args.port,
      timeout_s=args.timeout,
      log_dir=args.log_dir,
    )
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _join_processes(args) -> None:
  """``run --coordinator ...``: joins the multi-process run before JAX
  starts."""
  given = [
    args.coordinator is not None,
    args.num_processes is not None,
    args.process_id is not None,
  ]
  if not any(given):
    if args.local_devices is not None:
      from fedjax_lite import runtime  # pylint: disable=g-import-not-at-top

      runtime.configure_cpu(args.local_devices, force=True)
    return
  if not all(given):
    raise ConfigError(
      "a multi-process run needs --coordinator, --num-processes and "
      "--process-id together."
    )
  from fedjax_lite import distributed  # pylint: disable=g-import-not-at-top

  try:
    distributed.initialize(
      args.coordinator,
      args.num_processes,
      args.process_id,
      local_devices=args.local_devices,
      timeout_s=args.timeout,
    )
  except (ValueError, RuntimeError) as e:
    raise ConfigError(str(e)) from None
  except TimeoutError as e:
    raise ConfigError(f"timed out: {e}") from None


def _launch(args, command: str, launch, extra=dict):
  """``launch`` (``run_file`` or ``sweep_file``) with the arguments that
  ``run`` and ``sweep`` share, plus ``extra()``'s."""
  if args.experiment is None and args.resume is None:
    folder = "SWEEP_DIR" if command == "sweep" else "RUN_DIR"
    raise ConfigError(
      f"`{command}` needs an experiment file "
      f"(experiments/<name>.py[:arg]) or --resume {folder}."
    )
  return launch(
    args.experiment,
    args.overrides,
    **extra(),
    out=args.out,
    resume=args.resume,
    progress=not args.no_progress,
    writers=args.log or None,
    **_checkpointing(args),
  )


def _run(args) -> int:
  from fedjax_lite.experiment.files import run_file  # pylint: disable=g-import-not-at-top

  if args.experiment is not None and args.resume is None:
    ef = load_experiment_file(args.experiment)
    if ef.script:
      return _run_script(args, ef)
  res = _launch(
    args,
    "run",
    run_file,
    lambda: {
      "placement": args.placement,
      "on_divergence": args.on_divergence,
    },
  )
  if res.interrupted:
    return _interrupted(res, "run")
  if res.diverged is not None:
    print(
      f"error: the run diverged at round {res.diverged_round} "
      f"({res.diverged}); status 'diverged', the last finite state (round "
      f"{res.diverged_round - 1}) is the checkpoint in {res.run_dir}. Lower "
      "the learning rates, or rerun with --on-divergence continue.",
      file=sys.stderr,
    )
    return DIVERGED_EXIT
  _print_final(res.run_dir, res.final)
  return 0


def _run_script(args, ef) -> int:
  """``run`` of a file that defines ``run(config, run_dir)`` (vertical FL,
  split learning, transfer learning): the engine's options do not apply."""
  import json  # pylint: disable=g-import-not-at-top

  from fedjax_lite.experiment.files import run_script_file  # pylint: disable=g-import-not-at-top

  given = [
    name
    for name, used in (
      ("--log", bool(args.log)),
      ("--placement", args.placement is not None),
      ("--checkpoint-every", bool(args.checkpoint_every)),
      ("--coordinator", args.coordinator is not None),
      ("--on-divergence", args.on_divergence != "stop"),
    )
    if used
  ]
  if given:
    raise ConfigError(
      f"{ef.path.name} defines run(config, run_dir) (not an engine "
      f"Experiment): {', '.join(given)} does not apply to it; use --set and "
      "--out."
    )
  run_dir, summary = run_script_file(ef, args.overrides, args.out)
  print(json.dumps(summary, indent=1, default=str))
  print(f"run folder: {run_dir}")
  return 0


DIVERGED_EXIT = 3  # a run stopped as diverged


def _interrupted(res, command: str) -> int:
  name = signal.Signals(res.signum).name if res.signum else "signal"
  print(
    f"{name}: stopped after round {res.rows[-1]['round'] if res.rows else 0}"
    f"; checkpoint in {res.run_dir}.\nResume with: python -m "
    f"fedjax_lite {command} --resume {res.run_dir}",
    file=sys.stderr,
  )
  return 128 + int(res.signum or 0)


def _print_final(run_dir, final: dict) -> None:
  keys = [
    k
    for k in (
      "round",
      "train_loss",
      "train_accuracy",
      "global_train_loss",
      "test_loss",
      "test_accuracy",
      "test_accuracy_p10",
    )
    if k in final
  ]
  print(
    "final: "
    + ", ".join(
      f"{k}={final[k]:.4f}"
      if isinstance(final[k], float)
      else f"{k}=non-finite"
      if final[k] is None
      else f"{k}={final[k]}"
      for k in keys
    )
  )
  print(f"run folder: {run_dir} (curves.png, metrics.jsonl, metrics.csv)")


def _sweep(args) -> int:
  from fedjax_lite.experiment.sweeps import sweep_file  # pylint: disable=g-import-not-at-top

  res = _launch(
    args,
    "sweep",
    sweep_file,
    lambda: {
      "seeds": parse_seeds(args.seeds),
      "grid": parse_grid(args.grid),
      "on_divergence": args.on_divergence,
    },
  )
  if res.interrupted:
    return _interrupted(res, "sweep")
  if res.diverged is not None:
    print(
      f"error: the sweep diverged at round {res.diverged_round} "
      f"({res.diverged}); the last finite state (round "
      f"{res.diverged_round - 1}) is the checkpoint in {res.run_dir}. Lower "
      "the learning rates, or rerun with --on-divergence continue.",
      file=sys.stderr,
    )
    return DIVERGED_EXIT
  print(res.table())
  print(f"sweep folder: {res.run_dir} (curves.png, metrics.jsonl, summary.md)")
  return 0


def _compare(args) -> int:
  from fedjax_lite.experiment.comparison import compare  # pylint: disable=g-import-not-at-top

  table = compare(
    args.runs,
    args.out,
    labels=args.labels,
    title=args.title,
    x=args.x,
    smooth=args.smooth or None,
    fmt=args.fmt,
  )
  print(table)
  print(f"wrote {args.out}/compare.{args.fmt} and {args.out}/compare.md")
  return 0
