"""FedMA on federated 8x8 digits (Dirichlet alpha = 0.5), clients of three
different architectures.

10 clients; client k's hidden width is ``client_base * client_fracs[k % 3]``
(64, 32, 16 units by default: three different MLPs, or CNNs with
``--set arch=cnn``); the global model may grow to ``hidden`` units per layer.
Every client takes part in every stage (FedMA matches all of them). One runner
round is one FedMA *stage* (hidden layers + the output layer per FedMA round,
see ``fedjax_lite.hetero.fed_ma``), so ``num_rounds`` counts stages and the
test metrics are evaluated after complete FedMA rounds. Run::

  python -m fedjax_lite run experiments/fed_ma_digits.py           # 20 FedMA rounds
  python -m fedjax_lite run experiments/fed_ma_digits.py:smoke     # seconds
  python -m fedjax_lite run experiments/fed_ma_digits.py --set arch=cnn

Outputs go to runs/fed_ma_digits-<timestamp>/.
"""

import dataclasses

import fedjax_lite as fl  # first: applies the fast CPU settings
import fedjax_lite.experiment  # noqa: F401  (fl.experiment)
import jax
import numpy as np
import optax

from fedjax_lite import hetero


@dataclasses.dataclass(frozen=True)
class Config:
  """Every field can be overridden with --set name=value."""

  arch: str = "mlp"  # "mlp" (64-h-10) or "cnn" (FedAvg CNN, 8x8)
  fedma_rounds: int = 20
  num_clients: int = 10
  alpha: float = 0.5
  hidden: int = 96  # bound on each global hidden layer
  client_base: int = 64  # the widest client
  client_fracs: str = "1,0.5,0.25"
  client_lr: float = 0.1
  batch_size: int = 16
  num_epochs: int = 2  # local epochs per stage
  noise_var: float | None = None  # None: from each layer's weights' scale
  seed: int = 0


def get_config(arg: str = "") -> Config:
  """``arg``: "" (the full run) or "smoke" (a few seconds)."""
  return fl.experiment.preset(
    Config(), arg, smoke=dict(fedma_rounds=1, num_epochs=1, num_clients=6)
  )


def model_and_widths(config: Config):
  """The bounding global model and every client's hidden widths."""
  fracs = [float(f) for f in config.client_fracs.split(",")]
  base = [max(1, int(round(config.client_base * f))) for f in fracs]
  if config.arch == "mlp":
    model = fl.models.mlp(64, 10, (config.hidden,))
    per = [[b] for b in base]
  elif config.arch == "cnn":
    # FedAvg CNN at digits scale: conv(c)-pool-conv(2c)-pool-dense(h).
    h = config.hidden
    model = fl.models.cnn(
      (8, 8, 1), 10, channels=(h // 4, h // 2), hidden=h, kernel_size=3
    )
    per = [[max(1, b // 4), max(1, b // 2), b] for b in base]
  else:
    raise ValueError(f"arch must be 'mlp' or 'cnn', got {config.arch!r}.")
  widths = np.array(
    [per[k % len(per)] for k in range(config.num_clients)], np.int32
  )
  return model, widths


def build(config: Config) -> fl.experiment.Experiment:
  train, test = fl.datasets.digits(
    num_clients=config.num_clients,
    partition="dirichlet",
    alpha=config.alpha,
    seed=config.seed,
  )
  model, widths = model_and_widths(config)
  stages = hetero.stages_per_round(model)

  def algorithm_fn(h):  # h: name -> scalar (a traced one in vmapped sweeps)
    return hetero.fed_ma(
      model,
      optax.sgd(h["client_lr"]),
      client_widths=widths,
      noise_var=config.noise_var,
      seed=config.seed,
    )

  return fl.experiment.Experiment(
    model=model,
    train=train,
    test=test,
    hparams={"client_lr": config.client_lr},
    algorithm_fn=algorithm_fn,
    round_config=fl.RoundConfig(
      config.num_clients,
      fl.LocalWork(batch_size=config.batch_size, num_epochs=config.num_epochs),
      sampling="all",
    ),
    num_rounds=config.fedma_rounds * stages,
    eval_every=stages,
    seed=config.seed,
    # The matching runs on the host inside the round: one device (see
    # fedjax_lite.hetero.fed_ma).
    mesh=fl.engine.default_mesh(jax.devices()[:1]),
  )
