"""Byzantine robustness and compressed uplinks: FedAvg on federated digits.

100 clients (8x8 digits, Dirichlet alpha = 0.5 label skew), all of them in
every round, an MLP 64-32-10, 2 local epochs of SGD (batch 10). A fixed,
seeded ``byzantine_fraction`` of the clients follows ``attack``; the server
reduces the updates with ``aggregator``; clients may compress their uplink
(``compression``). Run::

  python -m fedjax_lite run experiments/robustness_digits.py           # 30 rounds
  python -m fedjax_lite run experiments/robustness_digits.py:smoke     # seconds
  python -m fedjax_lite run experiments/robustness_digits.py \\
      --set aggregator=coordinate_median --set attack=alie
  python -m fedjax_lite run experiments/robustness_digits.py \\
      --set attack=none --set compression=top_k --set topk_density=0.1
  python -m fedjax_lite sweep experiments/robustness_digits.py \\
      --grid byzantine_fraction=0.1,0.2,0.3

Attacks (fedjax_lite.attacks): ``sign_flip`` sends ``-4 Delta``; ``scaling``
trains on flipped labels and boosts that update tenfold (explicit boosting,
Bhagoji et al. 2019; ``--set scaling_poison=false`` boosts the honest
update instead); ``gaussian`` sends ``N(0, 1)`` noise; ``label_flip`` trains
on ``y -> 9 - y``; ``alie`` and ``ipm`` (epsilon 0.5) are omniscient;
``nan`` sends NaN in every coordinate (the engine drops such updates before
any aggregator sees them, ``RoundConfig(nonfinite="drop")``).

The references for an attack are runs without the Byzantine clients:
``--set byzantine_absent=removed`` leaves them out of the data (the other
clients are renumbered, so their random streams differ: compare means over
seeds); ``--set byzantine_absent=silent`` keeps them in the population but
makes them send nothing (aggregation weight 0), so every other client
trains exactly as in the attacked run::

  python -m fedjax_lite run experiments/robustness_digits.py \\
      --set attack=nan --set aggregator=krum
  python -m fedjax_lite run experiments/robustness_digits.py \\
      --set byzantine_absent=removed --set aggregator=krum

``attack="select"`` makes the attack the sweepable hyperparameter
``attack_index`` (an index into ATTACKS), so one compiled round covers every
attack (``--grid attack_index=0,1,2,3,4,5,6``); experiments/
experiments/benchmarks/robustness.py sweeps it that way.

Names: ``aggregator`` in AGGREGATORS, ``attack`` in ATTACKS (or "select"),
``compression`` in COMPRESSIONS ("dense" is uncompressed but reports
``uplink_bytes``).
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import optax

import fedjax_lite as fl  # applies the fast CPU settings (before JAX runs)
import fedjax_lite.experiment  # fl.experiment
from fedjax_lite import aggregators as aggs
from fedjax_lite import attacks
from fedjax_lite import compression as comp

ATTACKS = (
  "none",
  "sign_flip",
  "scaling",
  "gaussian",
  "label_flip",
  "alie",
  "ipm",
)
AGGREGATORS = (
  "weighted_mean",
  "coordinate_median",
  "trimmed_mean",
  "krum",
  "multi_krum",
  "geometric_median",
  "centered_clipping",
  "clipped_mean",
)
# Attacks outside the sweepable ATTACKS list (attack="select").
OTHER_ATTACKS = ("nan",)
ABSENT = ("no", "removed", "silent")
COMPRESSIONS = ("none", "dense", "top_k", "qsgd", "sign_ef")


@dataclasses.dataclass(frozen=True)
class Config:
  """Every field can be overridden with --set name=value."""

  aggregator: str = "weighted_mean"
  attack: str = "sign_flip"  # a name in ATTACKS, or "select"
  byzantine_fraction: float = 0.2
  byzantine_seed: int = 0
  # "no", or the run an attack is compared with: "removed" (the Byzantine
  # clients are left out of the data) or "silent" (they send nothing).
  byzantine_absent: str = "no"
  compression: str = "none"
  topk_density: float = 0.1
  qsgd_levels: int = 16
  # Attack strengths.
  sign_flip_scale: float = 4.0  # sign_flip: Delta -> -4 Delta
  scale_factor: float = 10.0  # scaling: Delta -> 10 Delta, trained
  scaling_poison: bool = True  # on flipped labels (boosted poison)
  gaussian_std: float = 1.0  # gaussian: Delta -> N(0, 1)
  ipm_epsilon: float = 0.5
  alie_z: float = 0.0  # 0: the paper's z_max(n, f)
  # Aggregator parameters (f: the Byzantine count tolerated, per round).
  num_byzantine: int = 30  # krum / multi-krum f
  multi_krum_m: int = 0  # multi-krum's m (0: clients_per_round - f)
  trim_beta: float = 0.3
  cc_tau: float = 1.0  # centered clipping radius
  clip_norm: float = 1.0  # clipped mean: initial C (adaptive)
  # Training.
  num_rounds: int = 30
  num_clients: int = 100
  clients_per_round: int = 100
  alpha: float = 0.5
  hidden: int = 32
  client_lr: float = 0.3
  batch_size: int = 10
  num_epochs: int = 2
  seed: int = 0
  eval_every: int = 10


def get_config(arg: str = "") -> Config:
  """``arg``: "" (the full run) or "smoke" (a few seconds)."""
  return fl.experiment.preset(
    Config(),
    arg,
    smoke=dict(
      num_rounds=2,
      num_clients=20,
      clients_per_round=20,
      num_byzantine=4,
      num_epochs=1,
      eval_every=1,
    ),
  )


def make_aggregator(config: Config, clients_per_round: int | None = None):
  """The aggregator named by ``config.aggregator`` (``clients_per_round``:
  the round's, default the config's)."""
  cpr = clients_per_round or config.clients_per_round
  name = config.aggregator
  if name == "weighted_mean":
    return aggs.weighted_mean()
  if name == "coordinate_median":
    return aggs.coordinate_median()
  if name == "trimmed_mean":
    return aggs.trimmed_mean(config.trim_beta)
  if name == "krum":
    return aggs.krum(config.num_byzantine)
  if name == "multi_krum":
    return aggs.krum(
      config.num_byzantine,
      multi=config.multi_krum_m or cpr - config.num_byzantine,
    )
  if name == "geometric_median":
    return aggs.geometric_median()
  if name == "centered_clipping":
    return aggs.centered_clipping(config.cc_tau, iters=1)
  if name == "clipped_mean":
    return aggs.clipped(
      aggs.weighted_mean(), config.clip_norm, adaptive=True, target_quantile=0.5
    )
  raise ValueError(f"aggregator must be one of {AGGREGATORS}, got {name!r}.")


def make_attack(config: Config, name: str) -> attacks.Attack:
  """The attack called ``name`` with the config's strengths."""
  if name == "none":
    return attacks.no_attack()
  if name == "sign_flip":
    return attacks.sign_flip(config.sign_flip_scale)
  if name == "scaling":
    if config.scaling_poison:  # boosted label-flip update (Bhagoji et al.)
      return attacks.combine(
        attacks.label_flip(10),
        attacks.scaling(config.scale_factor),
        name="scaling",
      )
    return attacks.scaling(config.scale_factor)
  if name == "gaussian":
    return attacks.gaussian(config.gaussian_std)
  if name == "label_flip":
    return attacks.label_flip(10)
  if name == "alie":
    return attacks.alie(config.alie_z or None)
  if name == "ipm":
    return attacks.ipm(config.ipm_epsilon)
  if name == "nan":
    return attacks.nonfinite()
  raise ValueError(
    f"attack must be one of {ATTACKS + OTHER_ATTACKS} or 'select', got "
    f"{name!r}."
  )


def make_compressor(config: Config):
  name = config.compression
  if name == "none":
    return None
  if name == "dense":  # uncompressed, but counts the uplink bytes
    return comp.no_compression()
  if name == "top_k":
    return comp.top_k(config.topk_density)
  if name == "qsgd":
    return comp.qsgd(config.qsgd_levels)
  if name == "sign_ef":
    return comp.sign_ef()
  raise ValueError(f"compression must be one of {COMPRESSIONS}, got {name!r}.")


def silent(alg, mask):
  """``alg`` whose clients in ``mask`` send nothing (aggregation weight 0):
  every client still trains with its own random stream, so the run differs
  from the attacked one only by what those clients send."""

  def client_update(server_params, client_state, data, rng):
    out = alg.client_update(server_params, client_state, data, rng)
    gone = jnp.asarray(mask)[data.client_id]
    return out._replace(weight=jnp.where(gone, 0.0, out.weight))

  return alg._replace(client_update=client_update)


def build(config: Config) -> fl.experiment.Experiment:
  train, test = fl.datasets.digits(
    config.num_clients, "dirichlet", alpha=config.alpha, seed=config.seed
  )
  if config.byzantine_absent not in ABSENT:
    raise ValueError(
      f"byzantine_absent must be one of {ABSENT}, got "
      f"{config.byzantine_absent!r}."
    )
  removed = config.byzantine_absent == "removed"
  clients_per_round = config.clients_per_round
  if removed:
    byzantine = attacks.byzantine_mask(
      config.num_clients, config.byzantine_fraction, config.byzantine_seed
    )
    train = train.subset(np.flatnonzero(~byzantine))
    clients_per_round = round(
      config.clients_per_round * train.num_clients / config.num_clients
    )
  model = fl.models.mlp(64, 10, (config.hidden,))
  aggregator = make_aggregator(config, clients_per_round)
  compressor = make_compressor(config)
  select = config.attack == "select"
  if not select:
    make_attack(config, config.attack)  # check the name early
  choices = tuple(make_attack(config, a) for a in ATTACKS)

  def algorithm_fn(h):  # h: name -> scalar (traced in vectorized sweeps)
    alg = fl.fed_avg(model, optax.sgd(h["client_lr"]), aggregator=aggregator)
    if compressor is not None:
      alg = comp.with_compression(alg, compressor)
    attack = (
      attacks.select_attack(h["attack_index"], choices)
      if select
      else make_attack(config, config.attack)
    )
    mask = attacks.byzantine_mask(
      train.num_clients,
      0.0 if removed else h["byzantine_fraction"],
      config.byzantine_seed,
    )
    if config.byzantine_absent == "silent":
      return silent(attacks.with_attack(alg, attacks.no_attack(), mask), mask)
    return attacks.with_attack(alg, attack, mask)

  hparams = {
    "client_lr": config.client_lr,
    "byzantine_fraction": config.byzantine_fraction,
  }
  if select:
    hparams["attack_index"] = 0.0
  return fl.experiment.Experiment(
    model=model,
    train=train,
    test=test,
    hparams=hparams,
    algorithm_fn=algorithm_fn,
    round_config=fl.RoundConfig(
      clients_per_round,
      fl.LocalWork(batch_size=config.batch_size, num_epochs=config.num_epochs),
      sampling="all" if clients_per_round == train.num_clients else "uniform",
    ),
    num_rounds=config.num_rounds,
    eval_every=config.eval_every,
    seed=config.seed,
  )
