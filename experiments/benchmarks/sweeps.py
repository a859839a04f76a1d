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
* ``vmapped`` (pooled): the library's sweep path
  (``fedjax_lite.experiment.VmappedRounds``): the S seeds are runs of ONE
  engine round (``Engine.rounds_body``) whose sampled clients share the
  size-bucket blocks.
* ``grid``: S client learning rates on one seed, each a run of the same
  engine round with its own hyperparameters.
* ``seeds_x_grid``: 2 seeds x S/2 learning rates, likewise.

Reported: median seconds per call over ``--repeats`` timed calls after a
warm-up (compile) call, and ratios to ``one``. Run::

  python experiments/benchmarks/sweeps.py                  # both workloads
  python experiments/benchmarks/sweeps.py --workload synthetic --seeds 8 \\
      --block-size 0 1 --json sweeps.json      # 0: automatic block size
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import fedjax_lite as fl  # first: applies the fast CPU settings
import fedjax_lite.experiment as fe
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark  # noqa: E402  (the standard workloads)
import common  # noqa: E402  (the benchmarks' shared helpers)


def synthetic_experiment() -> fe.Experiment:
  path = os.path.join(common.EXPERIMENTS, "fedavg_synthetic.py")
  ef = fe.load_experiment_file(path)
  return ef.build(ef.get_config())


def logreg1000_experiment() -> fe.Experiment:
  w = benchmark.WORKLOADS["logreg1000"]
  model = fl.models.logistic_regression(w["features"], w["classes"])
  return fe.Experiment(
    model=model,
    train=benchmark.make_dataset(w),
    hparams={"client_lr": benchmark.LR},
    algorithm_fn=lambda h: fl.fed_avg(
      model, optax.sgd(h["client_lr"]), optax.sgd(1.0)
    ),
    round_config=fl.RoundConfig(
      w["clients_per_round"],
      fl.LocalWork(batch_size=benchmark.BATCH, num_epochs=1),
    ),
    num_rounds=1,
    eval_every=0,
  )


WORKLOADS = {
  "synthetic": (synthetic_experiment, 20),
  "logreg1000": (logreg1000_experiment, 5),
}


def bench(
  name: str,
  num_seeds: int,
  rounds: int | None,
  repeats: int,
  block_size: int | None = None,
) -> dict:
  make, default_rounds = WORKLOADS[name]
  rounds = rounds or default_rounds
  exp = make()
  if block_size is not None:
    exp = dataclasses.replace(
      exp,
      round_config=dataclasses.replace(exp.round_config, block_size=block_size),
    )
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

  vm = fe.VmappedRounds(exp, seeds, {}, rounds)  # default: pooled runs
  stacked = vm.init()

  def vmapped():
    return vm.run(stacked, data, rounds)[0].server.params

  # The same number of settings as a learning-rate grid on one seed.
  lr0 = exp.hparams["client_lr"]
  grid = {
    "client_lr": [lr0 * 2.0 ** (k - num_seeds // 2) for k in range(num_seeds)]
  }
  vg = fe.VmappedRounds(exp, seeds[:1], grid, rounds)
  stacked_grid = vg.init()

  def vmapped_grid():
    return vg.run(stacked_grid, data, rounds)[0].server.params

  # Seeds x grid: 2 seeds x (num_seeds // 2) learning rates.
  mixed = {
    "client_lr": grid["client_lr"][
      num_seeds // 4 : num_seeds // 4 + num_seeds // 2
    ]
  }
  vmix = fe.VmappedRounds(exp, seeds[:2], mixed, rounds)
  stacked_mix = vmix.init()

  def mixed_pooled():
    return vmix.run(stacked_mix, data, rounds)[0].server.params

  calls = {
    "one": one,
    "sequential": sequential,
    "vmapped": vmapped,
    "grid_vmapped": vmapped_grid,
    "seeds_x_grid_pooled": mixed_pooled,
  }
  # Each mode: a warm-up call (compiles), then ``repeats`` timed calls.
  timing = common.time_calls(
    {k: lambda f=f: jax.block_until_ready(f()) for k, f in calls.items()},
    repeats,
  )
  times = {k: t["round_seconds"] for k, t in timing.items()}
  t_one, t_seq, t_vm, t_grid, t_mix = (
    timing[k]["seconds_per_round"] for k in calls
  )
  # The vmapped seeds compute what the separate runs compute.
  ref = jax.device_get(engine.run(states[-1], data, rounds)[0].server.params)
  got = jax.device_get(jax.tree.map(lambda a: a[-1], vmapped()))
  max_diff = max(
    float(np.max(np.abs(a - b)))
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got))
  )
  return {
    "workload": name,
    "seeds": num_seeds,
    "rounds_per_call": rounds,
    "repeats": repeats,
    "one_s": t_one,
    "sequential_s": t_seq,
    "block_size_config": block_size,
    "vmapped_s": t_vm,
    "vmapped_over_one": t_vm / t_one,
    "vmapped_block_sizes": dict(vm.block_sizes),
    "grid_vmapped_s": t_grid,
    "grid_over_one": t_grid / t_one,
    "seeds_x_grid": f"2 seeds x {len(mixed['client_lr'])} lrs",
    "seeds_x_grid_pooled_over_one": t_mix / t_one,
    "sequential_over_one": t_seq / t_one,
    "speedup_vs_sequential": t_seq / t_vm,
    "max_abs_diff_vmapped_vs_separate": max_diff,
    "free_width_bound": critical_path_ratio(exp, num_seeds),
    "block_sizes": dict(engine.block_sizes),
    "vmapped_traces": vm.num_traces,
    "vmapped_block_size": vm.round_config.block_size,
    "times": times,
  }


def critical_path_ratio(
  exp: fe.Experiment, num_seeds: int, rounds: int = 1000
) -> dict:
  """How much longer S seeds' rounds are than one run's with FREE width.

  A round cannot end before its largest sampled client has taken all its
  local steps one after another. Running S seeds' rounds side by side (any
  round-synchronous batching) waits for the largest client of all S
  samples. This is the ratio of the expected longest client (in local steps)
  of S seeds' samples to that of one seed's sample, over ``rounds`` rounds
  drawn with the engine's sampler: a lower bound on "S seeds / 1 run" on
  hardware where extra clients cost nothing.
  """
  cfg = exp.round_config
  counts = np.asarray(exp.train.counts)
  steps = np.asarray([cfg.local_work.plan(int(n))[0] for n in counts])
  weights = (
    jnp.asarray(counts, jnp.float32) if cfg.sampling == "weighted" else None
  )

  if cfg.sampling == "all":
    longest = np.full((num_seeds, rounds), steps.max())
  else:

    def sample(seed, t):  # the engine's round key and sampler
      key = jax.random.fold_in(jax.random.PRNGKey(seed), t)
      return fl.data.sample_clients(
        jax.random.split(key)[0],
        len(counts),
        cfg.clients_per_round,
        weights,
        cfg.replace,
      )

    ids = jax.jit(jax.vmap(jax.vmap(sample, (None, 0)), (0, None)))(
      jnp.arange(num_seeds), jnp.arange(rounds)
    )  # [S, rounds, m]
    longest = steps[np.asarray(ids)].max(-1)  # [S, rounds]
  one, many = longest[0], longest.max(0)
  return {
    "one_run_steps": float(np.mean(one)),
    "seeds_steps": float(np.mean(many)),
    "ratio": float(np.mean(many) / np.mean(one)),
    "rounds": rounds,
  }


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument(
    "--workload", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS)
  )
  ap.add_argument("--seeds", type=int, default=8)
  ap.add_argument(
    "--rounds",
    type=int,
    default=None,
    help="rounds per timed call (default: per workload)",
  )
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument(
    "--block-size",
    type=int,
    nargs="+",
    default=[None],
    help="RoundConfig.block_size values to measure (0 or "
    "default: the engine's automatic choice)",
  )
  ap.add_argument("--json", default=None, help="write results here")
  args = ap.parse_args(argv)
  # Matmul peak in its own process with JAX's default XLA settings (as in
  # benchmark.py): 2048^2 float32, both cores.
  record = common.start_record(__file__, argv, devices=True)
  print(json.dumps({k: record[k] for k in ("machine", "peak")}))
  results = []
  n = args.seeds
  print(
    f"| workload | block size | rounds/call | 1 run (s) | {n} sequential "
    f"(s) | {n} seeds pooled (s) | {n} seeds pooled / 1 run | "
    f"{n} lrs vmapped (s) | {n} lrs vmapped / 1 run |"
  )
  print("|---|---|---|---|---|---|---|---|---|")
  for name in args.workload:
    for bs in args.block_size:
      r = bench(name, n, args.rounds, args.repeats, bs or None)
      results.append(r)
      print(
        f"| {name} | {bs or 'auto'}: 1 run {r['block_sizes']}, "
        f"pooled {r['vmapped_block_sizes']} | "
        f"{r['rounds_per_call']} | {r['one_s']:.3f} | "
        f"{r['sequential_s']:.3f} | {r['vmapped_s']:.3f} | "
        f"{r['vmapped_over_one']:.2f}x | "
        f"{r['grid_vmapped_s']:.3f} | "
        f"{r['grid_over_one']:.2f}x |",
        flush=True,
      )
      print(
        f"  {name}: {r['seeds_x_grid']}: pooled "
        f"{r['seeds_x_grid_pooled_over_one']:.2f}x one run",
        flush=True,
      )
      b = r["free_width_bound"]
      print(
        f"  {name}: with free width, {n} seeds' rounds wait "
        f"{b['ratio']:.2f}x one run's (longest client {b['seeds_steps']:.0f}"
        f" vs {b['one_run_steps']:.0f} local steps)",
        flush=True,
      )
  record["results"] = results
  common.write_record(record, args.json)


if __name__ == "__main__":
  main()
