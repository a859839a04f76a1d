"""Cost of crash-safe checkpointing: wall time with the default checkpoints
vs periodic checkpoints off, on the README's main command and on
Shakespeare-smoke.

Each measurement is a fresh process (``python -m fedjax_lite run ...``), the
two modes interleaved, so both see the same machine load:

* ``default``: checkpoints before the first round, at most every 60 s and
  more often while they cost under 1% of the run, at the end;
* ``off``: ``--checkpoint-every-seconds 0`` (only the first and the last).

Reports the median process wall time of each mode, their ratio, and from the
run folders' ``summary.json`` how many checkpoints the default wrote and the
share of the run they took. Run::

  python experiments/checkpoint_benchmark.py --repeats 5 \
      --json experiments/results/checkpoint_cost.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WORKLOADS = {
  "fedavg_synthetic (README main command)": "experiments/fedavg_synthetic.py",
  "shakespeare_fedavg:smoke": "experiments/shakespeare_fedavg.py:smoke",
}
MODES = {"default": [], "off": ["--checkpoint-every-seconds", "0"]}


def cpu_model() -> str:
  try:
    out = subprocess.run(
      ["lscpu"], capture_output=True, text=True, check=False
    ).stdout
    model = next(
      (
        l.split(":", 1)[1].strip()
        for l in out.splitlines()
        if l.startswith("Model name")
      ),
      platform.processor(),
    )
    flags = next((l for l in out.splitlines() if l.startswith("Flags")), "")
    return f"{model} ({'AVX-512' if 'avx512f' in flags else 'AVX2'})"
  except OSError:
    return platform.processor()


def one_run(spec: str, extra: list[str], out: Path) -> dict:
  tick = time.perf_counter()
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
    check=False,
  )
  wall = time.perf_counter() - tick
  if proc.returncode != 0:
    raise RuntimeError(f"{spec} failed:\n{proc.stderr[-2000:]}")
  run_dir = max(out.iterdir(), key=lambda p: p.stat().st_mtime)
  summary = json.loads((run_dir / "summary.json").read_text())
  return {
    "process_s": wall,
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
  results = {
    "cpu": cpu_model(),
    "date": time.strftime("%Y-%m-%d"),
    "repeats": args.repeats,
    "workloads": {},
  }
  print(f"machine: {results['cpu']}")
  for name in args.workloads:
    spec = WORKLOADS[name]
    runs = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as tmp:
      for r in range(args.repeats):
        for mode, extra in (
          MODES.items() if r % 2 == 0 else reversed(list(MODES.items()))
        ):
          runs[mode].append(one_run(spec, extra, Path(tmp) / f"{mode}{r}"))
    med = {
      m: float(np.median([x["process_s"] for x in v])) for m, v in runs.items()
    }
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
  if args.json:
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
  main()
