"""Overhead of the TFF-style facade (``fedjax_lite.learning``) over the engine.

Same workload as ``experiments/benchmark.py`` (default ``logreg1000``: 1000
clients/round x 50 examples of 60 features, logistic regression to 10
classes, SGD lr 0.05, batch 10, one local epoch, server SGD lr 1.0, data from
``numpy.random.default_rng(0)``). Three ways to run a round, in one process:

* ``engine``: :meth:`fedjax_lite.Engine.round` on data uploaded once with
  ``put_data`` (steady state after compilation);
* ``facade_dataset``: ``process.next(state, ds)`` fed the same
  :class:`~fedjax_lite.FederatedDataset` every round (uploaded once);
* ``facade_lists``: ``process.next(state, clients)`` fed the round's sampled
  clients as a list of per-client ``{"x", "y"}`` dicts, a fresh list every
  round, as TFF users write it (packed and uploaded every round).

Every variant runs one untimed warm-up round (compilation), then the timed
rounds run in turns (engine, dataset, lists, engine, ...) so machine noise
hits all three alike. A timed round ends when its state and metrics are on
the host side of ``jax.block_until_ready`` (the facade returns metrics as
Python floats). Building the clients' list is the caller's work and is not
timed. Reported: median seconds/round and the ratios to the engine's round.

Run::

  python experiments/facade_benchmark.py --out experiments/results
  python experiments/facade_benchmark.py --smoke --out /tmp/facade
"""

from __future__ import annotations

import fedjax_lite as fl  # first: applies the CPU device settings

import argparse
import datetime
import importlib.util
import json
import pathlib
import platform
import sys
import time

import jax
import numpy as np
import optax


def _load_benchmark():
  """``experiments/benchmark.py``, which defines the standard workloads."""
  path = pathlib.Path(__file__).resolve().parent / "benchmark.py"
  spec = importlib.util.spec_from_file_location("_workloads_benchmark", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


_bench = _load_benchmark()
BATCH, LR, WORKLOADS, cpu_info = (
  _bench.BATCH,
  _bench.LR,
  _bench.WORKLOADS,
  _bench.cpu_info,
)

SMOKE = dict(
  num_clients=8,
  clients_per_round=8,
  examples=12,
  features=5,
  classes=3,
  hidden=(),
)
MODES = ("engine", "facade_dataset", "facade_lists")
TARGETS = {"facade_dataset": 1.2, "facade_lists": 1.6}


def _loadavg() -> list[float] | None:
  try:
    with open("/proc/loadavg") as f:
      return [float(v) for v in f.read().split()[:3]]
  except OSError:
    return None


def _model(w):
  if w["hidden"]:
    return fl.models.mlp(w["features"], w["classes"], w["hidden"])
  return fl.models.logistic_regression(w["features"], w["classes"])


def run(workload: str, rounds: int, smoke: bool) -> dict:
  """Times the three variants in turns; returns the result record."""
  w = dict(SMOKE if smoke else WORKLOADS[workload])
  n, m, e = w["num_clients"], w["clients_per_round"], w["examples"]
  rng = np.random.default_rng(0)
  x = rng.standard_normal((n, e, w["features"]), dtype=np.float32)
  y = rng.integers(0, w["classes"], (n, e)).astype(np.int32)
  ds = fl.FederatedDataset(
    features={"x": x.reshape(n * e, -1), "y": y.reshape(-1)},
    offsets=np.arange(n) * e,
    counts=np.full(n, e),
  )
  model = _model(w)
  params = model.init(jax.random.PRNGKey(0))
  work = fl.LocalWork(batch_size=BATCH, num_epochs=1)

  # (a) the engine's own round.
  engine = fl.Engine(
    fl.fed_avg(model, optax.sgd(LR), optax.sgd(1.0)), fl.RoundConfig(m, work)
  )
  data = engine.put_data(ds)
  holder = {"engine": engine.init(params, seed=0)}

  def engine_round():
    holder["engine"], metrics = engine.round(holder["engine"], data)
    jax.block_until_ready((holder["engine"], metrics))

  # (b), (c) the TFF-style process.
  process = fl.learning.build_federated_averaging_process(
    model,
    client_optimizer_fn=lambda: optax.sgd(LR),
    server_optimizer_fn=lambda: optax.sgd(1.0),
    local_epochs=1,
    batch_size=BATCH,
  )
  start = process.set_model_weights(process.initialize(seed=0), params)
  holder["facade_dataset"] = start
  holder["facade_lists"] = start
  # The FederatedDataset fed every round: the whole population when every
  # client takes part (both standard workloads), else a fixed sample.
  round_ds = ds if m == n else ds.subset(np.sort(rng.permutation(n)[:m]))
  # Per-client arrays as a TFF user holds them (views of x and y).
  per_client = [{"x": x[k], "y": y[k]} for k in range(n)]
  sample_rng = np.random.default_rng(1)

  def facade_dataset():
    holder["facade_dataset"], _ = process.next(
      holder["facade_dataset"], round_ds
    )

  def facade_lists(clients):
    holder["facade_lists"], _ = process.next(holder["facade_lists"], clients)

  def prepare(mode):
    """The call to time, after the untimed preparation (the caller's
    list of this round's sampled clients)."""
    if mode == "engine":
      return engine_round
    if mode == "facade_dataset":
      return facade_dataset
    clients = [per_client[k] for k in sample_rng.permutation(n)[:m]]
    return lambda: facade_lists(clients)

  for mode in MODES:  # warm-up: compiles
    prepare(mode)()
  times = {mode: [] for mode in MODES}
  load_before = _loadavg()
  for _ in range(rounds):
    for mode in MODES:
      fn = prepare(mode)
      t = time.perf_counter()
      fn()
      times[mode].append(time.perf_counter() - t)
  load_after = _loadavg()
  med = {mode: float(np.median(times[mode])) for mode in MODES}
  ratios = {
    mode: med[mode] / med["engine"]
    for mode in ("facade_dataset", "facade_lists")
  }
  return {
    "workload": "smoke" if smoke else workload,
    "config": w,
    "smoke": smoke,
    "rounds": rounds,
    "seconds_per_round": med,
    "ratios_to_engine": ratios,
    "targets": TARGETS,
    "meets_targets": {k: bool(ratios[k] <= v) for k, v in TARGETS.items()},
    "times": times,
    "facade_traces": {
      str(k): eng.num_traces
      for k, eng in process._engines.items()  # pylint: disable=protected-access
    },
    "engine_traces": engine.num_traces,
    "devices": len(jax.devices()),
    "platform": jax.devices()[0].platform,
    "jax": jax.__version__,
    "cpu": cpu_info(),
    "python": platform.python_version(),
    "loadavg_before": load_before,
    "loadavg_after": load_after,
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
  }


def markdown(res: dict) -> str:
  s, r = res["seconds_per_round"], res["ratios_to_engine"]
  rows = [
    "| variant | s/round (median) | vs engine |",
    "|---|---|---|",
    f"| engine round (`Engine.round`, data uploaded once) "
    f"| {s['engine']:.4f} | 1.00x |",
    f"| `process.next`, same FederatedDataset each round "
    f"| {s['facade_dataset']:.4f} | {r['facade_dataset']:.2f}x "
    f"(target <= {TARGETS['facade_dataset']}x) |",
    f"| `process.next`, per-client list of dicts each round "
    f"| {s['facade_lists']:.4f} | {r['facade_lists']:.2f}x "
    f"(target <= {TARGETS['facade_lists']}x) |",
  ]
  return "\n".join(rows)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workload", default="logreg1000", choices=list(WORKLOADS))
  ap.add_argument("--rounds", type=int, default=20, help="timed turns")
  ap.add_argument("--smoke", action="store_true", help="tiny sizes, 3 turns")
  ap.add_argument("--out", default=None, help="folder for the JSON result")
  args = ap.parse_args(argv)
  rounds = 3 if args.smoke else args.rounds
  res = run(args.workload, rounds, args.smoke)
  res["command"] = " ".join(
    ["python", "experiments/facade_benchmark.py"]
    + (sys.argv[1:] if argv is None else list(argv))
  )
  table = markdown(res)
  print(table)
  if args.out:
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"facade_{res['workload']}.json"
    (out / name).write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out / name}")
  return res


if __name__ == "__main__":
  main()
