"""Robustness table (aggregator x attack x Byzantine fraction) and compression
table on federated digits (experiments/robustness_digits.py's setting).

Robustness: for every aggregator ONE compiled program runs all its settings
as pooled runs of one engine round (``Engine.rounds_body``): no attack, and
each of the six attacks at 10, 20 and 30% Byzantine clients (the attack is
the traced hyperparameter ``attack_index`` through
``fedjax_lite.attacks.select_attack``, the fraction the traced
``byzantine_fraction``; the Byzantine sets are nested). Every run starts from
the same initial model and engine seed, so runs differ only by the attack.

Compression: FedAvg (weighted mean, no attack) with dense, top-k + error
feedback, QSGD and EF-sign uplinks, a few client learning rates and seeds
as pooled runs per compressor, test accuracy after every ``eval_every``
rounds, and the measured uplink bytes per client per round.

Non-finite clients: for every aggregator, 20% of the clients send NaN in
every round (``attack="nan"``; the engine drops their updates before the
aggregator, ``RoundConfig(nonfinite="drop")``) against the same run with
those clients absent, a few seeds pooled per setting: "silent" (they stay in
the population but send nothing, so every other client trains exactly as in
the attacked run: the difference must be float rounding only) and "removed"
(left out of the data; the other clients are renumbered and draw other
random streams, so only means over seeds compare).

Run::

  python experiments/benchmarks/robustness.py                  # both tables
  python experiments/benchmarks/robustness.py --part nonfinite # its table
  python experiments/benchmarks/robustness.py --part robustness
  python experiments/benchmarks/robustness.py --part compression
  python experiments/benchmarks/robustness.py --smoke          # seconds, no files

Writes experiments/results/robustness_table.{json,md} + robustness.png,
compression_table.{json,md} + compression.png and nonfinite_table.{json,md}
(the run's record in the json: command, machine, date, load, matmul peak);
experiments/results/robustness.md discusses them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import fedjax_lite as fl  # applies the fast CPU settings (before JAX runs)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (the benchmarks' shared helpers)

sys.path.insert(0, common.EXPERIMENTS)
import robustness_digits as rd  # noqa: E402  (the experiment file)

RESULTS = Path(common.RESULTS)
FRACTIONS = (0.1, 0.2, 0.3)
COMPRESSIONS = ("dense", "top_k", "qsgd", "sign_ef")


def run_settings(
  config, settings: list[dict], eval_every: int, seeds: list[int] | None = None
) -> dict:
  """Runs ``settings`` (hparam dicts) as pooled runs of one engine round.

  Returns per-run test accuracy after every ``eval_every`` rounds, the last
  round's train metrics, and the compile and run times.
  """
  exp = rd.build(config)
  n = len(settings)
  seeds = seeds or [exp.seed] * n
  hp = {
    k: jnp.asarray([s[k] for s in settings], jnp.float32) for k in exp.hparams
  }
  engine = fl.Engine(exp.make_algorithm(settings[0]), exp.round_config)
  data = engine.put_data(exp.train, buckets=1)
  test = engine.put_data(exp.test, buckets=1)
  states = []
  for s, seed in zip(settings, seeds):
    one = fl.Engine(exp.make_algorithm(s), exp.round_config)
    states.append(
      one.init(
        exp.initial_params(seed),
        seed=exp.engine_rng(seed),
        num_clients=exp.train.num_clients,
        data=data,
      )
    )
  states = jax.tree.map(lambda *xs: jnp.stack(xs), *states)

  @jax.jit
  def chunk(states, hp):
    def body(s, _):
      return engine.rounds_body(s, data, exp.algorithm_fn, hp)

    return jax.lax.scan(body, states, None, length=eval_every)

  def evaluate(p):
    return fl.evaluate(exp.model, p, test).mean

  t0 = time.perf_counter()
  compiled = chunk.lower(states, hp).compile()
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  accs, metrics = [], None
  for _ in range(exp.num_rounds // eval_every):
    states, metrics = compiled(states, hp)
    params = exp.algorithm.get_params(states.server)
    accs.append(
      [
        float(evaluate(jax.tree.map(lambda a, i=i: a[i], params))["accuracy"])
        for i in range(n)
      ]
    )
  run_s = time.perf_counter() - t0
  last = {k: np.asarray(v)[-1].tolist() for k, v in metrics.items()}
  return {
    "test_accuracy": np.asarray(accs).T.tolist(),  # [run, evals]
    "train": last,
    "compile_s": compile_s,
    "run_s": run_s,
  }


# ----------------------------------------------------------------- tables
def robustness(base, aggregators, attack_names=rd.ATTACKS[1:]) -> dict:
  settings = [{"attack_index": 0.0, "byzantine_fraction": 0.0}] + [
    {"attack_index": float(rd.ATTACKS.index(a)), "byzantine_fraction": f}
    for a in attack_names
    for f in FRACTIONS
  ]
  out = {}
  for name in aggregators:
    cfg = dataclasses.replace(base, aggregator=name, attack="select")
    full = [{"client_lr": cfg.client_lr, **s} for s in settings]
    res = run_settings(cfg, full, cfg.num_rounds)
    final = [a[-1] for a in res["test_accuracy"]]
    table = {"none": {"0.0": final[0]}}
    for j, s in enumerate(settings[1:], 1):
      attack = rd.ATTACKS[int(s["attack_index"])]
      table.setdefault(attack, {"0.0": final[0]})[
        str(s["byzantine_fraction"])
      ] = final[j]
    out[name] = {
      "final_test_accuracy": table,
      "compile_s": res["compile_s"],
      "run_s": res["run_s"],
      "realized_byzantine": res["train"].get("byzantine"),
    }
    print(
      f"{name:>18}: compile {res['compile_s']:.0f}s, run "
      f"{res['run_s']:.0f}s; "
      + ", ".join(
        f"{a} {table[a].get('0.2', table[a]['0.0']):.3f}" for a in table
      ),
      flush=True,
    )
  return out


def compression(base, lrs, seeds, eval_every) -> dict:
  out = {}
  for name in COMPRESSIONS:
    cfg = dataclasses.replace(
      base,
      compression=name,
      attack="none",
      aggregator="weighted_mean",
      byzantine_fraction=0.0,
    )
    settings = [
      {"client_lr": lr, "byzantine_fraction": 0.0} for lr in lrs for _ in seeds
    ]
    run_seeds = [s for _ in lrs for s in seeds]
    res = run_settings(cfg, settings, eval_every, run_seeds)
    acc = np.asarray(res["test_accuracy"]).reshape(len(lrs), len(seeds), -1)
    nbytes = res["train"].get("uplink_bytes")
    out[name] = {
      "lrs": list(lrs),
      "seeds": list(seeds),
      "eval_rounds": [eval_every * (i + 1) for i in range(acc.shape[2])],
      "test_accuracy": acc.tolist(),
      "uplink_bytes": None if nbytes is None else float(np.mean(nbytes)),
      "compile_s": res["compile_s"],
      "run_s": res["run_s"],
    }
    print(
      f"{name:>8}: compile {res['compile_s']:.0f}s run {res['run_s']:.0f}s"
      f" bytes {out[name]['uplink_bytes']} final mean acc per lr "
      f"{np.round(acc[:, :, -1].mean(1), 4).tolist()}",
      flush=True,
    )
  return out


def nonfinite(base, aggregators, seeds) -> dict:
  """Final test accuracy with ``base.byzantine_fraction`` of the clients
  sending NaN, and without those clients, per aggregator and seed."""
  out = {}
  for name in aggregators:
    row = {}
    for label, over in (
      ("nan", dict(attack="nan")),
      ("silent", dict(attack="none", byzantine_absent="silent")),
      ("without", dict(attack="none", byzantine_absent="removed")),
    ):
      # Multi-krum averages the same m in both runs: the clients per round
      # without the Byzantine ones, less f.
      honest = round(base.clients_per_round * (1 - base.byzantine_fraction))
      cfg = dataclasses.replace(
        base,
        aggregator=name,
        multi_krum_m=base.multi_krum_m or honest - base.num_byzantine,
        **over,
      )
      settings = [
        {"client_lr": cfg.client_lr, "byzantine_fraction": 0.0}
        if cfg.byzantine_absent == "removed"
        else {
          "client_lr": cfg.client_lr,
          "byzantine_fraction": cfg.byzantine_fraction,
        }
        for _ in seeds
      ]
      res = run_settings(cfg, settings, cfg.num_rounds, list(seeds))
      row[label] = [a[-1] for a in res["test_accuracy"]]
      row[f"{label}_num_clients"] = res["train"]["num_clients"]
      row[f"{label}_run_s"] = res["run_s"]
      if label == "nan":
        row["dropped_nonfinite"] = res["train"].get("dropped_nonfinite")
    silent_diff = np.asarray(row["nan"]) - np.asarray(row["silent"])
    row["silent_max_abs_diff_points"] = float(100 * np.max(np.abs(silent_diff)))
    diff = np.asarray(row["nan"]) - np.asarray(row["without"])
    row["max_abs_diff_points"] = float(100 * np.max(np.abs(diff)))
    row["mean_diff_points"] = float(100 * np.mean(diff))
    out[name] = row
    print(
      f"{name:>18}: with NaN clients {np.round(row['nan'], 4).tolist()}, "
      f"silent {np.round(row['silent'], 4).tolist()} (max |diff| "
      f"{row['silent_max_abs_diff_points']:.2f}), removed "
      f"{np.round(row['without'], 4).tolist()}, mean diff "
      f"{row['mean_diff_points']:+.2f}, max |diff| "
      f"{row['max_abs_diff_points']:.2f} points",
      flush=True,
    )
  return out


# ----------------------------------------------------------------- report
def _fmt(v):
  return "" if v is None else f"{100 * v:.1f}"


def robustness_md(res: dict) -> str:
  names = [
    a
    for a in rd.ATTACKS[1:]
    if a in next(iter(res.values()))["final_test_accuracy"]
  ]
  lines = []
  for frac in ("0.1", "0.2", "0.3"):
    lines += [
      (
        f"\nByzantine fraction {float(frac):.0%} (no attack: the "
        "first column):\n"
      ),
      "| aggregator | none | " + " | ".join(names) + " |",
      "|---" * (len(names) + 1) + "|---|",
    ]
    for agg, r in res.items():
      t = r["final_test_accuracy"]
      lines.append(
        f"| {agg} | {_fmt(t['none']['0.0'])} | "
        + " | ".join(_fmt(t[a].get(frac)) for a in names)
        + " |"
      )
  return "\n".join(lines)


def nonfinite_md(res: dict, fraction: float) -> str:
  def ms(v):
    return f"{100 * np.mean(v):.2f} ± {100 * np.std(v):.2f}"

  seeds = len(next(iter(res.values()))["nan"])
  lines = [
    f"| aggregator | {fraction:.0%} of the clients send NaN (mean ± std of "
    f"{seeds} seeds) | they send nothing: max abs diff of one seed (points)"
    " | they are removed from the data | mean diff to removed (points) | max"
    " abs diff to removed, one seed | clients per round (NaN / removed) | "
    "dropped_nonfinite |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for agg, r in res.items():
    lines.append(
      f"| {agg} | {ms(r['nan'])} | {r['silent_max_abs_diff_points']:.2f} | "
      f"{ms(r['without'])} | {r['mean_diff_points']:+.2f} | "
      f"{r['max_abs_diff_points']:.2f} | "
      f"{np.mean(r['nan_num_clients']):.0f} / "
      f"{np.mean(r['without_num_clients']):.0f} | "
      f"{np.mean(r['dropped_nonfinite']):.0f} |"
    )
  return "\n".join(lines)


def compression_md(res: dict) -> str:
  dense = res.get("dense", {}).get("uplink_bytes")
  lines = [
    "| uplink | bytes / client / round | x smaller | "
    + " | ".join(
      f"lr {lr}: acc @ {r}"
      for lr in next(iter(res.values()))["lrs"]
      for r in next(iter(res.values()))["eval_rounds"]
    )
    + " |"
  ]
  lines.append(
    "|---"
    * (
      3
      + len(next(iter(res.values()))["lrs"])
      * len(next(iter(res.values()))["eval_rounds"])
    )
    + "|"
  )
  for name, r in res.items():
    acc = np.asarray(r["test_accuracy"])  # [lr, seed, eval]
    cells = []
    for i in range(acc.shape[0]):
      for j in range(acc.shape[2]):
        m, s = acc[i, :, j].mean(), acc[i, :, j].std()
        cells.append(f"{100 * m:.1f} ± {100 * s:.1f}")
    ratio = (
      f"{dense / r['uplink_bytes']:.1f}" if dense and r["uplink_bytes"] else ""
    )
    lines.append(
      f"| {name} | {r['uplink_bytes']:.0f} | {ratio} | "
      + " | ".join(cells)
      + " |"
    )
  return "\n".join(lines)


def plot_robustness(res: dict, path: Path) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  attacks = rd.ATTACKS[1:]
  fig, axes = plt.subplots(2, 3, figsize=(11, 6.4), sharey=True)
  xs = [0.0, *FRACTIONS]
  for ax, attack in zip(axes.ravel(), attacks):
    for agg, r in res.items():
      t = r["final_test_accuracy"][attack]
      ax.plot(
        [100 * x for x in xs], [t[str(x)] for x in xs], marker="o", label=agg
      )
    ax.set_title(attack)
    ax.set_xlabel("Byzantine clients (%)")
    ax.grid(alpha=0.3)
  for ax in axes[:, 0]:
    ax.set_ylabel("final test accuracy")
  handles, labels = axes[0, 0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
  fig.tight_layout(rect=(0, 0.08, 1, 1))
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_compression(res: dict, path: Path) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(5, 3.6))
  for name, r in res.items():
    acc = np.asarray(r["test_accuracy"])
    best = int(np.argmax(acc[:, :, -1].mean(1)))
    ax.errorbar(
      r["eval_rounds"],
      acc[best].mean(0),
      acc[best].std(0),
      marker="o",
      capsize=3,
      label=f"{name} (lr {r['lrs'][best]}, {r['uplink_bytes']:.0f} B)",
    )
  ax.set_xlabel("round")
  ax.set_ylabel("test accuracy")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument(
    "--part",
    choices=("all", "robustness", "compression", "nonfinite"),
    default="all",
    help="'all': the robustness and compression tables",
  )
  p.add_argument(
    "--nonfinite-seeds", default="0,1,2", help="seeds of the nonfinite table"
  )
  p.add_argument("--aggregators", default=",".join(rd.AGGREGATORS))
  p.add_argument(
    "--attacks",
    default=",".join(rd.ATTACKS[1:]),
    help="attacks of the robustness table (besides none)",
  )
  p.add_argument(
    "--alie-z", type=float, default=0.0, help="ALIE's z (0: the paper's z_max)"
  )
  p.add_argument(
    "--tag",
    default="",
    help="suffix of the output files (robustness_<tag>.*, nonfinite_<tag>.*)",
  )
  p.add_argument(
    "--rounds",
    type=int,
    default=None,
    help="robustness rounds (default: the experiment's)",
  )
  p.add_argument("--compression-rounds", type=int, default=60)
  p.add_argument("--compression-eval-every", type=int, default=20)
  p.add_argument("--lrs", default="0.1,0.3")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument(
    "--smoke",
    action="store_true",
    help="tiny run (20 clients, 2 rounds); writes nothing",
  )
  args = p.parse_args(argv)
  base = rd.get_config("smoke" if args.smoke else "")
  if args.rounds:
    base = dataclasses.replace(base, num_rounds=args.rounds)
  base = dataclasses.replace(base, alie_z=args.alie_z)
  t0 = time.perf_counter()
  result = common.start_record(__file__, argv, peak="here", devices=True)
  result["config"] = dataclasses.asdict(base)
  aggregators = args.aggregators.split(",")
  if args.part in ("all", "robustness"):
    result["robustness"] = robustness(
      base, aggregators, args.attacks.split(",")
    )
  if args.part in ("all", "compression"):
    rounds = 2 if args.smoke else args.compression_rounds
    every = 1 if args.smoke else args.compression_eval_every
    cbase = dataclasses.replace(base, num_rounds=rounds)
    result["compression"] = compression(
      cbase,
      [float(x) for x in args.lrs.split(",")],
      [int(x) for x in args.seeds.split(",")],
      every,
    )
  if args.part == "nonfinite":
    result["nonfinite"] = nonfinite(
      base, aggregators, [int(x) for x in args.nonfinite_seeds.split(",")]
    )
  result["total_s"] = time.perf_counter() - t0
  print(f"total {result['total_s']:.0f}s")
  if args.smoke:
    return result
  if args.tag and "robustness" in result:
    common.write_record(
      result,
      RESULTS / f"robustness_{args.tag}.json",
      robustness_md(result["robustness"]) + "\n",
    )
    return result
  if "nonfinite" in result:
    stem = f"nonfinite_{args.tag}" if args.tag else "nonfinite_table"
    common.write_record(
      result,
      RESULTS / f"{stem}.json",
      nonfinite_md(result["nonfinite"], base.byzantine_fraction) + "\n",
    )
  tables = {  # each table's file holds the record without the other table
    "robustness": (robustness_md, plot_robustness, "compression"),
    "compression": (compression_md, plot_compression, "robustness"),
  }
  for name, (render, plot, other) in tables.items():
    if name in result:
      part = {k: v for k, v in result.items() if k != other}
      md = render(result[name]) + "\n"
      common.write_record(part, RESULTS / f"{name}_table.json", md)
      plot(result[name], RESULTS / f"{name}.png")
  return result


if __name__ == "__main__":
  main()
