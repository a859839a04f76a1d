"""FedAvg on FedProx Synthetic(1, 1) with multinomial logistic regression.

30 clients with lognormal sizes, 10 sampled per round, 20 local epochs of SGD
with batch 10 (the FedProx paper's Synthetic(1, 1) setting). Run::

  python -m fedjax_lite run experiments/fedavg_synthetic.py           # 200 rounds
  python -m fedjax_lite run experiments/fedavg_synthetic.py:smoke     # seconds
  python -m fedjax_lite run experiments/fedavg_synthetic.py --set client_lr=0.003
  python -m fedjax_lite sweep experiments/fedavg_synthetic.py --seeds 8 \\
      --grid client_lr=0.003,0.01
  python -m fedjax_lite run experiments/fedavg_synthetic.py --set uplink=qsgd
  python -m fedjax_lite compare runs/fedavg_synthetic-* --out runs/cmp --x bytes

The curves show the global model's loss and accuracy on ``train_eval_clients``
training clients (``global_train_*``) and on the test clients (``test_*``),
every ``eval_every`` rounds, beside the mean local-training loss
(``train_loss``). ``uplink`` compresses the clients' updates
(``fl.compression``): "none", "top_k" (10% of the coordinates, error
feedback) or "qsgd" (16 levels); ``train_uplink_bytes`` is the mean bytes a
client sends, the x axis of ``compare --x bytes``.

Outputs go to runs/fedavg_synthetic-<timestamp>/ (curves.png, metrics.jsonl,
metrics.csv, config.json, checkpoint.msgpack).
"""

import dataclasses

import fedjax_lite as fl  # first: applies the fast CPU settings
import optax


@dataclasses.dataclass(frozen=True)
class Config:
  """Every field can be overridden with --set name=value."""

  num_rounds: int = 200
  clients_per_round: int = 10
  client_lr: float = 0.01
  server_lr: float = 1.0
  batch_size: int = 10
  num_epochs: int = 20
  alpha: float = 1.0
  beta: float = 1.0
  num_clients: int = 30
  seed: int = 0
  eval_every: int = 10
  train_eval_clients: int | None = None  # None: min(100, num_clients)
  uplink: str = "none"  # none | top_k | qsgd


def get_config(arg: str = "") -> Config:
  """``arg``: "" (the full run) or "smoke" (a few seconds)."""
  return fl.experiment.preset(
    Config(), arg, smoke=dict(num_rounds=3, num_epochs=1, eval_every=2)
  )


UPLINK = {
  "none": None,
  "top_k": lambda: fl.compression.top_k(0.1),
  "qsgd": lambda: fl.compression.qsgd(16),
}


def build(config: Config) -> fl.experiment.Experiment:
  if config.uplink not in UPLINK:
    raise fl.experiment.ConfigError(
      f"uplink must be one of {', '.join(UPLINK)}, got {config.uplink!r}."
    )
  train, test = fl.datasets.fedprox_synthetic(
    config.alpha, config.beta, num_clients=config.num_clients, seed=config.seed
  )
  model = fl.models.logistic_regression(60, 10)

  def algorithm_fn(h):  # h: name -> scalar (a traced one in vmapped sweeps)
    algorithm = fl.fed_avg(
      model, optax.sgd(h["client_lr"]), optax.sgd(h["server_lr"])
    )
    if UPLINK[config.uplink] is None:
      return algorithm
    return fl.compression.with_compression(algorithm, UPLINK[config.uplink]())

  return fl.experiment.Experiment(
    model=model,
    train=train,
    test=test,
    hparams={"client_lr": config.client_lr, "server_lr": config.server_lr},
    algorithm_fn=algorithm_fn,
    round_config=fl.RoundConfig(
      config.clients_per_round,
      fl.LocalWork(batch_size=config.batch_size, num_epochs=config.num_epochs),
    ),
    num_rounds=config.num_rounds,
    eval_every=config.eval_every,
    train_eval_clients=config.train_eval_clients,
    seed=config.seed,
  )
