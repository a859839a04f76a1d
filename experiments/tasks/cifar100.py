"""CIFAR-100 with TFF's ResNet-18 (group norm) (Reddi et al. 2021).

TFF's federated CIFAR-100 (500 train clients x 100 images, 100 test clients;
:func:`fl.datasets.cifar100`), random 24x24 crops and flips in training and
central crops in evaluation, both standardised per image
(:func:`fl.datasets.with_random_crop`, as the research code's
``utils/datasets/cifar100_dataset.py`` distorts training images); TFF's
ResNet-18 with group norm (``fl.models.resnet18_gn_tff()``, 11,218,212
parameters); FedAvg / FedAdam / FedYogi with client SGD, settings of Reddi et
al. 2021, "Adaptive Federated Optimization" (ICLR), from their research code
(google-research/federated ``optimization/``). Run::

  python -m fedjax_lite run experiments/tasks/cifar100.py --set optimizer=fedyogi
  python -m fedjax_lite run experiments/tasks/cifar100.py:smoke       # offline

``data="generated"`` trains on random data of the loader's shapes and dtypes
(``distort=True``: ``x`` float32 ``[32, 32, 3]`` pixels in ``[0, 255]``;
``distort=False``: ``[crop, crop, 3]`` standardised; ``y`` int32 in
``[0, 100)``). Settings and published results: docs/benchmarks.md.
"""

import dataclasses

import fedjax_lite as fl  # first: applies the fast CPU settings
import numpy as np
import task_common

# optimizer -> log10 of (client lr, server lr, epsilon), row
# "cifar100_image" of google-research/federated
# optimization/docs/hyperparameters.md ("Best hyperparameters").
TUNED = {
  "fedavg": (-1.0, 0.5, None),
  "fedadam": (-1.5, 0.0, -1.0),
  "fedyogi": (-1.5, 0.0, -1.0),
}


@dataclasses.dataclass(frozen=True)
class Config:
  """Every field can be overridden with --set name=value."""

  optimizer: str = "fedyogi"  # fedavg | fedadam | fedyogi
  client_lr: float | None = None  # None: TUNED[optimizer]
  server_lr: float | None = None  # None: TUNED[optimizer]
  epsilon: float | None = None  # None: TUNED[optimizer]; fedavg: none
  # hyperparameters.md "Default values", row cifar100_image:
  clients_per_round: int = 10
  batch_size: int = 20
  num_rounds: int = 4000
  # hyperparameters.md "Cross-task hyperparameters": client_epochs 1
  num_epochs: int = 1
  # hyperparameters.md "CIFAR-100 Image Classification": crop size 24
  crop: int = 24
  # random crops and flips in training (cifar100_dataset.py distorts
  # training images unless its datasets must be serialisable)
  distort: bool = True
  # the research code evaluates every round on the whole test set
  # (main/federated_trainer.py: rounds_per_eval 1); every 10 here.
  eval_every: int = 10
  train_eval_clients: int | None = None  # None: min(100, train clients)
  seed: int = 0
  data: str = "real"  # real | generated
  data_dir: str | None = None  # None: $FEDJAX_LITE_DATA or ~/.cache/...
  search: tuple[str, ...] = ()  # folders that may hold fed_cifar100.tar.bz2
  num_clients: int = 20  # generated data only
  examples_per_client: int = 100  # generated data only


def get_config(arg: str = "") -> Config:
  """``arg``: "" (the paper's settings) or "smoke" (seconds, offline)."""
  return fl.experiment.preset(
    Config(),
    arg,
    smoke=dict(
      data="generated",
      num_clients=2,
      examples_per_client=4,
      clients_per_round=2,
      batch_size=4,
      num_rounds=1,
      eval_every=1,
      train_eval_clients=0,
    ),
  )


def example_maker(config: Config):
  """``(rng, n) -> examples`` of the loader's shapes and dtypes for
  ``config``'s ``crop`` and ``distort``."""

  def make(rng: np.random.Generator, n: int) -> dict:
    if config.distort:
      x = rng.integers(0, 256, (n, 32, 32, 3)).astype(np.float32)
    else:
      x = rng.standard_normal((n, config.crop, config.crop, 3), np.float32)
    return {"x": x, "y": rng.integers(0, 100, n).astype(np.int32)}

  return make


def generated_data(config: Config) -> tuple:
  """``(train, test)`` of random data of the real data's shapes and dtypes
  (``num_clients`` train and half as many test clients, from ``seed``)."""
  return task_common.generated_split(config, example_maker(config))


def build(config: Config) -> fl.experiment.Experiment:
  s = task_common.settings(config, TUNED)
  task_common.check_choice("data", config.data, task_common.DATA)
  if config.data == "real":
    train, test = fl.datasets.cifar100(
      crop=config.crop,
      distort=config.distort,
      data_dir=config.data_dir,
      search=config.search,
    )
  else:
    train, test = generated_data(config)
  model = fl.models.resnet18_gn_tff((config.crop, config.crop, 3), 100)
  if config.distort:
    model = fl.datasets.with_random_crop(model, config.crop)
  return task_common.experiment(config, s, model, train, test)
