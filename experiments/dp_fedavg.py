"""User-level DP-FedAvg on LEAF Synthetic with 3,000 users.

DP-FedAvg (McMahan et al. 2018, arXiv:1710.06963) with adaptive clipping
(Andrew et al. 2021, arXiv:1905.03871): Poisson sampling of
``clients_per_round / num_clients`` of the users each round (a fixed cap of
slots, see fedjax_lite.privacy.dp), the clipped updates' sum noised by the
server and divided by the expected number of users. The noise multiplier is
calibrated to ``target_epsilon`` at ``delta`` after ``num_rounds`` rounds with
dp-accounting (RDP); ``target_epsilon=0`` uses ``noise_multiplier`` as given
(``noise_multiplier=0``: clipping only, no privacy). Every round's metrics
hold ``train_dp_epsilon`` (the epsilon spent so far). Run::

  python -m fedjax_lite run experiments/dp_fedavg.py               # eps = 4
  python -m fedjax_lite run experiments/dp_fedavg.py:smoke         # seconds
  python -m fedjax_lite run experiments/dp_fedavg.py --set target_epsilon=1
  python -m fedjax_lite run experiments/dp_fedavg.py --set local=True \\
      --set target_epsilon=0 --set noise_multiplier=0.5

Outputs go to runs/dp_fedavg-<timestamp>/ (metrics.jsonl with
train_dp_epsilon, curves.png, config.json, summary.json).
"""

import dataclasses

import fedjax_lite as fl  # first: applies the fast CPU settings
import fedjax_lite.experiment  # noqa: F401  (fl.experiment)
import optax
from fedjax_lite import privacy


@dataclasses.dataclass(frozen=True)
class Config:
  """Every field can be overridden with --set name=value."""

  num_rounds: int = 200
  num_clients: int = 3000
  clients_per_round: int = 100  # expected users per round (q N)
  sampling: str = "poisson"  # or "fixed" (exactly clients_per_round)
  target_epsilon: float = 4.0  # 0: use noise_multiplier as given
  noise_multiplier: float = 0.0
  delta: float = 1e-4  # < 1 / num_clients
  accountant: str = "rdp"
  clip: float = 0.5  # initial clip if adaptive
  adaptive: bool = True
  target_quantile: float = 0.5
  local: bool = False  # local DP (clients add the noise)
  client_lr: float = 0.1
  server_lr: float = 1.0
  server_momentum: float = 0.9
  batch_size: int = 10
  num_epochs: int = 1
  seed: int = 0
  eval_every: int = 20


def get_config(arg: str = "") -> Config:
  """``arg``: "" (the full run) or "smoke" (a few seconds)."""
  return fl.experiment.preset(
    Config(),
    arg,
    smoke=dict(
      num_rounds=3,
      num_clients=300,
      clients_per_round=20,
      eval_every=3,
      delta=1e-3,
    ),
  )


def noise_multiplier(config: Config) -> float:
  """The configured z, or the one calibrated to ``target_epsilon``."""
  if config.target_epsilon <= 0:
    return config.noise_multiplier
  return privacy.calibrate_noise_multiplier(
    config.target_epsilon,
    config.delta,
    config.num_rounds,
    sampling="local" if config.local else config.sampling,
    population=config.num_clients,
    clients_per_round=config.clients_per_round,
    accountant=config.accountant,
  )


def round_config(config: Config) -> fl.RoundConfig:
  """Poisson: a cap of slots that overflows with probability <= 1e-9 over
  the run; fixed: exactly ``clients_per_round``."""
  m = config.clients_per_round
  if config.sampling == "poisson":
    m = privacy.poisson_cap(
      config.num_clients,
      config.clients_per_round / config.num_clients,
      config.num_rounds,
    )
  return fl.RoundConfig(
    m, fl.LocalWork(batch_size=config.batch_size, num_epochs=config.num_epochs)
  )


def build(config: Config) -> fl.experiment.Experiment:
  train, test = fl.datasets.leaf_synthetic(
    num_clients=config.num_clients, seed=config.seed
  )
  model = fl.models.logistic_regression(60, 5)
  z = noise_multiplier(config)
  algorithm = privacy.dp_fed_avg(
    model,
    optax.sgd(config.client_lr),
    optax.sgd(config.server_lr, momentum=config.server_momentum or None),
    noise_multiplier=z,
    clients_per_round=config.clients_per_round,
    clip=config.clip,
    adaptive=config.adaptive and not config.local,
    local=config.local,
    target_quantile=config.target_quantile,
    sampling=config.sampling,
    population=config.num_clients,
    delta=config.delta,
    accountant=config.accountant,
    seed=config.seed,
    name=f"dp_fed_avg(z={z:.3g})",
  )
  return fl.experiment.Experiment(
    model=model,
    train=train,
    test=test,
    algorithm=algorithm,
    round_config=round_config(config),
    num_rounds=config.num_rounds,
    eval_every=config.eval_every,
    seed=config.seed,
  )
