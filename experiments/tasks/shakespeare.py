"""Shakespeare next-character prediction with a 2-layer LSTM (Reddi et al.
2021).

TFF's Shakespeare (715 roles; ``fl.datasets.shakespeare(source="tff")``,
FedJAX's preprocessing: rows of 80 characters, a target at every position),
the character LSTM (``fl.models.shakespeare_lstm()``, 820,522 parameters),
FedAvg / FedAdam / FedYogi with client SGD, settings of Reddi et al. 2021,
"Adaptive Federated Optimization" (ICLR), from their research code
(google-research/federated ``optimization/``). The metric they report is
``accuracy_no_oov_no_eos``. Run::

  python -m fedjax_lite run experiments/tasks/shakespeare.py --set optimizer=fedyogi
  python -m fedjax_lite run experiments/tasks/shakespeare.py:smoke    # offline

``data="generated"`` trains on random data of the loader's shapes and dtypes
(``x``, ``y`` int32 ``[80]`` in ``[0, 90)``, laid out as snippets ``BOS
chars EOS`` padded with PAD). Settings and published results:
docs/benchmarks.md.
"""

import dataclasses

import fedjax_lite as fl  # first: applies the fast CPU settings
import numpy as np
import task_common
from fedjax_lite.datasets.shakespeare import (
  FEDJAX_CHARS,
  fedjax_char_sequences,
)

# optimizer -> log10 of (client lr, server lr, epsilon), row
# "shakespeare_character" of google-research/federated
# optimization/docs/hyperparameters.md ("Best hyperparameters").
TUNED = {
  "fedavg": (0.0, 0.0, None),
  "fedadam": (0.0, -2.0, -3.0),
  "fedyogi": (0.0, -2.0, -3.0),
}


@dataclasses.dataclass(frozen=True)
class Config:
  """Every field can be overridden with --set name=value."""

  optimizer: str = "fedyogi"  # fedavg | fedadam | fedyogi
  client_lr: float | None = None  # None: TUNED[optimizer]
  server_lr: float | None = None  # None: TUNED[optimizer]
  epsilon: float | None = None  # None: TUNED[optimizer]; fedavg: none
  # hyperparameters.md "Default values", row shakespeare_character:
  clients_per_round: int = 10
  batch_size: int = 4
  num_rounds: int = 1200
  # hyperparameters.md "Cross-task hyperparameters": client_epochs 1
  num_epochs: int = 1
  # hyperparameters.md "Shakespeare Character Prediction": length 80
  seq_len: int = 80
  # the research code evaluates every round on the whole test set
  # (main/federated_trainer.py: rounds_per_eval 1); every 10 here.
  eval_every: int = 10
  train_eval_clients: int | None = None  # None: min(100, train clients)
  seed: int = 0
  data: str = "real"  # real | generated
  data_dir: str | None = None  # None: $FEDJAX_LITE_DATA or ~/.cache/...
  search: tuple[str, ...] = ()  # folders that may hold shakespeare.tar.bz2
  num_clients: int = 50  # generated data only
  examples_per_client: int = 20  # generated data only


def get_config(arg: str = "") -> Config:
  """``arg``: "" (the paper's settings) or "smoke" (seconds, offline)."""
  return fl.experiment.preset(
    Config(),
    arg,
    smoke=task_common.SMOKE,
  )


def example_maker(config: Config):
  """``(rng, n) -> examples`` laid out as ``shakespeare(source="tff")``:
  snippets of random characters joined as ``BOS chars EOS``, cut into
  ``n`` rows of ``seq_len`` (the last padded with PAD)."""
  length = config.seq_len

  def make(rng: np.random.Generator, n: int) -> dict:
    snippets = []
    while sum(len(s) + 2 for s in snippets) < n * length + 1:
      size = int(rng.integers(1, 2 * length))
      chars = rng.integers(0, len(FEDJAX_CHARS), size)
      snippets.append(bytes(FEDJAX_CHARS[i] for i in chars))
    x, y = fedjax_char_sequences(snippets, length)
    return {"x": x[:n], "y": y[:n]}

  return make


def generated_data(config: Config) -> tuple:
  """``(train, test)`` of random data of the real data's shapes and dtypes
  (``num_clients`` train and half as many test clients, from ``seed``)."""
  return task_common.generated_split(config, example_maker(config))


def build(config: Config) -> fl.experiment.Experiment:
  s = task_common.settings(config, TUNED)
  task_common.check_choice("data", config.data, task_common.DATA)
  if config.data == "real":
    train, test = fl.datasets.shakespeare(
      source="tff",
      seq_len=config.seq_len,
      data_dir=config.data_dir,
      search=config.search,
    )
  else:
    train, test = generated_data(config)
  model = fl.models.shakespeare_lstm(seq_len=config.seq_len)
  return task_common.experiment(config, s, model, train, test)
