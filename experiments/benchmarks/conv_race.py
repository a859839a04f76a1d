"""The convolution and recurrent workloads, fedjax_lite against PyTorch.

Workloads (all FedAvg, server SGD lr 1.0, example-weighted; data from
``numpy.random.default_rng(0)``):

* ``cifar10``: pfl-research's CIFAR-10 benchmark: 1,000 clients x 50
  images 32x32x3, 50 clients per round, 1 epoch of batch 10, client SGD lr
  0.1, pfl's CNN (1,626,442 parameters, 101.0 MFLOP per training example).
  Baseline: pfl-research's own simulated round
  (``pfl_cifar10_worker.py``).
* ``charlstm``: the LEAF Shakespeare char-LSTM (embedding 8, two LSTM-256
  layers), 100 clients x 100 sequences of 80 characters, 10 clients per
  round, batch 10, lr 0.8. Baseline: a PyTorch per-client loop
  (``torch_loops.py``).
* ``resnet18gn``: ResNet-18 with group norm on 24x24x3 crops, 100 classes,
  100 clients x 100 images, 10 clients per round, batch 20, lr 0.1.
  Baseline: the PyTorch per-client loop.

Every measurement runs in its own process; for each workload the processes
alternate (fedjax_lite, baseline, fedjax_lite, ...) ``--repeats`` times, so
both see the same machine. fedjax_lite runs with the settings the package
chooses (one XLA CPU device per core); the PyTorch baselines with one thread
per core. Reported per system: the median of all timed rounds (each process
times ``--rounds`` rounds after a warm-up round), model GFLOP/s (6 x forward
MACs per example, the convention of pfl's numbers), the fraction of the
float32 matmul peak measured by jax in the same run, and the highest 1-minute
load average seen; then the ratio of medians.

The PyTorch side needs ``torch`` and ``pfl`` in an interpreter given by
``--torch-python`` (``pip install torch==2.13.0 pfl==0.6.0`` into a venv of
its own; pin torch exactly). Without it only fedjax_lite is timed.

Run::

  python experiments/benchmarks/conv_race.py --torch-python /path/venv/bin/python
  python experiments/benchmarks/conv_race.py --workloads cifar10 --repeats 3 \\
    --json experiments/results/conv_race.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (the benchmarks' shared helpers)

HERE = os.path.dirname(os.path.abspath(__file__))

# name: population, clients/round, examples/client, batch, client lr,
#       forward MACs per example, baseline script and arguments
WORKLOADS = {
  "cifar10": dict(
    num_clients=1000,
    clients_per_round=50,
    examples=50,
    batch=10,
    lr=0.1,
    forward_macs=16_835_200,
    baseline=("pfl_cifar10_worker.py",),
  ),
  "charlstm": dict(
    num_clients=100,
    clients_per_round=10,
    examples=100,
    batch=10,
    lr=0.8,
    # LSTM gates 4 H (in + H) per layer and step, plus the output layer
    forward_macs=80 * 4 * 256 * ((8 + 256) + (256 + 256)) + 256 * 80,
    baseline=("torch_loops.py", "--workload", "charlstm"),
  ),
  "resnet18gn": dict(
    num_clients=100,
    clients_per_round=10,
    examples=100,
    batch=20,
    lr=0.1,
    forward_macs=28_210_176,
    baseline=("torch_loops.py", "--workload", "resnet18gn"),
  ),
}


def make_dataset(name: str):
  import numpy as np

  import fedjax_lite as fl

  w = WORKLOADS[name]
  n, e = w["num_clients"], w["examples"]
  rng = np.random.default_rng(0)
  if name == "charlstm":
    x = rng.integers(0, 80, (n * e, 80)).astype(np.int32)
    y = rng.integers(0, 80, n * e).astype(np.int32)
    model = fl.models.char_lstm()
  else:
    shape, classes = (
      ((32, 32, 3), 10) if name == "cifar10" else ((24, 24, 3), 100)
    )
    x = rng.standard_normal((n * e,) + shape, dtype=np.float32)
    y = rng.integers(0, classes, n * e).astype(np.int32)
    model = (
      fl.models.simple_cnn(shape, classes)
      if name == "cifar10"
      else fl.models.resnet18_gn(shape, classes)
    )
  ds = fl.FederatedDataset(
    features={"x": x, "y": y},
    offsets=[i * e for i in range(n)],
    counts=[e] * n,
  )
  return ds, model


def worker_engine(args) -> dict:
  import jax
  import optax

  import fedjax_lite as fl

  w = WORKLOADS[args.workload]
  ds, model = make_dataset(args.workload)
  engine = fl.Engine(
    fl.fed_avg(model, optax.sgd(w["lr"]), optax.sgd(1.0)),
    fl.RoundConfig(
      w["clients_per_round"],
      fl.LocalWork(batch_size=w["batch"], num_epochs=1),
      block_size=args.block_size,
    ),
  )
  data = engine.put_data(ds, model=model)
  holder = {"state": engine.init(model.init(jax.random.PRNGKey(0)), seed=0)}
  losses = []

  def one_round():
    holder["state"], metrics = engine.round(holder["state"], data)
    losses.append(float(metrics["loss"]))  # blocks until the round is done

  out = common.time_calls(one_round, args.rounds)
  out.update(
    system="fedjax_lite",
    devices=len(jax.devices()),
    block_sizes=engine.block_sizes,
    settings=fl.runtime.settings(),
    train_loss=losses,
    num_params=fl.models.num_params(holder["state"].server.params),
  )
  return out


WORKERS = {"engine": worker_engine}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workloads", default="cifar10,charlstm,resnet18gn")
  ap.add_argument("--rounds", type=int, default=3, help="timed rounds")
  ap.add_argument("--repeats", type=int, default=2, help="processes each")
  ap.add_argument("--torch-python", default=None)
  ap.add_argument("--block-size", type=int, default=None)
  ap.add_argument("--json", default=None)
  ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--workload", default="cifar10", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)

  if args.worker:
    if args.worker == "engine":
      import fedjax_lite  # noqa: F401  (the package's CPU settings first)
    print(json.dumps(WORKERS[args.worker](args)))
    return

  me = os.path.abspath(__file__)
  results = common.start_record(__file__, argv)
  peak = results["peak"]
  print(f"# CPU {results['machine']['cpu']}", flush=True)
  print(
    f"# jax float32 matmul peak {peak['peak_gflops']:.1f} GFLOP/s "
    f"({peak['matmul_n']}^2, default XLA settings, load "
    f"{peak['load_before']:.2f})",
    flush=True,
  )
  engine_args = ["--rounds", str(args.rounds)]
  if args.block_size:
    engine_args += ["--block-size", str(args.block_size)]
  for name in args.workloads.split(","):
    w = WORKLOADS[name]
    flops = 6 * w["forward_macs"] * w["examples"] * w["clients_per_round"]
    runs = {"fedjax_lite": [], "baseline": []}
    for _ in range(args.repeats):
      runs["fedjax_lite"].append(
        common.run_worker(
          [me, "--worker", "engine", "--workload", name] + engine_args
        )
      )
      if args.torch_python:
        script, *extra = w["baseline"]
        runs["baseline"].append(
          common.run_worker(
            [os.path.join(HERE, script), *extra, "--rounds", str(args.rounds)],
            python=args.torch_python,
          )
        )
    res = {"flops_per_round": flops}
    for system, rs in runs.items():
      if not rs:
        continue
      s = common.summarize(rs)
      s["gflops"] = flops / s["seconds_per_round"] / 1e9
      s["fraction_of_peak"] = s["gflops"] / peak["peak_gflops"]
      s["runs"] = rs
      res[system] = s
      print(
        f"{name:11s} {system:11s} {s['seconds_per_round']:8.3f} s/round "
        f"{s['gflops']:7.1f} GFLOP/s ({100 * s['fraction_of_peak']:.0f}% of "
        f"peak), max load {s['max_load']:.2f}",
        flush=True,
      )
    if "baseline" in res:
      ratio = (
        res["baseline"]["seconds_per_round"]
        / (res["fedjax_lite"]["seconds_per_round"])
      )
      res["speedup"] = ratio
      print(f"{name:11s} fedjax_lite is {ratio:.2f}x the baseline's speed")
    results[name] = res
  common.write_record(results, args.json)


if __name__ == "__main__":
  main()
