"""Seconds per FedAvg round of pfl-research (PyTorch) on its CIFAR-10 workload.

Standalone: imports only numpy, torch, pfl and the standard library (no jax,
no fedjax_lite), so it runs in a separate environment with ``pfl`` installed.

Workload: 1,000 clients x 50 images (32x32x3 float32, standard normal from
``numpy.random.default_rng(seed)``, labels in [0, 10) from the same rng);
50 clients per round; 1 local epoch of batch 10 (5 steps) with client SGD
lr 0.1; server SGD lr 1.0 applying the mean model delta weighted by client
example counts (``WeightByDatapoints``); no DP. Model: pfl's benchmark
``simple_cnn`` (conv3x3 32, conv3x3 64, maxpool 2, dropout 0.25, dense 128,
dropout 0.5, dense 10; 1,626,442 parameters).

pfl's own machinery runs the rounds: ``FederatedDataset`` with a random user
sampler, ``SimulatedBackend``, ``FederatedAveraging`` and ``PyTorchModel``.
pfl evaluates the sampled users before and after local training on central
iteration 0 (``iteration % evaluation_frequency == 0``), so that iteration is
the warm-up round; ``evaluation_frequency`` is set past the last iteration so
that the timed rounds do no evaluation. A ``TrainingProcessCallback`` records
``time.perf_counter()`` after each central iteration. pfl prints its metrics
to stdout each iteration; they are sent to stderr here, so that stdout holds
only the final JSON line.

Run::

  python experiments/benchmarks/pfl_cifar10_worker.py --rounds 5
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
from torch import nn

import pfl
from pfl.aggregate.simulate import SimulatedBackend
from pfl.aggregate.weighting import WeightByDatapoints
from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
from pfl.callback.base import TrainingProcessCallback
from pfl.data import FederatedDataset
from pfl.data.dataset import Dataset
from pfl.data.sampling import get_user_sampler
from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
from pfl.metrics import Metrics, Weighted
from pfl.model.pytorch import PyTorchModel

NUM_CLIENTS = 1000
EXAMPLES_PER_CLIENT = 50
IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
BATCH_SIZE = 10
CLIENT_LR = 0.1
SERVER_LR = 1.0
NUM_PARAMS = 1_626_442
# Forward multiply-accumulates per example: conv1, conv2, dense, dense.
FORWARD_MACS = (
  30 * 30 * 32 * 27 + 28 * 28 * 64 * 288 + 12544 * 128 + 128 * NUM_CLASSES
)


class NHWCToNCHW(nn.Module):
  """pfl's benchmark ``Transpose2D``: TF-style images to PyTorch layout."""

  def forward(self, x):
    return x.permute(0, 3, 1, 2)


class SimpleCNN(nn.Sequential):
  """pfl's benchmark ``simple_cnn`` with its ``loss``/``metrics`` methods."""

  def __init__(self):
    super().__init__(
      NHWCToNCHW(),
      nn.Conv2d(3, 32, kernel_size=3),
      nn.ReLU(),
      nn.Conv2d(32, 64, kernel_size=3),
      nn.ReLU(),
      nn.MaxPool2d(2),
      nn.Dropout(0.25),
      nn.Flatten(),
      nn.Linear(14 * 14 * 64, 128),
      nn.ReLU(),
      nn.Dropout(0.5),
      nn.Linear(128, NUM_CLASSES),
    )
    for m in self.modules():  # Glorot uniform, as pfl's benchmark does.
      if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.xavier_uniform_(m.weight)

  def loss(self, inputs, targets, eval=False):
    self.eval() if eval else self.train()
    return nn.functional.cross_entropy(self(inputs), targets.long())

  @torch.no_grad()
  def metrics(self, inputs, targets, eval=True):
    self.eval() if eval else self.train()
    logits = self(inputs)
    loss = nn.functional.cross_entropy(logits, targets.long(), reduction="sum")
    correct = (logits.argmax(-1) == targets.long()).sum()
    n = len(inputs)
    return {
      "loss": Weighted(loss.item(), n),
      "accuracy": Weighted(correct.item(), n),
    }


class RoundTimer(TrainingProcessCallback):
  """Records wall time at the start and after every central iteration."""

  def __init__(self):
    self.times = []
    self.metrics = []

  def on_train_begin(self, *, model):
    self.times = [time.perf_counter()]
    return Metrics()

  def after_central_iteration(
    self, aggregate_metrics, model, *, central_iteration
  ):
    self.times.append(time.perf_counter())
    self.metrics.append(aggregate_metrics.to_simple_dict())
    return False, Metrics()


def make_federated_dataset(seed):
  """1,000 fixed users of 50 examples, sampled uniformly like pfl's CIFAR-10."""
  rng = np.random.default_rng(seed)
  n = NUM_CLIENTS * EXAMPLES_PER_CLIENT
  images = rng.standard_normal((n, *IMAGE_SHAPE), dtype=np.float32)
  labels = rng.integers(0, NUM_CLASSES, size=n)
  images = torch.from_numpy(images).split(EXAMPLES_PER_CLIENT)
  labels = torch.from_numpy(labels).split(EXAMPLES_PER_CLIENT)
  users = dict(enumerate(zip(images, labels)))
  sampler = get_user_sampler("random", list(users))
  return FederatedDataset.from_slices(users, sampler), users


def flat_params(model):
  return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def probe_loss(model, dataset):
  """Mean loss of the central model via pfl's own ``evaluate``."""
  metrics = model.evaluate(dataset, eval_params=NNEvalHyperParams(None))
  return metrics.to_simple_dict(to_lowercase=True)["loss"]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=5, help="timed rounds")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
    "--threads", type=int, default=len(os.sched_getaffinity(0))
  )
  parser.add_argument("--clients-per-round", type=int, default=50)
  args = parser.parse_args()

  torch.set_num_threads(args.threads)
  # pfl draws its sampling/algorithm seeds from numpy's global state.
  np.random.seed(args.seed)
  torch.manual_seed(args.seed)

  train_data, users = make_federated_dataset(args.seed)
  net = SimpleCNN()
  num_params = sum(p.numel() for p in net.parameters())
  assert num_params == NUM_PARAMS, num_params
  model = PyTorchModel(
    model=net,
    local_optimizer_create=torch.optim.SGD,
    central_optimizer=torch.optim.SGD(net.parameters(), SERVER_LR),
  )
  backend = SimulatedBackend(
    training_data=train_data,
    val_data=train_data,  # unused: val_cohort_size is None
    postprocessors=[WeightByDatapoints()],
  )
  iterations = args.rounds + 1
  algorithm_params = NNAlgorithmParams(
    central_num_iterations=iterations,
    evaluation_frequency=iterations + 1,  # only iteration 0 evaluates
    train_cohort_size=args.clients_per_round,
    val_cohort_size=None,
  )
  train_params = NNTrainHyperParams(
    local_learning_rate=CLIENT_LR,
    local_num_epochs=1,
    local_batch_size=BATCH_SIZE,
  )
  eval_params = NNEvalHyperParams(local_batch_size=None)  # full batch

  # Outside the timed window: central loss on the first 10 users' data.
  probe = Dataset(
    (
      torch.cat([users[u][0] for u in range(10)]),
      torch.cat([users[u][1] for u in range(10)]),
    )
  )
  loss_before = probe_loss(model, probe)
  params_before = flat_params(net)

  timer = RoundTimer()
  with contextlib.redirect_stdout(sys.stderr):
    model = FederatedAveraging().run(
      algorithm_params=algorithm_params,
      backend=backend,
      model=model,
      model_train_params=train_params,
      model_eval_params=eval_params,
      callbacks=[timer],
    )

  laps = np.diff(timer.times).tolist()
  timed = laps[1:]
  warmup_metrics = timer.metrics[0]
  evaluated = [k for m in timer.metrics[1:] for k in m if "local tr" in k]
  assert not evaluated, f"timed rounds evaluated: {evaluated}"
  result = {
    "system": "pfl",
    "pfl_version": pfl.__version__,
    "torch_version": torch.__version__,
    "threads": torch.get_num_threads(),
    "workload": "cifar10_simple_cnn",
    "num_clients": NUM_CLIENTS,
    "clients_per_round": args.clients_per_round,
    "examples_per_client": EXAMPLES_PER_CLIENT,
    "batch_size": BATCH_SIZE,
    "num_params": num_params,
    "forward_macs_per_example": FORWARD_MACS,
    "flops_per_example_train": 6 * FORWARD_MACS,
    "warmup_seconds": laps[0],
    "round_seconds": timed,
    "seconds_per_round": statistics.median(timed),
    "loadavg_1min": os.getloadavg()[0],  # includes this run
    "warmup_local_loss": {
      k: v for k, v in warmup_metrics.items() if "loss" in k
    },
    "probe_loss_before": loss_before,
    "probe_loss_after": probe_loss(model, probe),
    "param_change_l2": float((flat_params(net) - params_before).norm()),
    "devices_per_round": timer.metrics[-1].get(
      "Train population | number of devices"
    ),
  }
  print(json.dumps(result))


if __name__ == "__main__":
  main()
