"""Vectorized sweeps: S seeds as ONE vmapped run vs S sequential runs vs 1 run.

Workloads (logistic regression):

* ``synthetic``: experiments/fedavg_synthetic.py (FedProx Synthetic(1, 1), 30
  clients with lognormal sizes, 10 clients per round, batch 10, 20 local
  epochs, logreg 60 -> 10).
* ``logreg1000``: the benchmark.py workload (1000 clients x 50 examples, 60
  features, 10 classes, all 1000 clients per round, 1 epoch, batch 10).

Modes, all in this process on the same compiled programs, each call running
``--rounds`` rounds on device:

* ``one``: ``Engine.run`` (``lax.scan`` over rounds) for one seed.
* ``sequential``: ``Engine.run`` for each of S seeds, one after the other.
* ``vmapped``: the library's sweep path (``fedjax_lite.experiment.
  VmappedRounds``): ``jax.vmap`` over S stacked EngineStates (S seeds)
  calling ``Engine.round_body``.
* ``grid``: the same path for S client learning rates on one seed (grid
  points share the seed's client sample and gathered data).

Reported: median seconds per call over ``--repeats`` timed calls after a
warm-up (compile) call, and ratios to ``one``. Run::

  python experiments/sweep_benchmark.py                  # both workloads
  python experiments/sweep_benchmark.py --workload synthetic --seeds 8 \\
      --block-size 0 1 --json sweeps.json      # 0: automatic block size
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

import fedjax_lite as fl  # first: applies the fast CPU settings
import fedjax_lite.experiment as fe
import jax
import numpy as np
import optax

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import benchmark  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def synthetic_experiment() -> fe.Experiment:
  ef = fe.load_experiment_file(os.path.join(HERE, "fedavg_synthetic.py"))
  return ef.build(ef.get_config())


def logreg1000_experiment() -> fe.Experiment:
  w = benchmark.WORKLOADS["logreg1000"]
  x, y = benchmark.make_data(w)
  ds = fl.FederatedDataset(
      features={"x": x.reshape(-1, w["features"]), "y": y.reshape(-1)},
      offsets=[i * w["examples"] for i in range(w["num_clients"])],
      counts=[w["examples"]] * w["num_clients"])
  model = fl.models.logistic_regression(w["features"], w["classes"])
  return fe.Experiment(
      model=model, train=ds, hparams={"client_lr": benchmark.LR},
      algorithm_fn=lambda h: fl.fed_avg(model, optax.sgd(h["client_lr"]),
                                        optax.sgd(1.0)),
      round_config=fl.RoundConfig(w["clients_per_round"],
                                  fl.LocalWork(batch_size=benchmark.BATCH,
                                               num_epochs=1)),
      num_rounds=1, eval_every=0)


WORKLOADS = {"synthetic": (synthetic_experiment, 20),
             "logreg1000": (logreg1000_experiment, 5)}


def timed(fn, repeats: int) -> tuple[float, list]:
  jax.block_until_ready(fn())  # warm-up: compiles
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t)
  return float(np.median(ts)), ts


def bench(name: str, num_seeds: int, rounds: int | None, repeats: int,
          block_size: int | None = None) -> dict:
  make, default_rounds = WORKLOADS[name]
  rounds = rounds or default_rounds
  exp = make()
  if block_size is not None:
    exp = dataclasses.replace(exp, round_config=dataclasses.replace(
        exp.round_config, block_size=block_size))
  engine = fe.engine_for(exp)
  data = engine.put_data(exp.train)
  seeds = list(range(num_seeds))
  states = [fe.init_state(exp, engine, s) for s in seeds]

  def one():
    return engine.run(states[0], data, rounds)[0].server.params

  def sequential():
    out = None
    for s in states:
      out = jax.block_until_ready(engine.run(s, data, rounds)[0].server.params)
    return out

  vm = fe.VmappedRounds(exp, seeds, {}, rounds)
  stacked = vm.init()

  def vmapped():
    return vm.run(stacked, data, rounds)[0].server.params

  # The same number of settings as a learning-rate grid on one seed (the
  # grid points share the seed's client sample and data).
  lr0 = exp.hparams["client_lr"]
  grid = {"client_lr": [lr0 * 2.0 ** (k - num_seeds // 2)
                        for k in range(num_seeds)]}
  vg = fe.VmappedRounds(exp, seeds[:1], grid, rounds)
  stacked_grid = vg.init()

  def vmapped_grid():
    return vg.run(stacked_grid, data, rounds)[0].server.params

  t_one, ts_one = timed(one, repeats)
  t_seq, ts_seq = timed(sequential, repeats)
  t_vm, ts_vm = timed(vmapped, repeats)
  t_grid, ts_grid = timed(vmapped_grid, repeats)
  # The vmapped seeds compute what the separate runs compute.
  ref = jax.device_get(engine.run(states[-1], data, rounds)[0].server.params)
  got = jax.device_get(jax.tree.map(lambda a: a[-1, 0], vmapped()))
  max_diff = max(float(np.max(np.abs(a - b))) for a, b in
                 zip(jax.tree.leaves(ref), jax.tree.leaves(got)))
  return {"workload": name, "seeds": num_seeds, "rounds_per_call": rounds,
          "repeats": repeats, "one_s": t_one, "sequential_s": t_seq,
          "block_size_config": block_size,
          "vmapped_s": t_vm, "vmapped_over_one": t_vm / t_one,
          "grid_vmapped_s": t_grid, "grid_over_one": t_grid / t_one,
          "sequential_over_one": t_seq / t_one,
          "speedup_vs_sequential": t_seq / t_vm,
          "max_abs_diff_vmapped_vs_separate": max_diff,
          "block_sizes": dict(engine.block_sizes),
          "vmapped_traces": vm.num_traces,
          "vmapped_block_size": vm.round_config.block_size,
          "times": {"one": ts_one, "sequential": ts_seq, "vmapped": ts_vm,
                    "grid_vmapped": ts_grid}}


def cpu_model() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True,
                         check=False).stdout
    for line in out.splitlines():
      if line.startswith("Model name:"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return "unknown"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workload", nargs="+", default=list(WORKLOADS),
                  choices=list(WORKLOADS))
  ap.add_argument("--seeds", type=int, default=8)
  ap.add_argument("--rounds", type=int, default=None,
                  help="rounds per timed call (default: per workload)")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--block-size", type=int, nargs="+", default=[None],
                  help="RoundConfig.block_size values to measure (0 or "
                       "default: the engine's automatic choice)")
  ap.add_argument("--json", default=None, help="write results here")
  args = ap.parse_args(argv)
  env = {"cpu": cpu_model(), "cores": os.cpu_count(),
         "devices": len(jax.devices()), "platform": jax.devices()[0].platform,
         "jax": jax.__version__, "cpu_settings": fl.runtime.settings()}
  print(json.dumps(env))
  results = []
  n = args.seeds
  print(f"| workload | block size | rounds/call | 1 run (s) | {n} sequential "
        f"(s) | {n} seeds vmapped (s) | {n} seeds vmapped / 1 run | "
        f"{n} lrs vmapped (s) | {n} lrs vmapped / 1 run |")
  print("|---|---|---|---|---|---|---|---|---|")
  for name in args.workload:
    for bs in args.block_size:
      r = bench(name, n, args.rounds, args.repeats, bs or None)
      results.append(r)
      print(f"| {name} | {bs or 'auto'}: 1 run {r['block_sizes']}, "
            f"vmapped {r['vmapped_block_size']} | "
            f"{r['rounds_per_call']} | {r['one_s']:.3f} | "
            f"{r['sequential_s']:.3f} | {r['vmapped_s']:.3f} | "
            f"{r['vmapped_over_one']:.2f}x | {r['grid_vmapped_s']:.3f} | "
            f"{r['grid_over_one']:.2f}x |", flush=True)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"environment": env, "results": results}, f, indent=2)


if __name__ == "__main__":
  main()
