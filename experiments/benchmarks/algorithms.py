"""Seconds per round of every algorithm of the family on logreg1000.

Workload ``logreg1000`` of experiments/benchmarks/benchmark.py: 1000 clients x 50
examples x 60 features, 10 classes, all 1000 clients every round, batch 10, one
local epoch, client SGD lr 0.05, logistic regression; the engine with the
package's default CPU settings. All algorithms run in ONE process: each is
compiled and warmed up first, then the timed measurements are interleaved
(cycle c times every algorithm in turn, ``--cycles`` cycles), so that the
machine's background load hits all of them alike. Reported: the median over
cycles of seconds per engine round, and the median over cycles of the ratio to
FedAvg measured in the same cycle. Mime needs two engine rounds per Mime round
(see fedjax_lite/algorithms/mime.py); its row also gives seconds per Mime round.

Run::

  python experiments/benchmarks/algorithms.py          # writes results md
  python experiments/benchmarks/algorithms.py --smoke  # seconds, 100 clients
"""

from __future__ import annotations

import argparse
import os
import sys

import fedjax_lite as fl  # first: applies the CPU settings

import jax
import numpy as np
import optax

from fedjax_lite import algorithms as alg

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark as bench  # noqa: E402  (WORKLOADS, make_dataset, model_for)
import common  # noqa: E402  (the benchmarks' shared helpers)


def algorithms(model, num_clients):
  """name -> (algorithm, engine rounds per algorithm round, what it adds)."""
  sgd = optax.sgd(bench.LR)
  return {
    "fed_avg": (fl.fed_avg(model, sgd, optax.sgd(1.0)), 1, "baseline"),
    "fed_prox": (
      alg.fed_prox(model, sgd, mu=0.01),
      1,
      "proximal term in each local gradient",
    ),
    "fed_adam": (alg.fed_adam(model, sgd, 0.01), 1, "server Adam"),
    "fed_yogi": (alg.fed_yogi(model, sgd, 0.01), 1, "server Yogi"),
    "fed_adagrad": (alg.fed_adagrad(model, sgd, 0.01), 1, "server Adagrad"),
    "fed_avg_m": (
      alg.fed_avg_m(model, sgd, 1.0, momentum=0.9),
      1,
      "server momentum",
    ),
    "scaffold": (
      alg.scaffold(model, bench.LR, num_clients=num_clients),
      1,
      "control-variate correction per step; gathers and "
      "scatters the clients' control variates",
    ),
    "fed_nova": (
      alg.fed_nova(model, bench.LR),
      1,
      "normalized update, tau_eff rescaling",
    ),
    "mime_lite": (
      alg.mime_lite(model, optax.sgd(bench.LR, momentum=0.9)),
      1,
      "a full-batch gradient pass at x per client",
    ),
    "mime": (
      alg.mime(model, optax.sgd(bench.LR, momentum=0.9)),
      2,
      "two engine rounds per Mime round: a full-batch gradient "
      "pass, then local steps with two gradients each (at y and x)",
    ),
    "q_fed_avg": (
      alg.q_fed_avg(model, bench.LR, q=1.0),
      1,
      "a forward pass for F_k(w_t) per client",
    ),
    "ditto": (
      alg.ditto(model, sgd, lam=0.1),
      1,
      "a second local training (the personal model) per client; "
      "gathers and scatters the personal models",
    ),
    # Stragglers need E >= 2: compared with FedAvg at E = 2.
    "fed_avg E=2": (
      fl.fed_avg(model, sgd, optax.sgd(1.0)),
      1,
      "2 local epochs (twice FedAvg's local work); baseline "
      "of the straggler row",
    ),
    "fed_prox+stragglers E=2": (
      alg.with_stragglers(
        alg.fed_prox(model, sgd, mu=0.01),
        fraction=0.9,
        num_epochs=2,
        clients_per_round=num_clients,
        drop=False,
      ),
      1,
      "90% stragglers keep 1 of 2 epochs: masked steps still run "
      "(shapes are static), so the round costs what FedAvg's does",
    ),
  }


EPOCHS = {"fed_avg E=2": 2, "fed_prox+stragglers E=2": 2}
BASELINE = {"fed_prox+stragglers E=2": "fed_avg E=2"}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument(
    "--cycles", type=int, default=7, help="interleaved timing cycles"
  )
  ap.add_argument(
    "--rounds-per-sample",
    type=int,
    default=3,
    help="consecutive rounds per timed sample",
  )
  ap.add_argument("--only", default=None, help="comma list of algorithms")
  ap.add_argument(
    "--out", default=os.path.join(common.RESULTS, "algorithms.md")
  )
  ap.add_argument(
    "--smoke", action="store_true", help="100 clients, 2 cycles, output to /tmp"
  )
  args = ap.parse_args(argv)
  w = dict(bench.WORKLOADS["logreg1000"])
  if args.smoke:
    w.update(num_clients=100, clients_per_round=100)
    args.cycles, args.rounds_per_sample = 2, 1
    args.out = "/tmp/algorithms_benchmark_smoke.md"
  record = common.start_record(__file__, argv, peak="here", devices=True)
  ds = bench.make_dataset(w)
  model = bench.model_for(w)
  params = model.init(jax.random.PRNGKey(0))
  table = algorithms(model, w["num_clients"])
  if args.only:
    names = ["fed_avg"] + [n for n in args.only.split(",") if n != "fed_avg"]
    names += [BASELINE[n] for n in names if n in BASELINE]
    table = {n: table[n] for n in dict.fromkeys(names)}

  runners = {}
  for name, (algorithm, _, _) in table.items():
    work = fl.LocalWork(batch_size=bench.BATCH, num_epochs=EPOCHS.get(name, 1))
    engine = fl.Engine(algorithm, fl.RoundConfig(w["clients_per_round"], work))
    data = engine.put_data(ds)
    holder = {"s": engine.init(params, seed=0, num_clients=w["num_clients"])}

    def run(engine=engine, data=data, holder=holder):
      for _ in range(args.rounds_per_sample):
        holder["s"], _ = engine.round(holder["s"], data)
      jax.block_until_ready(holder["s"])

    runners[name] = run

  # Two warm-up samples each (compile, then warm), then one sample of every
  # algorithm per cycle, in turn.
  timing = common.time_calls(runners, 1, warmup=2, cycles=args.cycles)
  samples = {}
  for name, t in timing.items():
    print(
      f"{name:24s} compiled and warmed up in {t['warmup_seconds']:.1f}s",
      flush=True,
    )
    samples[name] = [s / args.rounds_per_sample for s in t["round_seconds"]]

  rows = []
  for name, ts in samples.items():
    ts = np.asarray(ts)
    base = np.asarray(samples[BASELINE.get(name, "fed_avg")])
    rows.append(
      (
        name,
        float(np.median(ts)),
        float(np.median(ts / base)),
        table[name][1],
        table[name][2],
      )
    )
  common.write_record(
    record, None, lambda r: markdown(rows, args, w, r), args.out
  )
  for name, sec, ratio, per, _ in rows:
    print(
      f"{name:24s} {sec * 1e3:8.2f} ms/engine round  x{ratio:.2f} vs "
      f"{BASELINE.get(name, 'fed_avg')}"
      + (f"  ({sec * per * 1e3:.2f} ms per algorithm round)" if per > 1 else "")
    )
  print("wrote", args.out)


def markdown(rows, args, w, record) -> str:
  """The results page (experiments/results/algorithms.md)."""
  lines = [
    "# Seconds per round of the algorithm family (logreg1000)",
    "",
    f"Workload: {w['num_clients']} clients x {w['examples']} examples x "
    f"{w['features']} features, {w['classes']} classes, all "
    f"{w['clients_per_round']} clients every round, batch {bench.BATCH}, "
    f"1 local epoch, client SGD lr {bench.LR}, logistic regression "
    "(experiments/benchmarks/benchmark.py's `logreg1000`), the engine with "
    "the package's default CPU settings "
    f"({len(jax.devices())} XLA CPU devices).",
    "",
    common.record_markdown(record)
    + " The machine is shared with other work, so timings are noisy.",
    "",
    "Method: all algorithms in one process; each is compiled and warmed up "
    f"first, then {args.cycles} interleaved cycles time "
    f"{args.rounds_per_sample} consecutive rounds of every algorithm in "
    "turn. Seconds/round is the median over cycles; the ratio is the "
    "median over cycles of (algorithm / FedAvg in the same cycle).",
    "",
    "| algorithm | ms / engine round | ratio to FedAvg (same cycle) | "
    "what it adds |",
    "| --- | --- | --- | --- |",
  ]
  for name, sec, ratio, per, what in rows:
    extra = (
      f" ({sec * per * 1e3:.1f} ms and x{ratio * per:.2f} per Mime round)"
      if per > 1
      else ""
    )
    vs = f" (vs {BASELINE[name]})" if name in BASELINE else ""
    lines.append(
      f"| {name} | {sec * 1e3:.2f}{extra} | {ratio:.2f}{vs} | {what} |"
    )
  lines += [
    "",
    "Algorithms that do more work per round than FedAvg by design: "
    "MimeLite and q-FedAvg evaluate every client's full local batch at the "
    "server weights (a gradient, or a loss), Ditto trains two models per "
    "client, Mime makes a gradient pass and then two gradient evaluations "
    "per local step (about three times FedAvg's gradient work per Mime "
    "round, spread over two engine rounds), and SCAFFOLD / Ditto read and "
    "write per-client state for the whole population in every round. The "
    "others differ from FedAvg only in O(model) server work or a few "
    "elementwise operations per local step.",
    "",
  ]
  return "\n".join(lines)


if __name__ == "__main__":
  main()
