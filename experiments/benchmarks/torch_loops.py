"""Seconds per round of a hand-written PyTorch per-client FedAvg loop.

Standalone: imports only numpy, torch, the standard library and this folder's
``common.py`` (standard library only), no JAX. This is the
loop a PyTorch user writes: for each sampled client, load the global weights
into the model, run local SGD over its batches (1 epoch, in order) and add
its example-weighted model delta; the server then applies the weighted mean
delta with SGD lr 1.0. A round includes all of that; data is generated once
up front from ``numpy.random.default_rng(seed)`` for a pool of 100 clients,
of which each round samples ``clients_per_round`` without replacement.

Workloads (``--workload``):

* ``charlstm``: LEAF Shakespeare char-LSTM. Embedding 80 -> 8, two stacked
  LSTM layers of 256 units, dense 256 -> 80 on the last step's output;
  int64 inputs [batch, 80] uniform in [0, 80), one label per sequence.
  10 clients/round x 100 sequences, batch 10 (10 steps), client lr 0.8.
* ``resnet18gn``: torchvision-layout ResNet-18 with GroupNorm(2 groups) in
  place of every BatchNorm, 100 classes; float32 NHWC 24x24x3 inputs
  (permuted to NCHW in the model). 10 clients/round x 100 images, batch 20
  (5 steps), client lr 0.1.

``flops_per_example_train`` is 6 x forward multiply-accumulates per example
(conv, LSTM and dense matmuls only), from closed-form layer formulas.

Run::

  python experiments/benchmarks/torch_loops.py --workload charlstm
  python experiments/benchmarks/torch_loops.py --workload resnet18gn
"""

import argparse
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (the benchmarks' shared helpers)

NUM_CLIENTS = 100
SERVER_LR = 1.0
WORKLOADS = {
  "charlstm": dict(clients_per_round=10, examples=100, batch=10, lr=0.8),
  "resnet18gn": dict(clients_per_round=10, examples=100, batch=20, lr=0.1),
}
# torch.nn.LSTM has two bias vectors per layer (Keras/LEAF: one, 817,872).
NUM_PARAMS = {"charlstm": 819_920, "resnet18gn": 11_227_812}

# charlstm
VOCAB, EMBED, HIDDEN, SEQ_LEN = 80, 8, 256, 80
# resnet18gn
IMAGE, CLASSES, GROUPS = 24, 100, 2
STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))


class CharLSTM(nn.Module):
  def __init__(self):
    super().__init__()
    self.embed = nn.Embedding(VOCAB, EMBED)
    self.lstm = nn.LSTM(EMBED, HIDDEN, num_layers=2, batch_first=True)
    self.dense = nn.Linear(HIDDEN, VOCAB)

  def forward(self, x):
    h, _ = self.lstm(self.embed(x))
    return self.dense(h[:, -1])


def charlstm_macs():
  lstm = 4 * HIDDEN * (EMBED + HIDDEN) + 4 * HIDDEN * (2 * HIDDEN)
  return SEQ_LEN * lstm + HIDDEN * VOCAB


def conv(cin, cout, k, stride):
  return nn.Conv2d(cin, cout, k, stride, padding=k // 2, bias=False)


class BasicBlock(nn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1 = conv(cin, cout, 3, stride)
    self.gn1 = nn.GroupNorm(GROUPS, cout)
    self.conv2 = conv(cout, cout, 3, 1)
    self.gn2 = nn.GroupNorm(GROUPS, cout)
    self.downsample = None
    if stride != 1 or cin != cout:
      self.downsample = nn.Sequential(
        conv(cin, cout, 1, stride), nn.GroupNorm(GROUPS, cout)
      )

  def forward(self, x):
    out = F.relu(self.gn1(self.conv1(x)))
    out = self.gn2(self.conv2(out))
    shortcut = x if self.downsample is None else self.downsample(x)
    return F.relu(out + shortcut)


class ResNet18GN(nn.Module):
  def __init__(self):
    super().__init__()
    self.stem = nn.Sequential(
      conv(3, 64, 7, 2),
      nn.GroupNorm(GROUPS, 64),
      nn.ReLU(),
      nn.MaxPool2d(3, 2, padding=1),
    )
    blocks, cin = [], 64
    for cout, stride in STAGES:
      blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
      cin = cout
    self.blocks = nn.Sequential(*blocks)
    self.fc = nn.Linear(512, CLASSES)

  def forward(self, x):
    x = self.blocks(self.stem(x.permute(0, 3, 1, 2)))
    return self.fc(x.mean(dim=(2, 3)))


def resnet18gn_macs():
  def out(h, k, s):
    return (h + 2 * (k // 2) - k) // s + 1

  h = out(IMAGE, 7, 2)
  macs = h * h * 64 * 3 * 49
  h, cin = out(h, 3, 2), 64  # max pool
  for cout, stride in STAGES:
    for s in (stride, 1):
      h = out(h, 3, s)
      macs += h * h * cout * 9 * (cin + cout)
      if s != 1 or cin != cout:
        macs += h * h * cout * cin
      cin = cout
  return macs + 512 * CLASSES


def make_data(workload, examples, seed):
  """Per-client (inputs, labels) tensors for the client pool."""
  rng = np.random.default_rng(seed)
  shape = (NUM_CLIENTS, examples)
  if workload == "charlstm":
    x = rng.integers(0, VOCAB, size=(*shape, SEQ_LEN))
    y = rng.integers(0, VOCAB, size=shape)
  else:
    x = rng.standard_normal((*shape, IMAGE, IMAGE, 3), dtype=np.float32)
    y = rng.integers(0, CLASSES, size=shape)
  x, y = torch.from_numpy(x), torch.from_numpy(y)
  return [(x[c], y[c]) for c in range(NUM_CLIENTS)]


def fedavg_round(model, global_params, data, clients, batch, lr):
  """One FedAvg round; updates ``global_params`` in place, returns loss."""
  params = list(model.parameters())
  acc = [torch.zeros_like(g) for g in global_params]
  optimizer = torch.optim.SGD(params, lr=lr)  # plain SGD: no state
  losses, total = [], 0
  model.train()
  for c in clients:
    x, y = data[c]
    with torch.no_grad():
      for p, g in zip(params, global_params):
        p.copy_(g)
    for s in range(0, len(x), batch):
      optimizer.zero_grad()
      loss = F.cross_entropy(model(x[s : s + batch]), y[s : s + batch])
      loss.backward()
      optimizer.step()
      losses.append(loss.detach())
    with torch.no_grad():
      for a, p, g in zip(acc, params, global_params):
        a.add_(p - g, alpha=len(x))
    total += len(x)
  with torch.no_grad():
    for g, a in zip(global_params, acc):
      g.add_(a, alpha=SERVER_LR / total)
  return torch.stack(losses).mean().item()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workload", choices=sorted(WORKLOADS), required=True)
  parser.add_argument("--rounds", type=int, default=3, help="timed rounds")
  parser.add_argument(
    "--threads", type=int, default=len(os.sched_getaffinity(0))
  )
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  cfg = WORKLOADS[args.workload]

  torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)
  if args.workload == "charlstm":
    model, macs = CharLSTM(), charlstm_macs()
  else:
    model, macs = ResNet18GN(), resnet18gn_macs()
  num_params = sum(p.numel() for p in model.parameters())
  assert num_params == NUM_PARAMS[args.workload], num_params
  data = make_data(args.workload, cfg["examples"], args.seed)
  sampler = np.random.default_rng(args.seed + 1)
  global_params = [p.detach().clone() for p in model.parameters()]
  initial = torch.cat([g.reshape(-1) for g in global_params])

  losses, holder = [], {}

  def sample(_):  # untimed: the round's clients
    holder["clients"] = sampler.choice(
      NUM_CLIENTS, cfg["clients_per_round"], False
    )

  def one_round():
    losses.append(
      fedavg_round(
        model, global_params, data, holder["clients"], cfg["batch"], cfg["lr"]
      )
    )

  timing = common.time_calls(one_round, args.rounds, before=sample)

  final = torch.cat([g.reshape(-1) for g in global_params])
  print(
    json.dumps(
      {
        "system": "torch_loop",
        "workload": args.workload,
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        **cfg,
        "num_params": num_params,
        "forward_macs_per_example": macs,
        "flops_per_example_train": 6 * macs,
        **timing,
        "round_train_loss": losses,
        "param_change_l2": float((final - initial).norm()),
      }
    )
  )


if __name__ == "__main__":
  main()
