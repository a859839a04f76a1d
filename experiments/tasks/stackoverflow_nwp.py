"""Stack Overflow NWP: next-word prediction with a 1-layer LSTM (Reddi et
al. 2021).

TFF's Stack Overflow (342,477 train users; ``fl.datasets.stackoverflow(
task="nwp")``: 10,000 words, sequences of 20, FedJAX's token ids), the LSTM
(``fl.models.stackoverflow_nwp_lstm()``: embedding 96, LSTM 670, projection
96; 4,050,748 parameters), FedAvg / FedAdam / FedYogi with client SGD,
settings of Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR), from
their research code (google-research/federated ``optimization/``): at most
1,000 sentences per user, validation on 10,000 test sentences drawn at
random. The metric they report is ``accuracy_no_oov_no_eos``. Run::

  python -m fedjax_lite run experiments/tasks/stackoverflow_nwp.py --set optimizer=fedyogi
  python -m fedjax_lite run experiments/tasks/stackoverflow_nwp.py:smoke   # offline

Memory: the full train split is 21.7 GB as dense arrays (see
``fedjax_lite/datasets/stackoverflow.py``); ``--set max_clients=N`` keeps
the first ``N`` users of each split. ``data="generated"`` trains on random
data of the loader's shapes and dtypes (``x``, ``y`` int32 ``[20]``, BOS
then word ids then EOS and PAD). Settings and published results:
docs/benchmarks.md.
"""

import dataclasses

import fedjax_lite as fl  # first: applies the fast CPU settings
import numpy as np
import task_common

# optimizer -> log10 of (client lr, server lr, epsilon), row
# "stackoverflow_word" of google-research/federated
# optimization/docs/hyperparameters.md ("Best hyperparameters").
TUNED = {
  "fedavg": (-0.5, 0.0, None),
  "fedadam": (-0.5, -2.0, -5.0),
  "fedyogi": (-0.5, -2.0, -5.0),
}


@dataclasses.dataclass(frozen=True)
class Config:
  """Every field can be overridden with --set name=value."""

  optimizer: str = "fedyogi"  # fedavg | fedadam | fedyogi
  client_lr: float | None = None  # None: TUNED[optimizer]
  server_lr: float | None = None  # None: TUNED[optimizer]
  epsilon: float | None = None  # None: TUNED[optimizer]; fedavg: none
  # hyperparameters.md "Default values", row stackoverflow_word:
  clients_per_round: int = 50
  batch_size: int = 16
  num_rounds: int = 1500
  # hyperparameters.md "Cross-task hyperparameters": client_epochs 1
  num_epochs: int = 1
  # hyperparameters.md "Stack Overflow NWP" (and main/federated_trainer.py
  # so_nwp_* flags): vocabulary, sequence length, per-user cap, validation
  vocab_size: int = 10000
  sequence_length: int = 20
  max_elements_per_user: int = 1000
  num_validation_examples: int = 10000
  max_clients: int | None = None  # None: every user (21.7 GB of train rows)
  # the research code evaluates every round (rounds_per_eval 1); every 10
  eval_every: int = 10
  train_eval_clients: int | None = None  # None: min(100, train clients)
  seed: int = 0
  data: str = "real"  # real | generated
  data_dir: str | None = None  # None: $FEDJAX_LITE_DATA or ~/.cache/...
  search: tuple[str, ...] = ()  # folders that may hold TFF's archives
  num_clients: int = 100  # generated data only
  examples_per_client: int = 32  # generated data only


def get_config(arg: str = "") -> Config:
  """``arg``: "" (the paper's settings) or "smoke" (seconds, offline)."""
  return fl.experiment.preset(
    Config(),
    arg,
    smoke=task_common.SMOKE,
  )


def example_maker(config: Config):
  """``(rng, n) -> examples`` laid out as ``stackoverflow(task="nwp")``
  with FedJAX's ids (PAD 0, BOS 1, EOS 2, words ``3 .. V+2``, OOV
  ``V+3``)."""
  tokens = fl.datasets.stackoverflow_special_tokens(config.vocab_size)

  def make(rng: np.random.Generator, n: int) -> dict:
    return task_common.token_sequences(
      rng,
      n,
      config.sequence_length,
      tokens.pad,
      tokens.bos,
      tokens.eos,
      tokens.first_word,
      tokens.oov,
    )

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
      task="nwp",
      vocab_size=config.vocab_size,
      sequence_length=config.sequence_length,
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
  model = fl.models.stackoverflow_nwp_lstm(
    config.vocab_size, seq_len=config.sequence_length
  )
  return task_common.experiment(config, s, model, train, test)
