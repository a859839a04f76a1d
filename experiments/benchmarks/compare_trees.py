"""Engine rounds of two source trees of fedjax_lite, interleaved in one run.

Times ``experiments/benchmarks/benchmark.py``'s engine worker (the package's
default CPU settings; ``experiments/benchmark.py`` in trees older than this
folder's scripts) on the dense workloads (``mlp100``, ``logreg1000``; see
BENCHMARKS.md) for a "before" tree (e.g. a ``git worktree`` of an older
commit) and an "after" tree, alternating processes ``--repeats`` times, and
reports the ratio of the medians of all timed rounds, with the matmul peak and
the load average of the same run.

Run::

  git worktree add /tmp/before <commit>
  python experiments/benchmarks/compare_trees.py --before /tmp/before \\
    --after . --json experiments/results/dense_regression.json
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (the benchmarks' shared helpers)


def engine_round(tree: str, workload: str, rounds: int) -> dict:
  tree = os.path.abspath(tree)
  script = os.path.join(tree, "experiments", "benchmarks", "benchmark.py")
  if not os.path.exists(script):  # a tree from before experiments/benchmarks/
    script = os.path.join(tree, "experiments", "benchmark.py")
  argv = [script, "--worker", "engine", "--workload", workload]
  out = common.run_worker(
    argv + ["--rounds", str(rounds)], env={"PYTHONPATH": tree}
  )
  if "times" in out:  # an older tree's worker calls its timed rounds so
    out["round_seconds"] = out.pop("times")
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--before", required=True, help="source tree (root)")
  ap.add_argument("--after", default=".", help="source tree (root)")
  ap.add_argument("--workloads", default="mlp100,logreg1000")
  ap.add_argument("--rounds", type=int, default=20, help="timed rounds")
  ap.add_argument("--repeats", type=int, default=4, help="processes each")
  ap.add_argument("--json", default=None)
  args = ap.parse_args(argv)
  results = common.start_record(__file__, argv)
  results["before"] = os.path.abspath(args.before)
  results["after"] = os.path.abspath(args.after)
  print(
    f"# CPU {results['machine']['cpu']}; matmul peak "
    f"{results['peak']['peak_gflops']:.1f} GFLOP/s",
    flush=True,
  )
  for name in args.workloads.split(","):
    runs = {"before": [], "after": []}
    for _ in range(args.repeats):
      for side in ("before", "after"):
        tree = getattr(args, side)
        runs[side].append(engine_round(tree, name, args.rounds))
    res = {side: common.summarize(rs) for side, rs in runs.items()}
    res["ratio_after_over_before"] = (
      res["after"]["seconds_per_round"] / res["before"]["seconds_per_round"]
    )
    for side in ("before", "after"):
      res[side]["runs"] = runs[side]
    print(
      f"{name:11s} before {res['before']['seconds_per_round'] * 1e3:8.2f} ms"
      f"  after {res['after']['seconds_per_round'] * 1e3:8.2f} ms  "
      f"after/before {res['ratio_after_over_before']:.3f}  max load "
      f"{max(res['before']['max_load'], res['after']['max_load']):.2f}",
      flush=True,
    )
    results[name] = res
  common.write_record(results, args.json)


if __name__ == "__main__":
  main()
