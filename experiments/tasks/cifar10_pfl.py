"""pfl-research's CIFAR-10 benchmark: FedAvg with a small CNN.

CIFAR-10 cut into 1,000 clients of 50 images (:func:`fl.datasets.cifar10`,
pfl's IID or per-user Dirichlet partition), pfl's CNN
(``fl.models.simple_cnn((32, 32, 3), 10)``, 1,626,442 parameters), FedAvg
(client SGD, server SGD) with the settings of apple/pfl-research
``benchmarks/image_classification/configs/baseline.yaml`` and the commands
of ``benchmarks/image_classification/README.md``. pfl evaluates centrally on
the 10,000 test images every 10 rounds. Run::

  python -m fedjax_lite run experiments/tasks/cifar10_pfl.py                  # IID
  python -m fedjax_lite run experiments/tasks/cifar10_pfl.py --set partition=dirichlet num_rounds=3000
  python -m fedjax_lite run experiments/tasks/cifar10_pfl.py:smoke            # offline

Only ``optimizer=fedavg`` is a pfl benchmark setting; ``fedadam`` and
``fedyogi`` are refused (pfl's config has no tuned values for them).
``data="generated"`` trains on random data of the loader's shapes and dtypes
(``x`` float32 ``[32, 32, 3]`` normalised per channel, ``y`` int32 in
``[0, 10)``). Settings: docs/benchmarks.md.
"""

import dataclasses

import fedjax_lite as fl  # first: applies the fast CPU settings
import numpy as np
import task_common

# optimizer -> log10 of (client lr, server lr, epsilon): baseline.yaml
# local_learning_rate 0.1, learning_rate 1.0 (the central SGD optimizer of
# benchmarks/image_classification/pytorch/train.py).
TUNED = {"fedavg": (-1.0, 0.0, None)}


@dataclasses.dataclass(frozen=True)
class Config:
  """Every field can be overridden with --set name=value."""

  optimizer: str = "fedavg"  # fedavg only (pfl's benchmark)
  client_lr: float | None = None  # None: TUNED[optimizer]
  server_lr: float | None = None  # None: TUNED[optimizer]
  epsilon: float | None = None  # unused by fedavg
  # baseline.yaml: cohort_size 50, local_batch_size 10, local_num_epochs 1,
  # central_num_iterations 1500 (README.md: 3000 for non-IID "cifar10")
  clients_per_round: int = 50
  batch_size: int = 10
  num_epochs: int = 1
  num_rounds: int = 1500
  # baseline.yaml: mean_datapoints_per_user 50 (constant), so 1,000 users;
  # dataset cifar10_iid; partition_alpha 0.1 for the non-IID "cifar10"
  num_clients: int = 1000
  partition: str = "iid"  # iid | dirichlet
  alpha: float = 0.1
  # baseline.yaml: evaluation_frequency 10 (central evaluation on the test
  # set, val_cohort_size 0), central_eval_batch_size 10000
  eval_every: int = 10
  train_eval_clients: int | None = None  # None: min(100, train clients)
  eval_batch_size: int = 10000
  seed: int = 0
  data: str = "real"  # real | generated
  data_dir: str | None = None  # None: $FEDJAX_LITE_DATA or ~/.cache/...
  search: tuple[str, ...] = ()  # folders that may hold cifar-10-binary.tar.gz
  examples_per_client: int = 50  # generated data only


def get_config(arg: str = "") -> Config:
  """``arg``: "" (pfl's settings) or "smoke" (seconds, offline)."""
  return fl.experiment.preset(
    Config(),
    arg,
    smoke=dict(
      data="generated",
      num_clients=4,
      examples_per_client=4,
      clients_per_round=2,
      batch_size=2,
      num_rounds=1,
      eval_every=1,
      train_eval_clients=0,
      eval_batch_size=8,
    ),
  )


def make_examples(rng: np.random.Generator, n: int) -> dict:
  """``n`` random examples of the loader's shapes and dtypes."""
  return {
    "x": rng.standard_normal((n, 32, 32, 3), np.float32),
    "y": rng.integers(0, 10, n).astype(np.int32),
  }


def generated_data(config: Config) -> tuple:
  """``(train, test)`` of random data of the real data's shapes and dtypes:
  ``num_clients`` train clients and one central test client (as pfl
  evaluates), from ``seed``."""
  train = task_common.generated(
    make_examples, config.num_clients, config.examples_per_client, config.seed
  )
  test = task_common.generated(
    make_examples, 1, 2 * config.examples_per_client, config.seed + 1
  )
  return train, test


def build(config: Config) -> fl.experiment.Experiment:
  s = task_common.settings(config, TUNED)
  task_common.check_choice("data", config.data, task_common.DATA)
  if config.data == "real":
    train, test = fl.datasets.cifar10(
      num_clients=config.num_clients,
      partition=config.partition,
      alpha=config.alpha,
      seed=config.seed,
      data_dir=config.data_dir,
      search=config.search,
    )
  else:
    train, test = generated_data(config)
  return task_common.experiment(
    config,
    s,
    fl.models.simple_cnn((32, 32, 3), 10),
    train,
    test,
    eval_batch_size=config.eval_batch_size,
  )
