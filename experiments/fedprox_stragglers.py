"""FedProx vs FedAvg under systems heterogeneity (Li et al. 2020,
arXiv:1812.06127, Figure 1 / Section 5.2) on Synthetic(1, 1).

Each round samples 10 of the 30 clients uniformly; 90% of them (exactly 9) are
stragglers. FedAvg drops the stragglers (the round averages the one client
that finished its E = 20 epochs); FedProx keeps the stragglers' partial work
(uniform{1, ..., 19} epochs each) and adds the proximal term (mu = 1). FedProx
with mu = 0 (stragglers kept, no proximal term) separates the two effects.
Local SGD: batch 10, lr 0.01; weights n_k; logistic regression 60 -> 10 from
zeros. All variants see the same clients and the same stragglers each round.
"Training loss" is the global model's loss on all training data (the paper's
metric), evaluated after every round.

Run (about a minute on 2 CPU cores)::

  python experiments/fedprox_stragglers.py            # 200 rounds, 3 seeds
  python experiments/fedprox_stragglers.py --smoke    # seconds

Writes experiments/results/fedprox_stragglers.{md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import fedjax_lite as fl  # first: applies the CPU settings

import jax
import numpy as np
import optax

from fedjax_lite.algorithms import fed_prox, with_stragglers

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = {
  # label: (mu, drop stragglers)
  "FedAvg (drops stragglers)": (None, True),
  "FedProx mu=0 (keeps stragglers)": (0.0, False),
  "FedProx mu=1 (keeps stragglers)": (1.0, False),
}


def build(label, model, args):
  mu, drop = VARIANTS[label]
  client_opt = optax.sgd(args.lr)
  inner = (
    fl.fed_avg(model, client_opt)
    if mu is None
    else fed_prox(model, client_opt, mu=mu)
  )
  return with_stragglers(
    inner,
    fraction=args.stragglers,
    num_epochs=args.epochs,
    clients_per_round=args.clients_per_round,
    drop=drop,
  )


def run_variant(label, model, train, train_eval, args):
  """One compiled engine per variant; each seed re-seeds client sampling
  (engine seed) and the straggler draws (the wrapper's key, in its state)."""
  work = fl.LocalWork(batch_size=args.batch_size, num_epochs=args.epochs)
  engine = fl.Engine(
    build(label, model, args), fl.RoundConfig(args.clients_per_round, work)
  )
  data = engine.put_data(train, buckets=args.buckets)
  params = engine.algorithm.get_params
  runs = []
  for seed in range(args.seeds):
    state = engine.init(model.init(jax.random.PRNGKey(0)), seed=seed)
    key = jax.device_put(jax.random.PRNGKey(1000 + seed), engine.replicated)
    state = state.replace(server=state.server.replace(rng=key))
    losses = [fl.evaluate(model, params(state.server), train_eval).mean["loss"]]
    t0 = time.perf_counter()
    for _ in range(args.rounds):
      state, _ = engine.round(state, data)
      losses.append(
        fl.evaluate(model, params(state.server), train_eval).mean["loss"]
      )
    secs = time.perf_counter() - t0
    runs.append({"seed": seed, "loss": losses, "seconds": secs})
    print(
      f"{label:34s} seed {seed}: loss round 0 {losses[0]:.4f} -> "
      f"round {args.rounds} {losses[-1]:.4f}  ({secs:.1f}s incl. "
      "compile for seed 0)",
      flush=True,
    )
  return runs


def plot(results, args, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for label, runs in results.items():
    curves = np.asarray([r["loss"] for r in runs])
    x = np.arange(curves.shape[1])
    mean = curves.mean(0)
    (line,) = ax.plot(x, mean, label=label, lw=1.6)
    if len(runs) > 1:
      ax.fill_between(
        x, curves.min(0), curves.max(0), alpha=0.2, color=line.get_color(), lw=0
      )
  ax.set_xlabel("round")
  ax.set_ylabel("training loss (global model, all training data)")
  ax.set_title(
    f"Synthetic(1,1), {int(args.stragglers * 100)}% stragglers, "
    f"E={args.epochs}, {args.clients_per_round} clients/round"
  )
  ax.set_yscale("log")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def write_markdown(results, args, cmd, path, png):
  seeds = len(next(iter(results.values())))
  lines = [
    "# FedProx vs FedAvg with 90% stragglers (Synthetic(1,1))",
    "",
    "Reproduces the systems-heterogeneity comparison of Li et al. 2020, "
    "\"Federated Optimization in Heterogeneous Networks\" "
    "(arXiv:1812.06127, Figure 1, Synthetic(1,1) column): each round 10 of "
    "30 clients are sampled uniformly and exactly "
    f"{int(round(args.stragglers * args.clients_per_round))} of them are "
    "stragglers. FedAvg drops the stragglers; FedProx keeps their partial "
    f"work (uniform{{1..{args.epochs - 1}}} local epochs instead of "
    f"{args.epochs}) and adds the proximal term. Local SGD with batch "
    f"{args.batch_size}, lr {args.lr}; aggregation weights n_k; "
    "multinomial logistic regression from zeros. The three variants see "
    "the same clients and the same stragglers in every round "
    "(`fedjax_lite.algorithms.with_stragglers`, same seeds).",
    "",
    "Training loss = loss of the global model on all training data, after "
    f"every round; {seeds} seed(s) (data fixed, seed = client sampling and "
    "straggler draws).",
    "",
    "Command:",
    "",
    "```bash",
    cmd,
    "```",
    "",
    f"![training loss]({os.path.basename(png)})",
    "",
    "| variant | "
    + " | ".join(f"round {r}" for r in report_rounds(args))
    + " | min over rounds | wall s per seed |",
    "| --- | "
    + " | ".join("---" for _ in report_rounds(args))
    + " | --- | --- |",
  ]
  for label, runs in results.items():
    curves = np.asarray([r["loss"] for r in runs])
    cells = [fmt(curves[:, r]) for r in report_rounds(args)]
    secs = np.mean([r["seconds"] for r in runs])
    lines.append(
      f"| {label} | "
      + " | ".join(cells)
      + f" | {fmt(curves.min(1))} | {secs:.1f} |"
    )
  final = {k: np.mean([r["loss"][-1] for r in v]) for k, v in results.items()}
  lab_avg, lab_p0, lab_p1 = list(VARIANTS)
  lines += [
    "",
    "Cells: mean over seeds (min-max in brackets when several seeds). "
    "Wall seconds: the rounds and per-round evaluations of one seed, "
    "averaged over seeds (seed 0 includes compilation).",
    "",
    f"Final training loss after {args.rounds} rounds: FedAvg (drop) "
    f"{final[lab_avg]:.4f}, FedProx mu=0 {final[lab_p0]:.4f}, FedProx "
    f"mu=1 {final[lab_p1]:.4f}: FedProx mu=1 ends "
    f"{100 * (1 - final[lab_p1] / final[lab_avg]):.0f}% below FedAvg and "
    f"{100 * (1 - final[lab_p1] / final[lab_p0]):.0f}% below FedProx mu=0 "
    "(mean over seeds). FedAvg averages a single client in every round "
    "(9 of 10 dropped), so its global model jumps towards that client's "
    "20-epoch solution; keeping the stragglers' partial work smooths the "
    "average and the proximal term keeps the long local runs near the "
    "global model.",
    "",
  ]
  with open(path, "w") as f:
    f.write("\n".join(lines))


def report_rounds(args):
  marks = sorted(
    {0, args.rounds // 4, args.rounds // 2, 3 * args.rounds // 4, args.rounds}
  )
  return marks


def fmt(values):
  values = np.atleast_1d(values)
  if values.size == 1:
    return f"{values[0]:.4f}"
  return f"{values.mean():.4f} [{values.min():.4f}-{values.max():.4f}]"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--rounds", type=int, default=200)
  ap.add_argument("--clients-per-round", type=int, default=10)
  ap.add_argument("--epochs", type=int, default=20)
  ap.add_argument("--batch-size", type=int, default=10)
  ap.add_argument("--lr", type=float, default=0.01)
  ap.add_argument("--stragglers", type=float, default=0.9)
  ap.add_argument("--seeds", type=int, default=3)
  ap.add_argument(
    "--buckets",
    default="auto",
    help="size buckets of the padded client data ('auto' or a "
    "count; 1 compiles fastest)",
  )
  ap.add_argument("--out", default=os.path.join(HERE, "results"))
  ap.add_argument("--json", default=None, help="also write the curves here")
  ap.add_argument(
    "--smoke",
    action="store_true",
    help="5 rounds, 2 epochs, 1 seed, 1 bucket, output to /tmp",
  )
  args = ap.parse_args(argv)
  if args.buckets != "auto":
    args.buckets = int(args.buckets)
  if args.smoke:
    args.rounds, args.epochs, args.seeds, args.buckets = 5, 2, 1, 1
    args.out = "/tmp/fedprox_stragglers_smoke"
  os.makedirs(args.out, exist_ok=True)
  train, _ = fl.datasets.fedprox_synthetic(1.0, 1.0)
  model = fl.models.logistic_regression(60, 10)
  train_eval = fl.data.to_device(train, fl.LocalWork(batch_size=256), "auto")
  results = {
    label: run_variant(label, model, train, train_eval, args)
    for label in VARIANTS
  }
  cmd = "python experiments/fedprox_stragglers.py" + (
    " --smoke" if args.smoke else ""
  )
  png = os.path.join(args.out, "fedprox_stragglers.png")
  plot(results, args, png)
  write_markdown(
    results, args, cmd, os.path.join(args.out, "fedprox_stragglers.md"), png
  )
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "results": results}, f)
  print("wrote", args.out)


if __name__ == "__main__":
  main()
