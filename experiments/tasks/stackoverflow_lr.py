"""Stack Overflow LR: tag prediction with logistic regression (Reddi et al.
2021).

TFF's Stack Overflow (``fl.datasets.stackoverflow(task="tag")``: bags of
10,000 words, 500 tags), one-vs-rest logistic regression
(``fl.models.stackoverflow_tag_lr()``, 5,000,500 parameters), FedAvg /
FedAdam / FedYogi with client SGD, settings of Reddi et al. 2021, "Adaptive
Federated Optimization" (ICLR), from their research code
(google-research/federated ``optimization/``): at most 1,000 examples per
user, validation on 10,000 test examples drawn at random. The metric they
report is recall at 5 (``recall_at_5``; the token-weighted figure is the
ratio of the means of ``num_hits_at_5`` and ``num_labels``). Run::

  python -m fedjax_lite run experiments/tasks/stackoverflow_lr.py --set optimizer=fedyogi max_clients=2000
  python -m fedjax_lite run experiments/tasks/stackoverflow_lr.py:smoke    # offline

Loss scale: the research code sums the per-example loss over a batch
(``optimization/stackoverflow_lr/federated_stackoverflow_lr.py``:
``BinaryCrossentropy(reduction=SUM)``) while the engine averages it, so the
loss here is multiplied by ``batch_size`` (``sum_over_batch=True``): a full
batch then has the research code's gradient and its client learning rate
(a client's last, partial batch is scaled by ``batch_size`` too, where the
sum has fewer terms). Memory: every example is a dense ``[10000]`` row
(42 KB with its tags; the full train split does not fit in memory), so
``--set max_clients=N`` keeps the first ``N`` users of each split.
``data="generated"`` trains on random data of the loader's shapes and dtypes
(``x`` float32 ``[10000]`` word frequencies, ``y`` float32 ``[500]``
multi-hot). Settings and published results: docs/benchmarks.md.
"""

import dataclasses

import fedjax_lite as fl  # first: applies the fast CPU settings
import numpy as np
import task_common
from fedjax_lite.models.standard import sigmoid_cross_entropy

# optimizer -> log10 of (client lr, server lr, epsilon), row
# "stackoverflow_tag" of google-research/federated
# optimization/docs/hyperparameters.md ("Best hyperparameters").
TUNED = {
  "fedavg": (2.0, 0.0, None),
  "fedadam": (2.0, -0.5, -5.0),
  "fedyogi": (2.0, -0.5, -5.0),
}


@dataclasses.dataclass(frozen=True)
class Config:
  """Every field can be overridden with --set name=value."""

  optimizer: str = "fedyogi"  # fedavg | fedadam | fedyogi
  client_lr: float | None = None  # None: TUNED[optimizer]
  server_lr: float | None = None  # None: TUNED[optimizer]
  epsilon: float | None = None  # None: TUNED[optimizer]; fedavg: none
  # hyperparameters.md "Default values", row stackoverflor_tag:
  clients_per_round: int = 10
  batch_size: int = 100
  num_rounds: int = 1500
  # hyperparameters.md "Cross-task hyperparameters": client_epochs 1
  num_epochs: int = 1
  # hyperparameters.md "Stack Overflow TP" (and main/federated_trainer.py
  # so_lr_* flags): vocabularies, per-user cap, validation examples
  vocab_size: int = 10000
  num_tags: int = 500
  max_elements_per_user: int = 1000
  num_validation_examples: int = 10000
  sum_over_batch: bool = True  # loss x batch_size (module docstring)
  max_clients: int | None = None  # None: every user (does not fit in RAM)
  # the research code evaluates every round (rounds_per_eval 1); every 10
  eval_every: int = 10
  train_eval_clients: int | None = None  # None: min(100, train clients)
  seed: int = 0
  data: str = "real"  # real | generated
  data_dir: str | None = None  # None: $FEDJAX_LITE_DATA or ~/.cache/...
  search: tuple[str, ...] = ()  # folders that may hold TFF's archives
  num_clients: int = 20  # generated data only
  examples_per_client: int = 100  # generated data only


def get_config(arg: str = "") -> Config:
  """``arg``: "" (the paper's settings) or "smoke" (seconds, offline)."""
  return fl.experiment.preset(
    Config(),
    arg,
    smoke=task_common.SMOKE,
  )


def example_maker(config: Config):
  """``(rng, n) -> examples`` of ``stackoverflow(task="tag")``'s shapes:
  word frequencies over 1-30 words (a row sums to at most 1) and 1-5 tags."""
  v, t = config.vocab_size, config.num_tags

  def make(rng: np.random.Generator, n: int) -> dict:
    x = np.zeros((n, v), np.float32)
    y = np.zeros((n, t), np.float32)
    for i in range(n):
      words = rng.integers(0, v + v // 10, int(rng.integers(1, 31)))
      known = words[words < v]  # the rest stand for out-of-vocabulary words
      np.add.at(x[i], known, np.float32(1.0 / words.size))
      y[i, rng.choice(t, int(rng.integers(1, 6)), replace=False)] = 1.0
    return {"x": x, "y": y}

  return make


def generated_data(config: Config) -> tuple:
  """``(train, test)`` of random data of the real data's shapes and dtypes
  (``num_clients`` train and half as many test clients, from ``seed``)."""
  return task_common.generated_split(config, example_maker(config))


def build(config: Config) -> fl.experiment.Experiment:
  s = task_common.settings(config, TUNED)
  task_common.check_choice("data", config.data, task_common.DATA)
  if config.data == "real":
    train, test = fl.datasets.stackoverflow(
      task="tag",
      vocab_size=config.vocab_size,
      num_tags=config.num_tags,
      data_dir=config.data_dir,
      search=config.search,
      max_clients=config.max_clients,
    )
    train = task_common.cap_examples(train, config.max_elements_per_user)
    test = task_common.sample_examples(
      test, config.num_validation_examples, config.seed
    )
  else:
    train, test = generated_data(config)
  model = fl.models.stackoverflow_tag_lr(config.vocab_size, config.num_tags)
  if config.sum_over_batch:
    scale = float(config.batch_size)
    model = dataclasses.replace(
      model, loss=lambda z, y: scale * sigmoid_cross_entropy(z, y)
    )
  return task_common.experiment(config, s, model, train, test)
