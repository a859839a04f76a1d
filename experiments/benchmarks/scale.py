"""Million-client populations: seconds per round against clients per round and
against population size, with client-sharded data.

  python experiments/benchmarks/scale.py --out experiments/results/scale
  python experiments/benchmarks/scale.py --smoke --out /tmp/scale   # seconds

Workloads (FedAvg, SGD lr 0.05, batch 10, one local epoch, server SGD lr 1):

* ``logreg``: multinomial logistic regression 60 -> 10 on Gaussian inputs with
  random labels (the logreg1000 workload of ../shared/WORKLOADS.md), every
  client holding ``--examples`` examples (default 20: two local steps);
* ``fedprox_synthetic``: FedProx Synthetic(1, 1) with a fixed client size of
  10 examples (one local step), the same model.

Every population is uploaded with ``placement="sharded"`` (each of the CPU
devices holds ~1/nd of the clients). At ``--compare-population`` clients the
same rounds also run on replicated data: the resident data per device and
the final parameters of both placements are recorded. Rounds are timed one
``engine.round`` call at a time (the metrics fetched each round, as a run
does), median of ``--rounds`` after a compile-and-warm-up round.
"""

from __future__ import annotations

import argparse
import gc
import os
import pathlib
import sys
import time

import fedjax_lite as fl  # configures one CPU device per core
import jax
import numpy as np
import optax

from fedjax_lite import data as fd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark as _bench  # noqa: E402  (its resident-memory readers)
import common  # noqa: E402  (the benchmarks' shared helpers)

FEATURES, CLASSES = 60, 10


def logreg_population(num_clients: int, examples: int) -> fl.FederatedDataset:
  """``num_clients`` clients of ``examples`` Gaussian rows, random labels."""
  rng = np.random.default_rng(0)
  n = num_clients * examples
  x = np.empty((n, FEATURES), np.float32)
  step = 1 << 22
  for lo in range(0, n, step):  # chunks: no float64 temporary of the whole
    hi = min(n, lo + step)
    x[lo:hi] = rng.standard_normal((hi - lo, FEATURES), dtype=np.float32)
  y = rng.integers(0, CLASSES, n).astype(np.int32)
  counts = np.full(num_clients, examples, np.int64)
  return fl.FederatedDataset({"x": x, "y": y}, counts.cumsum() - counts, counts)


def first_clients(ds: fl.FederatedDataset, k: int) -> fl.FederatedDataset:
  """The first ``k`` clients (views of the packed arrays, no copy)."""
  rows = int(ds.offsets[k - 1] + ds.counts[k - 1])
  return fl.FederatedDataset(
    {n: v[:rows] for n, v in ds.features.items()},
    ds.offsets[:k],
    ds.counts[:k],
  )


_UPLOADED: dict = {}


def upload(engine, ds, placement):
  """``ds`` on the devices, uploaded once per (population, placement): the
  layout (one size bucket) does not depend on clients per round."""
  key = (ds.num_clients, int(ds.counts[0]), placement)
  if key not in _UPLOADED:
    _UPLOADED.clear()
    gc.collect()
    t0 = time.perf_counter()
    data = engine.put_data(ds, buckets=1, placement=placement)
    jax.block_until_ready(data)
    _UPLOADED[key] = (data, time.perf_counter() - t0)
  return _UPLOADED[key]


def timed_rounds(engine, data, state, rounds):
  """A first round, then ``rounds`` timed ones (:func:`common.time_calls`),
  each fetching its metrics as a run does; (timing, state, metrics)."""
  holder = {"state": state}

  def one_round():
    holder["state"], holder["metrics"] = engine.round(holder["state"], data)
    float(holder["metrics"]["loss"])

  timing = common.time_calls(one_round, rounds)
  return timing, holder["state"], holder["metrics"]


def measure(ds, clients_per_round, rounds, placement="sharded"):
  model = fl.models.logistic_regression(FEATURES, CLASSES)
  engine = fl.Engine(
    fl.fed_avg(model, optax.sgd(0.05), optax.sgd(1.0)),
    fl.RoundConfig(clients_per_round, fl.LocalWork(batch_size=10)),
  )
  data, upload_s = upload(engine, ds, placement)
  state = engine.init(model.init(jax.random.PRNGKey(0)), seed=0)
  timing, state, m = timed_rounds(engine, data, state, rounds)
  res = fd.resident_bytes(data)
  out = {
    "population": ds.num_clients,
    "examples_per_client": int(ds.counts[0]),
    "clients_per_round": clients_per_round,
    "placement": placement,
    "s_per_round": timing["seconds_per_round"],
    "rounds_per_s": 1.0 / timing["seconds_per_round"],
    "times": timing["round_seconds"],
    "first_round_s": timing["warmup_seconds"],
    "upload_s": upload_s,
    "data_bytes_per_device": {
      str(k): int(v) for k, v in sorted(res["features_per_device"].items())
    },
    "resident_bytes_per_device": {
      str(k): int(v) for k, v in sorted(res["per_device"].items())
    },
    "rss_gib": _bench.current_rss_mb() / 1024,
    "final_loss": float(m["loss"]),
  }
  params = jax.tree.map(np.asarray, state.server.params)
  del data, state, engine
  gc.collect()
  return out, params


def plot(results, path):
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for key, ax, xlabel in (
    ("by_clients", axes[0], "clients per round"),
    ("by_population", axes[1], "population (clients)"),
  ):
    rows = results[key]
    x = [
      r["clients_per_round" if key == "by_clients" else "population"]
      for r in rows
    ]
    ax.loglog(x, [r["s_per_round"] for r in rows], "o-")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("seconds per round")
    ax.grid(True, which="both", alpha=0.3)
  axes[0].set_title(
    f"logreg, population {results['by_clients'][0]['population']:,}"
  )
  axes[1].set_title(
    f"logreg, {results['by_population'][0]['clients_per_round']:,} "
    "clients per round"
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def table(rows, first="clients/round") -> str:
  lines = [
    f"| population | {first} | placement | s/round | rounds/s | "
    "data MB per device | process RSS GiB |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    per_dev = list(r["data_bytes_per_device"].values())
    lines.append(
      f"| {r['population']:,} | {r['clients_per_round']:,} | "
      f"{r['placement']} | {r['s_per_round']:.4f} | "
      f"{r['rounds_per_s']:.1f} | "
      f"{' / '.join(f'{b / 2**20:.0f}' for b in per_dev)} | "
      f"{r['rss_gib']:.1f} |"
    )
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default=os.path.join(common.RESULTS, "scale"))
  ap.add_argument("--population", type=int, default=1_000_000)
  ap.add_argument("--examples", type=int, default=20)
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--compare-population", type=int, default=100_000)
  ap.add_argument("--smoke", action="store_true", help="tiny sizes")
  args = ap.parse_args(argv)
  if args.smoke:
    args.population, args.compare_population, args.rounds = 2000, 1000, 2
  big = args.population
  per_round = [m for m in (10, 100, 1000, 10_000, 100_000) if m <= big]
  populations = [p for p in (10_000, 100_000, 1_000_000) if p <= big]
  populations = sorted({min(p, big) for p in populations} | {big})
  fixed = min(10_000, big // 10)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  # float32 matmul peak of one device as configured (one core, one thread).
  results = common.start_record(__file__, argv, peak="here", devices=True)
  print(f"matmul peak {results['peak']['peak_gflops']:.0f} GFLOP/s")
  t0 = time.perf_counter()
  ds = logreg_population(big, args.examples)
  results["generate_s"] = time.perf_counter() - t0
  results["dataset_gib"] = sum(v.nbytes for v in ds.features.values()) / 2**30
  print(f"population {big:,}: {results['dataset_gib']:.2f} GiB", flush=True)

  results["by_clients"] = []
  for m in per_round:
    r, _ = measure(ds, m, args.rounds)
    print(table([r]).splitlines()[-1], flush=True)
    results["by_clients"].append(r)
  results["by_population"] = []
  for p in populations:
    r, _ = measure(first_clients(ds, p), min(fixed, p), args.rounds)
    print(table([r]).splitlines()[-1], flush=True)
    results["by_population"].append(r)

  # Replicated against sharded on the same population: memory and results.
  sub = first_clients(ds, args.compare_population)
  compare = []
  params = {}
  for placement in ("replicated", "sharded"):
    r, params[placement] = measure(
      sub, min(fixed, sub.num_clients), args.rounds, placement
    )
    print(table([r]).splitlines()[-1], flush=True)
    compare.append(r)
  diff = max(
    float(np.max(np.abs(a - b)))
    for a, b in zip(
      jax.tree.leaves(params["replicated"]), jax.tree.leaves(params["sharded"])
    )
  )
  rep = max(compare[0]["data_bytes_per_device"].values())
  sh = max(compare[1]["data_bytes_per_device"].values())
  results["placement"] = {
    "rows": compare,
    "max_abs_param_diff": diff,
    "sharded_over_replicated_bytes": sh / rep,
  }
  del ds, sub
  _UPLOADED.clear()
  gc.collect()

  # FedProx Synthetic(1, 1) with fixed small clients.
  t0 = time.perf_counter()
  syn, _ = fl.datasets.fedprox_synthetic(
    1.0, 1.0, num_clients=big, examples_per_client=10, test_fraction=0.0
  )
  gen = time.perf_counter() - t0
  r, _ = measure(syn, fixed, args.rounds)
  r["generate_s"] = gen
  print(table([r]).splitlines()[-1], flush=True)
  results["fedprox_synthetic"] = r
  results["peak_rss_gib"] = _bench.hwm_rss_mb() / 1024
  plot(results, out / "scale.png")
  md = [
    "Seconds per round against clients per round:",
    table(results["by_clients"]),
    "",
    "Against population size:",
    table(results["by_population"]),
    "",
    f"Replicated against sharded ({args.compare_population:,} clients): "
    f"sharded/replicated data per device "
    f"{results['placement']['sharded_over_replicated_bytes']:.3f}, max "
    f"|param difference| after {args.rounds + 1} rounds {diff:.2e}",
    table(compare),
    "",
    "FedProx Synthetic(1, 1), 10 examples per client:",
    table([r]),
    "",
    f"peak RSS {results['peak_rss_gib']:.1f} GiB.",
  ]

  def page(record):
    return "\n".join(md + ["", common.record_markdown(record)]) + "\n"

  common.write_record(results, out / "scale.json", page)
  print(page(results))


if __name__ == "__main__":
  main()
