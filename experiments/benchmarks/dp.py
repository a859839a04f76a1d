"""DP-FedAvg: accuracy against epsilon, and the per-round cost of privacy.

``curve``: experiments/dp_fedavg.py (LEAF Synthetic, 3,000 users, Poisson
sampling of 100 expected users per round, adaptive clipping, 200 rounds) with
the noise calibrated (RDP) to epsilon 1, 2, 4, 8 at delta 1e-4, against
clipping without noise and plain FedAvg (no clipping, no noise, 100 users
per round). Reports final test accuracy (mean over seeds), the epsilon the
runs reported (RDP) and the PLD epsilon of the same mechanism.

``cost``: seconds per round of DP-FedAvg vs FedAvg on the standard workloads
logreg1000 and mlp100 (built with experiments/benchmarks/benchmark.py's
helpers), in the same process, interleaved round by round, medians. DP variants: fixed
clip and adaptive clip with fixed-size sampling of the workload's clients
(the per-round epsilon is computed too), and Poisson sampling of the same
expected number of users from a population 10x larger through a cap of
slots: the engine trains only the round's Poisson count of slots
(``Aggregator.active_slots``); ``dp_poisson_every_slot`` is the same
aggregator with ``active_slots=None``, which trains every slot of the cap and
discards the unused ones (the cost before active slots).

Run::

  python experiments/benchmarks/dp.py curve        # ~10 min on 2 cores
  python experiments/benchmarks/dp.py curve --smoke
  python experiments/benchmarks/dp.py cost --repeats 15
  python experiments/benchmarks/dp.py cost --smoke

Writes experiments/results/privacy_dp_{curve,cost}.json and
privacy_dp_curve.png (``--out`` to change the folder).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

import fedjax_lite as fl  # first: applies the fast CPU settings
import fedjax_lite.experiment  # noqa: F401  (fl.experiment)
import jax
import numpy as np
import optax
from fedjax_lite import privacy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark as bench  # noqa: E402  (the standard workloads)
import common  # noqa: E402  (the benchmarks' shared helpers)

EPSILONS = (1.0, 2.0, 4.0, 8.0)


def _load_experiment(name):
  """``experiments/<name>.py`` (an experiment file) as a module."""
  path = Path(common.EXPERIMENTS) / f"{name}.py"
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


# ------------------------------------------------------------------ curve
def _num(v):
  """A metric as a float (run rows may hold 'inf' as text); None stays."""
  return None if v is None else float(v)


def run_curve(args) -> dict:
  exp_file = _load_experiment("dp_fedavg")
  base = exp_file.get_config("smoke" if args.smoke else "")
  if args.rounds:
    base = dataclasses.replace(
      base, num_rounds=args.rounds, eval_every=min(base.eval_every, args.rounds)
    )
  settings = [(f"eps={e:g}", dict(target_epsilon=e)) for e in EPSILONS]
  settings += [
    ("clip only (z=0)", dict(target_epsilon=0.0, noise_multiplier=0.0)),
    ("FedAvg (no DP)", None),
  ]
  seeds = list(range(args.seeds))
  results = []
  for label, over in settings:
    for seed in seeds:
      cfg = dataclasses.replace(base, seed=seed, **(over or {}))
      t0 = time.perf_counter()
      if over is None:
        exp = plain_fed_avg(exp_file, cfg)
        z = None
      else:
        exp = exp_file.build(cfg)
        z = exp_file.noise_multiplier(cfg)
      res = fl.experiment.train(exp, None, progress=False, handle_signals=False)
      rows = res.rows
      test = [
        (r["round"], r["test_accuracy"]) for r in rows if "test_accuracy" in r
      ]
      eps = [_num(r.get("train_dp_epsilon")) for r in rows]
      entry = {
        "label": label,
        "seed": seed,
        "noise_multiplier": z,
        "target_epsilon": None if over is None else cfg.target_epsilon,
        "final_test_accuracy": test[-1][1],
        "test_curve": test,
        "epsilon_curve": eps,
        "clip_curve": [_num(r.get("train_dp_clip_norm")) for r in rows],
        "wall_s": time.perf_counter() - t0,
      }
      if z:
        mech = privacy.DpMechanism(
          z,
          cfg.sampling,
          cfg.num_clients,
          clients_per_round=cfg.clients_per_round,
        )
        entry["epsilon_rdp"] = privacy.epsilon(
          mech, cfg.num_rounds, cfg.delta, "rdp"
        )
        if seed == 0:
          entry["epsilon_pld"] = privacy.epsilon(
            mech, cfg.num_rounds, cfg.delta, "pld"
          )
      results.append(entry)
      print(
        f"{label:>16} seed {seed}: z={z} test acc "
        f"{entry['final_test_accuracy']:.4f} eps {eps[-1]} "
        f"({entry['wall_s']:.0f} s)",
        flush=True,
      )
  return {
    "config": dataclasses.asdict(base),
    "seeds": seeds,
    "runs": results,
  }


def plain_fed_avg(exp_file, cfg) -> fl.experiment.Experiment:
  """FedAvg (example-weighted mean, no clipping, no noise), same data, model,
  optimizers and expected users per round (fixed-size sampling)."""
  exp = exp_file.build(
    dataclasses.replace(cfg, target_epsilon=0.0, noise_multiplier=0.0)
  )
  alg = fl.fed_avg(
    exp.model,
    optax.sgd(cfg.client_lr),
    optax.sgd(cfg.server_lr, momentum=cfg.server_momentum or None),
  )
  rc = dataclasses.replace(
    exp.round_config, clients_per_round=cfg.clients_per_round
  )
  return dataclasses.replace(exp, algorithm=alg, round_config=rc)


def plot_curve(out: dict, path: Path) -> None:
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  runs = out["runs"]
  labels = list(dict.fromkeys(r["label"] for r in runs))
  fig = Figure(figsize=(15, 4.2), layout="constrained")
  ax1, ax2, ax3 = fig.subplots(1, 3)
  dp_eps, dp_acc = [], []
  for e in EPSILONS:
    group = [r for r in runs if r["target_epsilon"] == e]
    if group:
      dp_eps.append(np.mean([r["epsilon_curve"][-1] for r in group]))
      dp_acc.append(np.mean([r["final_test_accuracy"] for r in group]))
  ax1.plot(dp_eps, dp_acc, "o-", label="DP-FedAvg (adaptive clip)")
  for label, style in (("clip only (z=0)", "--"), ("FedAvg (no DP)", ":")):
    group = [r for r in runs if r["label"] == label]
    if group:
      ax1.axhline(
        np.mean([r["final_test_accuracy"] for r in group]),
        ls=style,
        color="gray",
        label=label,
      )
  ax1.set_xscale("log", base=2)
  ax1.set_xlabel(f"epsilon (delta={out['config']['delta']:g}, RDP)")
  ax1.set_ylabel("final test accuracy")
  ax1.set_title("Accuracy vs epsilon")
  ax1.legend()
  for label in labels:
    r = next(r for r in runs if r["label"] == label)
    x, y = zip(*r["test_curve"])
    ax2.plot(x, y, label=label)
    if r["epsilon_curve"][-1] is not None and math.isfinite(
      r["epsilon_curve"][-1]
    ):  # no curve for FedAvg and z = 0
      ax3.plot(
        range(1, len(r["epsilon_curve"]) + 1), r["epsilon_curve"], label=label
      )
  ax2.set_xlabel("round")
  ax2.set_ylabel("test accuracy (seed 0)")
  ax2.set_title("Test accuracy")
  ax2.legend(fontsize=8)
  ax3.set_xlabel("round")
  ax3.set_ylabel("epsilon spent (train_dp_epsilon)")
  ax3.set_title("Privacy spent per round")
  ax3.legend(fontsize=8)
  fig.savefig(path, dpi=110)


# ------------------------------------------------------------------- cost
def _every_slot(agg):
  """``agg`` training every slot of the cap (no ``active_slots``), also once
  the engine binds it to the run."""
  bind = agg.bind
  return agg._replace(
    active_slots=None,
    bind=None if bind is None else lambda run: _every_slot(bind(run)),
  )


def run_cost(args) -> dict:
  out = {"workloads": {}}
  for name in args.workloads:
    w = dict(bench.WORKLOADS[name])
    if args.smoke:  # a tenth, and >= 20 per round: adaptive clipping's
      # count noise (clients_per_round / 20) must exceed z / 2 = 0.5
      w.update(
        num_clients=max(w["num_clients"] // 10, 20),
        clients_per_round=max(w["clients_per_round"] // 10, 20),
      )
    m, n = w["clients_per_round"], w["num_clients"]
    model = bench.model_for(w)
    params = model.init(jax.random.PRNGKey(0))
    work = fl.LocalWork(batch_size=bench.BATCH, num_epochs=1)
    ds = bench.make_dataset(w)
    big = dict(w, num_clients=10 * n)
    ds_big = bench.make_dataset(big)
    cap = privacy.poisson_cap(10 * n, m / (10 * n), 1000)

    def dp(model=model, m=m, **kw):
      return privacy.dp_fed_avg(
        model,
        optax.sgd(bench.LR),
        optax.sgd(1.0),
        noise_multiplier=1.0,
        clients_per_round=m,
        clip=1.0,
        delta=1e-5,
        **kw,
      )

    variants = {
      "fedavg": (fl.fed_avg(model, optax.sgd(bench.LR), optax.sgd(1.0)), m, ds),
      "dp_fixed_clip": (dp(sampling="fixed", population=n), m, ds),
      "dp_adaptive_clip": (
        dp(sampling="fixed", population=n, adaptive=True),
        m,
        ds,
      ),
      "dp_poisson_cap": (
        dp(sampling="poisson", population=10 * n),
        cap,
        ds_big,
      ),
    }
    poisson = variants["dp_poisson_cap"][0]
    variants["dp_poisson_every_slot"] = (
      poisson._replace(aggregator=_every_slot(poisson.aggregator)),
      cap,
      ds_big,
    )
    runners = {}
    for key, (alg, slots, data_src) in variants.items():
      eng = fl.Engine(alg, fl.RoundConfig(slots, work))
      data = eng.put_data(data_src)
      holder = {"s": eng.init(params, seed=0, num_clients=data.num_clients)}

      def step(eng=eng, data=data, holder=holder):
        holder["s"], metrics = eng.round(holder["s"], data)
        jax.block_until_ready((holder["s"], metrics))

      runners[key] = step
    # Compile and warm each, then one round of each in turn per repeat.
    timing = common.time_calls(runners, 1, warmup=2, cycles=args.repeats)
    times = {k: t["round_seconds"] for k, t in timing.items()}
    med = {k: t["seconds_per_round"] for k, t in timing.items()}
    res = {
      "clients_per_round": m,
      "population": n,
      "poisson": {"population": 10 * n, "expected": m, "cap": cap},
      "median_s": med,
      "times": times,
      "ratio_vs_fedavg": {k: med[k] / med["fedavg"] for k in med},
    }
    res["ratio_vs_fedavg"]["dp_poisson_every_slot_per_slot"] = (
      med["dp_poisson_every_slot"] / cap
    ) / (med["fedavg"] / m)
    res["poisson_active_vs_every_slot"] = (
      med["dp_poisson_cap"] / med["dp_poisson_every_slot"]
    )
    out["workloads"][name] = res
    print(
      name,
      json.dumps({k: round(v, 5) for k, v in med.items()}),
      json.dumps({k: round(v, 3) for k, v in res["ratio_vs_fedavg"].items()}),
      flush=True,
    )
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("mode", choices=("curve", "cost"))
  p.add_argument("--smoke", action="store_true", help="seconds-long run")
  p.add_argument("--seeds", type=int, default=2)
  p.add_argument(
    "--rounds", type=int, default=0, help="override num_rounds (curve)"
  )
  p.add_argument(
    "--repeats", type=int, default=15, help="timed rounds per variant (cost)"
  )
  p.add_argument("--workloads", nargs="+", default=["logreg1000", "mlp100"])
  p.add_argument("--out", type=Path, default=Path(common.RESULTS))
  args = p.parse_args(argv)
  suffix = "_smoke" if args.smoke else ""
  # float32 matmul peak of one device of this process, same run.
  record = common.start_record(__file__, argv, peak="here", devices=True)
  if args.mode == "curve":
    if args.smoke:
      args.seeds = 1
    record.update(run_curve(args))
    common.write_record(record, args.out / f"privacy_dp_curve{suffix}.json")
    plot_curve(record, args.out / f"privacy_dp_curve{suffix}.png")
  else:
    if args.smoke:
      args.repeats = min(args.repeats, 3)
    record.update(run_cost(args))
    common.write_record(record, args.out / f"privacy_dp_cost{suffix}.json")
  return 0


if __name__ == "__main__":
  sys.exit(main())
