"""Seconds per round with each aggregator, and the default path vs the release
before aggregators existed.

Workloads ``logreg1000`` and ``mlp100`` (WORKLOADS.md; data, models and local
work from experiments/benchmark.py). Two measurements, in one invocation:

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

  python experiments/aggregators_benchmark.py            # both, ~15 min
  python experiments/aggregators_benchmark.py --smoke    # seconds-long check
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark as bm  # noqa: E402  (data/model builders, CPU info, peak)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
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
  x, y = bm.make_data(w)
  ds = fl.FederatedDataset(
    features={"x": x.reshape(-1, w["features"]), "y": y.reshape(-1)},
    offsets=[i * w["examples"] for i in range(w["num_clients"])],
    counts=[w["examples"]] * w["num_clients"],
  )
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


def timed(engine, holder, data, rounds):
  import jax  # pylint: disable=g-import-not-at-top

  ts = []
  for _ in range(rounds):
    t = time.perf_counter()
    holder["s"], _ = engine.round(holder["s"], data)
    jax.block_until_ready(holder["s"])
    ts.append(time.perf_counter() - t)
  return ts


def worker_default(args):
  """FedAvg with the engine on sys.path (this checkout or the baseline)."""
  import fedjax_lite as fl  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  w = workload_of(args)
  engine, data, state = build(w)
  holder = {"s": state}
  timed(engine, holder, data, 1)  # compile + warm-up
  ts = timed(engine, holder, data, args.rounds)
  return {
    "seconds_per_round": float(np.median(ts)),
    "times": ts,
    "package": os.path.dirname(fl.__file__),
    "block_size": {str(k): v for k, v in engine.block_sizes.items()},
  }


def worker_aggregators(args):
  """Every aggregator of :func:`aggregator_specs`, timed round-robin."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  w = workload_of(args)
  specs = aggregator_specs(w["clients_per_round"])
  if args.only:
    specs = {k: v for k, v in specs.items() if k in args.only.split(";")}
  runs, compile_s = {}, {}
  for name, make in specs.items():
    t = time.perf_counter()
    engine, data, state = build(w, make())
    holder = {"s": state}
    timed(engine, holder, data, 1)
    compile_s[name] = time.perf_counter() - t
    runs[name] = (engine, data, holder)
  times = {name: [] for name in specs}
  for _ in range(args.cycles):
    for name, (engine, data, holder) in runs.items():
      times[name] += timed(engine, holder, data, args.rounds)
  return {
    name: {
      "seconds_per_round": float(np.median(ts)),
      "times": ts,
      "first_round_s": compile_s[name],
    }
    for name, ts in times.items()
  }


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
  # This checkout's package unless told otherwise (never an installed copy).
  pythonpath = pythonpath or ROOT
  env = dict(os.environ)
  env["PYTHONPATH"] = pythonpath + os.pathsep + HERE
  cmd = (
    [
      sys.executable,
      os.path.abspath(__file__),
      "--worker",
      mode,
      "--workload",
      workload,
      "--rounds",
      str(args.rounds),
      "--cycles",
      str(args.cycles),
    ]
    + (["--smoke"] if args.smoke else [])
    + (["--only", args.only] if args.only else [])
  )
  proc = subprocess.run(
    cmd, capture_output=True, text=True, env=env, check=False, cwd=pythonpath
  )
  if proc.returncode != 0:
    raise RuntimeError(f"worker {mode}/{workload} failed:\n{proc.stderr}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def extract_baseline(commit: str, into: str, repo: str = ROOT) -> str:
  archive = subprocess.run(
    ["git", "archive", commit, "fedjax_lite"],
    cwd=repo,
    capture_output=True,
    check=True,
  ).stdout
  subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
  return into


def median(xs):
  xs = sorted(xs)
  n = len(xs)
  return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


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
  cpu = result.get("cpu", {})
  peak = result.get("peak", {})
  lines = [
    "# Aggregators: seconds per round",
    "",
    f"Command: `{result['command']}`",
    "",
    f"Machine: {cpu.get('model', '?')}, {cpu.get('cores', '?')} cores, "
    f"AVX-512: {'yes' if cpu.get('avx512f') else 'no'}; float32 matmul "
    f"peak {peak.get('peak_gflops', float('nan')):.0f} GFLOP/s "
    f"({peak.get('matmul_n', '?')}^2, benchmark.py's helper). Date: "
    f"{result['date']}. Load average at start/end: "
    f"{', '.join(f'{x:.1f}' for x in result['load_average_start'])} / "
    f"{', '.join(f'{x:.1f}' for x in result['load_average_end'])} (the "
    "machine is shared: medians of interleaved repeats).",
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
    "--out", default=os.path.join(HERE, "results", "aggregators.json")
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
    with open(args.render) as fh:
      text = render_markdown(json.load(fh))
    with open(md_path, "w") as fh:
      fh.write(text)
    print(text)
    return
  if args.smoke:
    args.repeats, args.rounds, args.cycles = 1, 2, 1
  parts = args.parts.split(",")
  result = {
    "command": "python experiments/aggregators_benchmark.py "
    + " ".join(argv if argv is not None else sys.argv[1:]),
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec="minutes"
    ),
    "cpu": bm.cpu_info(),
    "load_average_start": os.getloadavg(),
    "baseline_commit": args.baseline,
    "workloads": {},
  }
  try:
    result["peak"] = bm.run_worker("peak", "mlp100", 1)
  except RuntimeError as e:  # pragma: no cover
    result["peak"] = {"error": str(e)}
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
          "old_seconds_per_round": median(
            [r["seconds_per_round"] for r in old]
          ),
          "new_seconds_per_round": median(
            [r["seconds_per_round"] for r in new]
          ),
          "ratio_new_over_old": median(
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
        base = r["fedavg (weighted_mean)"]["seconds_per_round"]
        for agg_name, v in r.items():
          v["ratio_to_fedavg"] = v["seconds_per_round"] / base
          print(
            f"{name} {agg_name}: {v['seconds_per_round']:.4f} s/round "
            f"({v['ratio_to_fedavg']:.2f}x)",
            flush=True,
          )
        res["aggregators"] = r
  result["load_average_end"] = os.getloadavg()
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as fh:
    json.dump(result, fh, indent=1)
  with open(md_path, "w") as fh:
    fh.write(render_markdown(result))
  print(json.dumps({k: v for k, v in result.items() if k != "workloads"}))


if __name__ == "__main__":
  main()
