"""Overhead of the TFF-style facade (``fedjax_lite.learning``) over the engine.

Same workload as ``experiments/benchmarks/benchmark.py`` (default
``logreg1000``: 1000
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

  python experiments/benchmarks/facade.py --out experiments/results
  python experiments/benchmarks/facade.py --smoke --out /tmp/facade
"""

from __future__ import annotations

import fedjax_lite as fl  # first: applies the CPU device settings

import argparse
import os
import pathlib
import sys

import jax
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark as _bench  # noqa: E402  (the standard workloads)
import common  # noqa: E402  (the benchmarks' shared helpers)

BATCH, LR, WORKLOADS = _bench.BATCH, _bench.LR, _bench.WORKLOADS

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
  model = _bench.model_for(w)
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

  def facade_lists():
    holder["facade_lists"], _ = process.next(
      holder["facade_lists"], holder["clients"]
    )

  def prepare(mode):
    """Untimed: the caller's list of this round's sampled clients."""
    if mode == "facade_lists":
      holder["clients"] = [per_client[k] for k in sample_rng.permutation(n)[:m]]

  calls = dict(zip(MODES, (engine_round, facade_dataset, facade_lists)))
  timing = common.time_calls(calls, 1, cycles=rounds, before=prepare)
  times = {mode: timing[mode]["round_seconds"] for mode in MODES}
  med = {mode: timing[mode]["seconds_per_round"] for mode in MODES}
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
    "load_before": timing["engine"]["load_before"],
    "load_after": timing["engine"]["load_after"],
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
  res = common.start_record(__file__, argv, peak="here", devices=True)
  res.update(run(args.workload, rounds, args.smoke))
  print(markdown(res))
  path = None
  if args.out:
    path = pathlib.Path(args.out) / f"facade_{res['workload']}.json"
  common.write_record(res, path)
  if path:
    print(f"wrote {path}")
  return res


if __name__ == "__main__":
  main()
