"""Cost of crash-safe checkpointing: wall time with the default checkpoints
vs periodic checkpoints off, on the README's main command and on
Shakespeare-smoke.

Each measurement is a fresh process (``python -m fedjax_lite run ...``, from
the repository's root), the two modes interleaved (the first of them
alternating from repeat to repeat), so both see the same machine load:

* ``default``: checkpoints before the first round, at most every 60 s and
  more often while they cost under 1% of the run, at the end;
* ``off``: ``--checkpoint-every-seconds 0`` (only the first and the last).

Reports the median process wall time of each mode, their ratio, and from the
run folders' ``summary.json`` how many checkpoints the default wrote and the
share of the run they took. Run::

  python experiments/benchmarks/checkpoint.py --repeats 5 \
      --json experiments/results/checkpoint_cost.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (the benchmarks' shared helpers)

WORKLOADS = {
  "fedavg_synthetic (README main command)": "experiments/fedavg_synthetic.py",
  "shakespeare_fedavg:smoke": "experiments/shakespeare_fedavg.py:smoke",
}
MODES = {"default": [], "off": ["--checkpoint-every-seconds", "0"]}


def one_run(spec: str, extra: list[str], out: Path) -> dict:
  """One ``fedjax_lite run`` process; its summary's times and checkpoints."""
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "fedjax_lite",
      "run",
      spec,
      "--no-progress",
      "--out",
      str(out),
    ]
    + extra,
    capture_output=True,
    text=True,
    cwd=common.ROOT,
    check=False,
  )
  if proc.returncode != 0:
    raise RuntimeError(f"{spec} failed:\n{proc.stderr[-2000:]}")
  run_dir = max(out.iterdir(), key=lambda p: p.stat().st_mtime)
  summary = json.loads((run_dir / "summary.json").read_text())
  return {
    "run_s": summary["wall_time"],
    "checkpoints": summary["checkpoints"],
    "checkpoint_s": summary["checkpoint_seconds"],
  }


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--json", default=None)
  ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS))
  args = ap.parse_args(argv)
  results = common.start_record(__file__, argv)
  results.update(repeats=args.repeats, workloads={})
  print(f"machine: {results['machine']['cpu']}")
  for name in args.workloads:
    spec = WORKLOADS[name]
    runs = {m: [] for m in MODES}

    def run(mode, tmp, spec=spec, runs=runs):
      folder = Path(tmp) / f"{mode}{len(runs[mode])}"
      runs[mode].append(one_run(spec, MODES[mode], folder))

    with tempfile.TemporaryDirectory() as tmp:
      timing = common.time_calls(
        {m: functools.partial(run, m, tmp) for m in MODES},
        1,
        warmup=0,
        cycles=args.repeats,
        alternate=True,
      )
    for m, t in timing.items():  # the process's wall time
      for x, s in zip(runs[m], t["round_seconds"]):
        x["process_s"] = s
    med = {m: t["seconds_per_round"] for m, t in timing.items()}
    d = runs["default"]
    row = {
      "command": f"python -m fedjax_lite run {spec}",
      "median_process_s": med,
      "ratio_default_to_off": med["default"] / med["off"],
      "checkpoints_default": [x["checkpoints"] for x in d],
      "checkpoint_share_default": [x["checkpoint_s"] / x["run_s"] for x in d],
      "runs": runs,
    }
    results["workloads"][name] = row
    print(
      f"{name}: default {med['default']:.2f} s, off {med['off']:.2f} s, "
      f"ratio {row['ratio_default_to_off']:.3f}; checkpoints per run "
      f"{row['checkpoints_default']}, share of run time "
      f"{max(row['checkpoint_share_default']):.2%} at most"
    )
  common.write_record(results, args.json)


if __name__ == "__main__":
  main()
