"""EMNIST CR: 62-class character recognition with a CNN (Reddi et al. 2021).

Federated EMNIST (3,400 writers, 62 classes; :func:`fl.datasets.emnist`),
FedJAX's CNN with dropout (``fl.models.emnist_cnn()``, 1,206,590
parameters), FedAvg / FedAdam / FedYogi with client SGD, settings of Reddi et
al. 2021, "Adaptive Federated Optimization" (ICLR), from their research code
(google-research/federated ``optimization/``). Run::

  python -m fedjax_lite run experiments/tasks/emnist_cr.py --set optimizer=fedyogi
  python -m fedjax_lite run experiments/tasks/emnist_cr.py:smoke     # seconds, offline

``data="generated"`` trains on random data of EMNIST's shapes and dtypes
(``x`` float32 ``[28, 28, 1]`` in ``[0, 1]``, ``y`` int32 in ``[0, 62)``).
Settings and published results: docs/benchmarks.md.
"""

import dataclasses

import fedjax_lite as fl  # first: applies the fast CPU settings
import numpy as np
import task_common

# optimizer -> log10 of (client lr, server lr, epsilon), row
# "emnist_character" of google-research/federated
# optimization/docs/hyperparameters.md ("Best hyperparameters").
TUNED = {
  "fedavg": (-1.0, 0.0, None),
  "fedadam": (-1.5, -2.5, -4.0),
  "fedyogi": (-1.5, -2.5, -4.0),
}


@dataclasses.dataclass(frozen=True)
class Config:
  """Every field can be overridden with --set name=value."""

  optimizer: str = "fedyogi"  # fedavg | fedadam | fedyogi
  client_lr: float | None = None  # None: TUNED[optimizer]
  server_lr: float | None = None  # None: TUNED[optimizer]
  epsilon: float | None = None  # None: TUNED[optimizer]; fedavg: none
  # hyperparameters.md "Default values", row emnist_character:
  clients_per_round: int = 10
  batch_size: int = 20
  num_rounds: int = 1500
  # hyperparameters.md "Cross-task hyperparameters": client_epochs 1
  num_epochs: int = 1
  # the research code evaluates every round on the whole test set
  # (main/federated_trainer.py: rounds_per_eval 1); every 10 here.
  eval_every: int = 10
  train_eval_clients: int | None = None  # None: min(100, train clients)
  seed: int = 0
  data: str = "real"  # real | generated
  data_dir: str | None = None  # None: $FEDJAX_LITE_DATA or ~/.cache/...
  search: tuple[str, ...] = ()  # folders that may hold fed_emnist.tar.bz2
  num_clients: int = 100  # generated data only
  examples_per_client: int = 40  # generated data only


def get_config(arg: str = "") -> Config:
  """``arg``: "" (the paper's settings) or "smoke" (seconds, offline)."""
  return fl.experiment.preset(
    Config(),
    arg,
    smoke=dict(
      data="generated",
      num_clients=4,
      examples_per_client=8,
      clients_per_round=2,
      batch_size=4,
      num_rounds=1,
      eval_every=1,
      train_eval_clients=0,
    ),
  )


def make_examples(rng: np.random.Generator, n: int) -> dict:
  """``n`` random examples of EMNIST's shapes and dtypes."""
  return {
    "x": rng.random((n, 28, 28, 1), dtype=np.float32),
    "y": rng.integers(0, 62, n).astype(np.int32),
  }


def generated_data(config: Config) -> tuple:
  """``(train, test)`` of random data of the real data's shapes and dtypes
  (``num_clients`` train and half as many test clients, from ``seed``)."""
  return task_common.generated_split(config, make_examples)


def build(config: Config) -> fl.experiment.Experiment:
  s = task_common.settings(config, TUNED)
  task_common.check_choice("data", config.data, task_common.DATA)
  if config.data == "real":
    train, test = fl.datasets.emnist(
      only_digits=False, data_dir=config.data_dir, search=config.search
    )
  else:
    train, test = generated_data(config)
  return task_common.experiment(
    config, s, fl.models.emnist_cnn(only_digits=False), train, test
  )
