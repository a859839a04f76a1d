"""Cost of metric writers and callbacks: a run's wall time with each
``--log`` writer and with callbacks, against the run that writes only
metrics.jsonl, on the README's main command (``experiments/fedavg_synthetic.py``).

Variants, each a ``fl.experiment.train`` of the same experiment into a fresh
run folder in this process (the rounds compile once, in the warm-up), timed
interleaved round-robin (``common.time_calls``, alternating order) so that
the machine's load hits all alike:

* ``jsonl``: metrics.jsonl/csv only (the default);
* ``tensorboard``, ``wandb`` (offline: ``WANDB_MODE=offline`` unless set),
  ``mlflow`` (its SQLite store in the run folder), ``all`` three: each
  includes opening the tool's run (W&B starts its service once per process,
  in the warm-up; MLflow creates its tables in every new folder);
* ``callback_params_every_1``: a callback that reads the global params
  after every round (a chunk of rounds ends after each round);
* ``callback_params_every_0``: a callback that reads only the rows (the
  chunks as without callbacks).

Reports per variant the median seconds of a whole run, its ratio to
``jsonl``, and the rows' median ``rounds_per_s``.

``--processes``: the README's main command itself, ``python -m fedjax_lite
run experiments/fedavg_synthetic.py --no-progress [--log X]``, each run a
fresh process (imports, compilation, the tool's start-up and its files
included), the writer variants interleaved: the wall time a user sees.
It also records each process's CPU seconds (user + system, its writer
processes included: ``resource.getrusage(RUSAGE_CHILDREN)``), which a
loaded machine disturbs less than the wall time, and the 1-minute load
average before each.

Run::

  python experiments/benchmarks/writers.py --repeats 3 \\
      --json experiments/results/writers.json
  python experiments/benchmarks/writers.py --processes --repeats 4 \\
      --json experiments/results/writers_processes.json
  python experiments/benchmarks/writers.py --rounds 5 --repeats 1  # check
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (the benchmarks' shared helpers)

SPEC = "experiments/fedavg_synthetic.py"
WRITERS = {
  "jsonl": None,
  "tensorboard": "tensorboard",
  "wandb": "wandb",
  "mlflow": "mlflow",
  "all": "tensorboard,wandb,mlflow",
  "all_nice0": "tensorboard,wandb,mlflow",
}
# Variants that differ by the environment only (``--processes``):
# ``all_nice0`` keeps the writer processes at the training process's
# priority (FEDJAX_LITE_WRITER_NICE=0; default: nice 19).
PROCESS_ENV = {"all_nice0": {"FEDJAX_LITE_WRITER_NICE": "0"}}


def build(num_rounds: int):
  """The README's main experiment with ``num_rounds`` rounds."""
  import fedjax_lite.experiment as fe  # pylint: disable=g-import-not-at-top

  ef = fe.load_experiment_file(os.path.join(common.ROOT, SPEC))
  cfg = dataclasses.replace(ef.get_config(), num_rounds=num_rounds)
  return ef.build(cfg)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--rounds", type=int, default=200)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--json", default=None)
  ap.add_argument(
    "--variants",
    nargs="+",
    default=[
      *WRITERS,
      "callback_params_every_1",
      "callback_params_every_0",
    ],
  )
  ap.add_argument(
    "--processes",
    action="store_true",
    help="time the README command in fresh processes (writers only)",
  )
  args = ap.parse_args(argv)
  if args.processes:
    return processes(args, argv)
  if args.rounds < 1 or args.repeats < 1:
    ap.error(
      f"--rounds and --repeats must be >= 1, got {args.rounds}, {args.repeats}."
    )
  import fedjax_lite.experiment as fe  # pylint: disable=g-import-not-at-top
  from fedjax_lite.experiment.loop import Callback  # pylint: disable=g-import-not-at-top

  results = common.start_record(__file__, argv, peak="here")
  results.update(rounds=args.rounds, repeats=args.repeats, variants={})
  print(f"machine: {results['machine']['cpu']}")
  exp = build(args.rounds)
  # In this process the writers' environment is this process's.
  args.variants = [v for v in args.variants if v not in PROCESS_ENV]
  rates: dict = {name: [] for name in args.variants}

  with tempfile.TemporaryDirectory() as tmp:
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_DIR", tmp)

    def run(name: str) -> None:
      kw = {}
      if name.startswith("callback_params_every_"):
        every = int(name.rsplit("_", 1)[1])
        if every:
          fn = lambda t, row, params: params()  # noqa: E731
        else:
          fn = lambda t, row, params: None  # noqa: E731
        kw["callbacks"] = [Callback(fn, every)]
      elif WRITERS[name] is not None:
        kw["writers"] = WRITERS[name]
      folder = Path(tmp) / f"{name}-{len(rates[name])}"
      res = fe.train(exp, folder, progress=False, **kw)
      rates[name].append(
        statistics.median(r["rounds_per_s"] for r in res.rows[1:] or res.rows)
      )

    calls = {name: (lambda n=name: run(n)) for name in args.variants}
    timing = common.time_calls(
      calls, 1, warmup=1, cycles=args.repeats, alternate=True
    )
  base = timing.get("jsonl", {}).get("seconds_per_round")
  for name, t in timing.items():
    row = {
      "median_run_s": t["seconds_per_round"],
      "run_seconds": t["round_seconds"],
      "warmup_s": t["warmup_seconds"],
      "ratio_to_jsonl": t["seconds_per_round"] / base if base else None,
      "median_rounds_per_s": statistics.median(rates[name][1:] or rates[name]),
    }
    results["variants"][name] = row
    ratio = (
      "" if row["ratio_to_jsonl"] is None else f", x{row['ratio_to_jsonl']:.3f}"
    )
    print(
      f"{name}: {row['median_run_s']:.2f} s per run of {args.rounds} rounds"
      f"{ratio}, {row['median_rounds_per_s']:.0f} rounds/s"
    )
  common.write_record(results, args.json)


def processes(args, argv) -> None:
  """``--processes``: the README command per variant, fresh processes."""
  import resource  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys as _sys  # pylint: disable=g-import-not-at-top

  variants = [v for v in args.variants if v in WRITERS]
  results = common.start_record(__file__, argv, peak="worker")
  results.update(
    mode="processes", rounds=args.rounds, repeats=args.repeats, variants={}
  )
  print(f"machine: {results['machine']['cpu']}")
  with tempfile.TemporaryDirectory() as tmp:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    count = {v: 0 for v in variants}
    cpu = {v: [] for v in variants}  # every call's; the first: the warm-up
    loads = {v: [] for v in variants}

    def run(name: str) -> None:
      count[name] += 1
      cmd = [
        _sys.executable,
        "-m",
        "fedjax_lite",
        "run",
        SPEC,
        "--no-progress",
        "--out",
        os.path.join(tmp, f"{name}-{count[name]}"),
        "--set",
        f"num_rounds={args.rounds}",
      ]
      if WRITERS[name]:
        cmd += ["--log", WRITERS[name]]
      loads[name].append(os.getloadavg()[0])
      before = resource.getrusage(resource.RUSAGE_CHILDREN)
      subprocess.run(
        cmd,
        cwd=common.ROOT,
        env={**env, **PROCESS_ENV.get(name, {})},
        check=True,
        capture_output=True,
      )
      after = resource.getrusage(resource.RUSAGE_CHILDREN)
      cpu[name].append(
        after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
      )

    calls = {name: (lambda n=name: run(n)) for name in variants}
    timing = common.time_calls(
      calls, 1, warmup=1, cycles=args.repeats, alternate=True
    )
  base = timing["jsonl"]["seconds_per_round"] if "jsonl" in timing else None
  for name, t in timing.items():
    row = {
      "median_process_s": t["seconds_per_round"],
      "process_seconds": t["round_seconds"],
      "min_process_s": min(t["round_seconds"]),
      "ratio_to_jsonl": t["seconds_per_round"] / base if base else None,
      "load_before_after": [t.get("load_before"), t.get("load_after")],
      "cpu_seconds": cpu[name][1:],
      "median_cpu_s": statistics.median(cpu[name][1:] or cpu[name]),
      "load_at_start": loads[name][1:],
    }
    results["variants"][name] = row
    ratio = (
      "" if row["ratio_to_jsonl"] is None else f", x{row['ratio_to_jsonl']:.3f}"
    )
    print(
      f"{name}: {row['median_process_s']:.2f} s per process "
      f"(min {row['min_process_s']:.2f}){ratio}, "
      f"{row['median_cpu_s']:.2f} CPU s"
    )
  common.write_record(results, args.json)


if __name__ == "__main__":
  main()
