"""Seconds per FedBuff server step against a synchronous round of K clients.

Workload ``mlp100`` (WORKLOADS.md: 784-200-200-62 MLP, 100 clients of 100
examples, batch 10, one epoch). In one process, interleaved round-robin
(``--cycles`` cycles of ``--rounds`` calls each, alternating the order):

* ``sync round (K)``: ``Engine.round`` of FedAvg with ``clients_per_round =
  K``;
* ``FedBuff step (K)``: one ``fedbuff(...).round`` on the same engine,
  ``concurrency = 2K``, ``tau_max = 8``, heavy-tailed client speeds (Pareto
  tail index 1.5) with jitter and 5% dropout: the event loop of the step, the
  ``K`` arrivals trained from their ring-buffer versions, the server update;
* ``deadline round (K)``: one ``DeadlineRounds(..., over_selection=1.3,
  deadline=...)`` round.

Reported: the median seconds per call and the ratios to the synchronous
round of the same process (acceptance: FedBuff <= 1.2x). Writes
experiments/results/time_aware.json and .md. Run::

  python experiments/benchmarks/time_aware.py            # ~3 min
  python experiments/benchmarks/time_aware.py --smoke    # seconds
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import benchmark as bm  # noqa: E402  (data and model builders)
import common  # noqa: E402  (the benchmarks' shared helpers)
from aggregators import round_fn  # noqa: E402  (one round per call, state carried)


def build(w, k):
  import fedjax_lite as fl  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from fedjax_lite import systems  # pylint: disable=g-import-not-at-top
  from fedjax_lite.engine import time_aware as ta  # pylint: disable=g-import-not-at-top

  model = bm.model_for(w)
  engine = fl.Engine(
    fl.fed_avg(model, optax.sgd(bm.LR), optax.sgd(1.0)),
    fl.RoundConfig(k, fl.LocalWork(batch_size=bm.BATCH, num_epochs=1)),
  )
  data = engine.put_data(bm.make_dataset(w))
  params = model.init(jax.random.PRNGKey(0))
  behaviour = systems.ClientBehaviour(
    seed=0,
    step_seconds=systems.Pareto(0.02, 1.5),
    jitter=0.3,
    dropout=0.05,
  )
  fedbuff = ta.fedbuff(engine, behaviour, concurrency=2 * k, tau_max=8)
  deadline = ta.DeadlineRounds(
    engine, behaviour, over_selection=1.3, deadline=30.0
  )
  return {
    "sync": (engine, engine.init(params, seed=0, data=data)),
    "fedbuff": (fedbuff, fedbuff.init(params, seed=0, data=data)),
    "deadline": (deadline, deadline.init(params, seed=0, data=data)),
  }, data


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--k", default="10,50", help="comma-separated K values")
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--cycles", type=int, default=6)
  ap.add_argument("--smoke", action="store_true")
  ap.add_argument(
    "--out", default=os.path.join(common.RESULTS, "time_aware.json")
  )
  args = ap.parse_args(argv)
  import fedjax_lite  # noqa: F401  (one CPU device per core, before any JAX work)

  if args.smoke:
    args.rounds, args.cycles, args.k = 1, 1, "4"
  record = common.start_record(__file__, argv, peak="here")
  w = dict(bm.WORKLOADS["mlp100"])
  if args.smoke:
    w.update(num_clients=20, features=32, hidden=(16,))
  results = {}
  for k in [int(x) for x in args.k.split(",")]:
    built, data = build(w, k)
    calls = {
      f"{name} (K={k})": round_fn(r, data, s) for name, (r, s) in built.items()
    }
    out = common.time_calls(
      calls, args.rounds, cycles=args.cycles, alternate=True
    )
    sync = out[f"sync (K={k})"]["seconds_per_round"]
    for name, r in out.items():
      r["ratio_to_sync"] = r["seconds_per_round"] / sync
    results[str(k)] = out
    for name, r in out.items():
      print(
        f"{name:22s} {r['seconds_per_round'] * 1e3:8.2f} ms  "
        f"x{r['ratio_to_sync']:.3f}",
        flush=True,
      )
  record.update(workload="mlp100", smoke=args.smoke, results=results)

  def markdown(rec):
    lines = [
      common.record_markdown(rec),
      "",
      "| variant | ms per call (median) | best ms | ratio to sync round |",
      "|---|---:|---:|---:|",
    ]
    for out in rec["results"].values():
      for name, r in out.items():
        lines.append(
          f"| {name} | {r['seconds_per_round'] * 1e3:.2f} | "
          f"{r['best_seconds'] * 1e3:.2f} | {r['ratio_to_sync']:.3f} |"
        )
    return "\n".join(lines) + "\n"

  if args.smoke:
    print(markdown(record))
  else:
    common.write_record(record, args.out, markdown)


if __name__ == "__main__":
  main()
