"""Seconds per round with each aggregator, and the default path vs the release
before aggregators existed.

Workloads ``logreg1000`` and ``mlp100`` (WORKLOADS.md; data, models and local
work from experiments/benchmarks/benchmark.py). Two measurements, in one invocation:

1. Default path vs previous release: the FedAvg round of this checkout
   (``algorithm.aggregator=None`` -> ``weighted_mean``) and of the engine at
   git commit ``--baseline`` (extracted with ``git archive`` into a temporary
   folder and imported from there), each in its own process, alternated
   ``--repeats`` times; reported: the median over repeats of each process's
   median seconds/round, and the ratio new/old per repeat (median).
2. Robust aggregators next to FedAvg: one process per workload compiles a
   round per aggregator, then times them round-robin (``--cycles`` cycles of
   ``--rounds`` rounds each, interleaved so load changes hit all alike);
   reported: the median seconds/round and the ratio to FedAvg of the same
   process.

Writes experiments/results/aggregators.json and .md. Run::

  python experiments/benchmarks/aggregators.py            # both, ~15 min
  python experiments/benchmarks/aggregators.py --smoke    # seconds-long check
  python experiments/benchmarks/aggregators.py --render experiments/results/aggregators.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import benchmark as bm  # noqa: E402  (data and model builders)
import common  # noqa: E402  (the benchmarks' shared helpers)

ROOT = common.ROOT
BASELINE = "205ea6d"  # the last commit before fedjax_lite.aggregators


def aggregator_specs(clients_per_round: int) -> dict:
  """name -> a no-argument factory (built inside the worker)."""
  from fedjax_lite import aggregators as agg  # pylint: disable=g-import-not-at-top

  f = max(1, min(clients_per_round // 10, (clients_per_round - 3) // 2))
  return {
    "fedavg (weighted_mean)": lambda: None,
    "unweighted_mean": agg.unweighted_mean,
    "clipped(weighted_mean)": lambda: agg.clipped(agg.weighted_mean(), 1.0),
    "clipped adaptive": lambda: agg.clipped(
      agg.weighted_mean(), 1.0, adaptive=True
    ),
    "coordinate_median": agg.coordinate_median,
    "trimmed_mean(0.1)": lambda: agg.trimmed_mean(0.1),
    f"krum({f})": lambda: agg.krum(f),
    f"multi_krum({f}, 5)": lambda: agg.krum(f, multi=5),
    "geometric_median(iters=10)": lambda: agg.geometric_median(
      eps=0.0, iters=10
    ),
    "centered_clipping(1.0)": lambda: agg.centered_clipping(1.0),
  }


def build(workload: dict, aggregator=None):
  """(engine, data, state) for a workload (this or the baseline package)."""
  import fedjax_lite as fl  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  w = workload
  ds = bm.make_dataset(w)
  model = bm.model_for(w)
  alg = fl.fed_avg(model, optax.sgd(bm.LR), optax.sgd(1.0))
  if aggregator is not None:
    alg = alg._replace(aggregator=aggregator)
  engine = fl.Engine(
    alg,
    fl.RoundConfig(
      w["clients_per_round"], fl.LocalWork(batch_size=bm.BATCH, num_epochs=1)
    ),
  )
  data = engine.put_data(ds)
  state = engine.init(model.init(jax.random.PRNGKey(0)), seed=0)
  return engine, data, state


def round_fn(engine, data, state):
  """One engine round per call (blocked until done), state carried; any
  object with ``round(state, data) -> (state, metrics)`` (e.g. the
  time-aware rounds of ``experiments/benchmarks/time_aware.py``)."""
  import jax  # pylint: disable=g-import-not-at-top

  holder = {"s": state}

  def one():
    holder["s"], _ = engine.round(holder["s"], data)
    jax.block_until_ready(holder["s"])

  return one


def worker_default(args):
  """FedAvg with the engine on sys.path (this checkout or the baseline)."""
  import fedjax_lite as fl  # pylint: disable=g-import-not-at-top

  engine, data, state = build(workload_of(args))
  out = common.time_calls(round_fn(engine, data, state), args.rounds)
  out["package"] = os.path.dirname(fl.__file__)
  out["block_size"] = {str(k): v for k, v in engine.block_sizes.items()}
  return out


def worker_aggregators(args):
  """Every aggregator of :func:`aggregator_specs`, timed round-robin."""
  w = workload_of(args)
  specs = aggregator_specs(w["clients_per_round"])
  if args.only:
    specs = {k: v for k, v in specs.items() if k in args.only.split(";")}
  rounds, build_s = {}, {}
  for name, make in specs.items():
    t = time.perf_counter()
    rounds[name] = round_fn(*build(w, make()))
    build_s[name] = time.perf_counter() - t
  out = common.time_calls(rounds, args.rounds, cycles=args.cycles)
  for name, r in out.items():  # building the engine and its first round
    r["first_round_s"] = build_s[name] + r["warmup_seconds"]
  return out


def workload_of(args) -> dict:
  w = dict(bm.WORKLOADS[args.workload])
  if args.smoke:
    w.update(
      num_clients=min(w["num_clients"], 40),
      clients_per_round=min(w["clients_per_round"], 20),
    )
  return w


WORKERS = {"default": worker_default, "aggregators": worker_aggregators}


def run_worker(mode, workload, args, pythonpath=None):
  """A worker of this file in a process of its own, importing fedjax_lite
  from ``pythonpath``: this checkout's package unless told otherwise (never
  an installed copy)."""
  pythonpath = pythonpath or ROOT
  argv = [os.path.abspath(__file__), "--worker", mode, "--workload", workload]
  argv += ["--rounds", str(args.rounds), "--cycles", str(args.cycles)]
  argv += ["--smoke"] if args.smoke else []
  argv += ["--only", args.only] if args.only else []
  env = {"PYTHONPATH": pythonpath + os.pathsep + HERE}
  return common.run_worker(argv, env=env, cwd=pythonpath)


def extract_baseline(commit: str, into: str, repo: str = ROOT) -> str:
  archive = subprocess.run(
    ["git", "archive", commit, "fedjax_lite"],
    cwd=repo,
    capture_output=True,
    check=True,
  ).stdout
  subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
  return into


REASONS = {
  "unweighted_mean": "streaming, same work as FedAvg",
  "clipped(weighted_mean)": "streaming; one extra pass per client for its "
  "update norm and the scaling",
  "clipped adaptive": "as clipped, plus two counters",
  "coordinate_median": "materialized: every update scattered into a "
  "[clients_per_round, d] buffer per device, the "
  "devices' buffers summed once, then a sort over "
  "clients for each of the d coordinates",
  "trimmed_mean(0.1)": "materialized; the same sort as the median",
  "geometric_median(iters=10)": "materialized; 10 Weiszfeld steps, each "
  "two passes over the [m, d] buffer",
  "centered_clipping(1.0)": "materialized; one clipping step (two passes "
  "over the buffer)",
}


def render_markdown(result: dict) -> str:
  """The results file (experiments/results/aggregators.md) from the JSON."""
  lines = [
    "# Aggregators: seconds per round",
    "",
    common.record_markdown(result)
    + " The machine is shared: medians of interleaved repeats.",
    "",
    f"Baseline: the engine at commit `{result['baseline_commit']}` (before "
    "pluggable aggregators), extracted with `git archive` and run in its "
    "own process, alternated with this checkout's.",
    "",
  ]
  for name, res in result["workloads"].items():
    lines.append(f"## {name}")
    lines.append("")
    if "default" in res:
      d = res["default"]
      lines += [
        "| FedAvg round | previous release | this checkout | ratio new/old "
        "(median of per-repeat ratios) |",
        "|---|---|---|---|",
        f"| seconds/round (median of {len(d['old'])} processes) | "
        f"{d['old_seconds_per_round']:.4f} | "
        f"{d['new_seconds_per_round']:.4f} | "
        f"{d['ratio_new_over_old']:.3f} |",
        "",
        "Per repeat (old, new): "
        + ", ".join(
          f"({o['seconds_per_round']:.4f}, {n['seconds_per_round']:.4f})"
          for o, n in zip(d["old"], d["new"])
        ),
        "",
      ]
    if "aggregators" in res:
      lines += [
        "| aggregator | seconds/round | x FedAvg | why |",
        "|---|---|---|---|",
      ]
      for agg_name, v in res["aggregators"].items():
        why = REASONS.get(agg_name, "")
        if agg_name.startswith("krum") or agg_name.startswith("multi_krum"):
          why = (
            "materialized; an [m, m] Gram matrix of the updates "
            "(m x m x d flops) and a sort of each row"
          )
        lines.append(
          f"| {agg_name} | {v['seconds_per_round']:.4f} | "
          f"{v['ratio_to_fedavg']:.2f} | {why} |"
        )
      lines.append("")
  lines += [
    "Notes: the streaming aggregators cost what FedAvg costs (the default "
    "path is the previous release's reduction; tests/test_engine_plan.py "
    "checks its params against a float64 reference). The sort-based rules (median, trimmed "
    "mean) are dominated by XLA's CPU sort: d independent sorts of m "
    "values (mlp100: ~210k sorts of 100, logreg1000: 610 sorts of 1000), "
    "computed after the cross-device merge, i.e. the same work on every "
    "device; Krum adds the [m, m] distance matrix and a sort of each row. "
    "Timings on a shared 2-core machine whose other users' jobs change "
    "its load within a run: compare ratios within a run.",
    "",
  ]
  return "\n".join(lines) + "\n"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workloads", default="logreg1000,mlp100")
  ap.add_argument("--parts", default="default,aggregators")
  ap.add_argument("--baseline", default=BASELINE)
  ap.add_argument(
    "--repo", default=ROOT, help="git repository holding --baseline"
  )
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--cycles", type=int, default=3)
  ap.add_argument("--only", default="", help="';'-separated aggregator names")
  ap.add_argument("--smoke", action="store_true")
  ap.add_argument(
    "--out", default=os.path.join(common.RESULTS, "aggregators.json")
  )
  ap.add_argument(
    "--render",
    default=None,
    help="write the markdown of this results JSON and exit",
  )
  ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--workload", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.worker:
    print(json.dumps(WORKERS[args.worker](args)))
    return
  md_path = os.path.splitext(args.out)[0] + ".md"
  if args.render:
    text = render_markdown(common.read_record(args.render))
    with open(md_path, "w") as fh:
      fh.write(text)
    print(text)
    return
  if args.smoke:
    args.repeats, args.rounds, args.cycles = 1, 2, 1
  parts = args.parts.split(",")
  result = common.start_record(__file__, argv)
  result.update(baseline_commit=args.baseline, workloads={})
  with tempfile.TemporaryDirectory() as tmp:
    old_path = (
      extract_baseline(args.baseline, tmp, args.repo)
      if "default" in parts
      else None
    )
    for name in args.workloads.split(","):
      res = result["workloads"].setdefault(name, {})
      if "default" in parts:
        old, new = [], []
        for rep in range(args.repeats):
          # Alternate which goes first so a load trend does not favour one.
          order = [("old", old_path), ("new", None)]
          if rep % 2:
            order.reverse()
          for label, path in order:
            r = run_worker("default", name, args, pythonpath=path)
            (old if label == "old" else new).append(r)
            print(
              f"{name} {label} rep {rep}: {r['seconds_per_round']:.4f} s/round",
              flush=True,
            )
        res["default"] = {
          "old_seconds_per_round": statistics.median(
            [r["seconds_per_round"] for r in old]
          ),
          "new_seconds_per_round": statistics.median(
            [r["seconds_per_round"] for r in new]
          ),
          "ratio_new_over_old": statistics.median(
            [
              n["seconds_per_round"] / o["seconds_per_round"]
              for n, o in zip(new, old)
            ]
          ),
          "old": old,
          "new": new,
        }
      if "aggregators" in parts:
        r = run_worker("aggregators", name, args)
        # The process's load average: each aggregator holds its rounds'.
        del r["load_before"], r["load_after"]
        base = r["fedavg (weighted_mean)"]["seconds_per_round"]
        for agg_name, v in r.items():
          v["ratio_to_fedavg"] = v["seconds_per_round"] / base
          print(
            f"{name} {agg_name}: {v['seconds_per_round']:.4f} s/round "
            f"({v['ratio_to_fedavg']:.2f}x)",
            flush=True,
          )
        res["aggregators"] = r
  common.write_record(result, args.out, render_markdown, md_path)
  print(json.dumps({k: v for k, v in result.items() if k != "workloads"}))


if __name__ == "__main__":
  main()
