"""What the benchmark task files share: optimizer choice, generated data.

Not an experiment file itself: ``experiments/tasks/<task>.py`` import it
(``python -m fedjax_lite run`` puts the file's folder on ``sys.path``).

Optimizers (Reddi et al. 2021, "Adaptive Federated Optimization", ICLR,
arXiv:2003.00295): client SGD in every case; the server applies the mean
model delta with

* ``fedavg``: SGD (``optax.sgd(server_lr)``);
* ``fedadam``: ``optax.adam(server_lr, b1, b2, eps=epsilon)``;
* ``fedyogi``: optax's Yogi with both accumulators starting at 0.

``b1 = 0.9`` and ``b2 = 0.999`` are the Keras defaults the research code ran
with (google-research/federated ``optimization/docs/hyperparameters.md``:
"beta1 and beta2 set by default to 0.9 and 0.999"), and the accumulators
start at 0 (``optimization/README.md``: "For all experiments, we used initial
accumulator values of 0"). Two differences from that code remain: Keras'
Adam and the research Yogi add ``epsilon`` to ``sqrt(v_t)`` before the
step's bias correction, ``lr sqrt(1 - b2^t) / (1 - b1^t) m_t / (sqrt(v_t) +
eps)`` (``optimization/shared/keras_optimizers/yogi_test.py``,
``yogi_update_numpy``), where optax adds it after, ``lr m_hat / (sqrt(v_hat)
+ eps)``: the same step with ``eps`` scaled by ``1 / sqrt(1 - b2^t)`` (31.6x
in round 1, 1.3x by round 1000, then 1). :func:`fedjax_lite.algorithms.
fed_adam` / ``fed_yogi`` implement the paper's Algorithm 2 instead (``b2 =
0.99``, no bias correction, ``v_{-1} = tau^2``).

Every task file keeps a ``TUNED`` table ``optimizer -> (log10 client lr,
log10 server lr, log10 epsilon or None)``; a config's ``client_lr``,
``server_lr`` and ``epsilon`` left at None take the values of its
``optimizer``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import jax
import numpy as np
import optax

import fedjax_lite as fl

OPTIMIZERS = ("fedavg", "fedadam", "fedyogi")
DATA = ("real", "generated")
ADAM_B1 = 0.9  # optimization/docs/hyperparameters.md (Keras default)
ADAM_B2 = 0.999  # optimization/docs/hyperparameters.md (Keras default)


# The `:smoke` preset of the tasks: generated data, 4 clients of 4 examples,
# one round of 2 clients with batch 2, evaluated at once (seconds, offline).
SMOKE = dict(
  data="generated",
  num_clients=4,
  examples_per_client=4,
  clients_per_round=2,
  batch_size=2,
  num_rounds=1,
  eval_every=1,
  train_eval_clients=0,
)


@dataclasses.dataclass(frozen=True)
class Settings:
  """The learning rates and adaptivity a run uses (``epsilon`` None for
  ``fedavg``)."""

  optimizer: str
  client_lr: float
  server_lr: float
  epsilon: float | None


def check_choice(name: str, value: str, allowed) -> str:
  if value not in allowed:
    raise fl.experiment.ConfigError(
      f"{name} must be one of {', '.join(allowed)}, got {value!r}."
    )
  return value


def settings(config, tuned: Mapping[str, tuple]) -> Settings:
  """``config``'s optimizer with its learning rates: the config's own where
  set, else ``tuned[optimizer]`` (log10 values)."""
  opt = check_choice("optimizer", config.optimizer, tuple(tuned))
  client, server, eps = tuned[opt]
  if opt == "fedavg" and config.epsilon is not None:
    raise fl.experiment.ConfigError(
      f"epsilon={config.epsilon} applies to fedadam and fedyogi only; "
      "fedavg's server optimizer is SGD (leave epsilon=none)."
    )
  pick = lambda mine, log10: float(10.0**log10) if mine is None else mine
  return Settings(
    opt,
    pick(config.client_lr, client),
    pick(config.server_lr, server),
    None if eps is None else pick(config.epsilon, eps),
  )


def server_optimizer(s: Settings, server_lr) -> optax.GradientTransformation:
  """The server optimizer of ``s.optimizer`` (``server_lr`` may be traced)."""
  if s.optimizer == "fedavg":
    return optax.sgd(server_lr)
  if s.optimizer == "fedadam":
    return optax.adam(server_lr, b1=ADAM_B1, b2=ADAM_B2, eps=s.epsilon)
  return optax.chain(
    optax.scale_by_yogi(
      b1=ADAM_B1, b2=ADAM_B2, eps=s.epsilon, initial_accumulator_value=0.0
    ),
    optax.scale_by_learning_rate(server_lr),
  )


def experiment(
  config,
  s: Settings,
  model,
  train: fl.FederatedDataset,
  test: fl.FederatedDataset,
  **kw,
) -> fl.experiment.Experiment:
  """FedAvg/FedAdam/FedYogi with client SGD, as the task files run it.

  ``model.init`` is jitted, unoptimised (it runs once): one compilation
  instead of one per parameter shape of eager initializers (the ResNet's
  init took 12 s of CPU eagerly, 5.7 s jitted, 2.4 s jitted at XLA
  optimisation level 0, on a 2-core machine).
  """
  init = jax.jit(
    model.init, compiler_options={"xla_backend_optimization_level": 0}
  )
  model = dataclasses.replace(model, init=init)

  def algorithm_fn(h):  # h: name -> scalar (a traced one in vmapped sweeps)
    return fl.fed_avg(
      model, optax.sgd(h["client_lr"]), server_optimizer(s, h["server_lr"])
    )

  return fl.experiment.Experiment(
    model=model,
    train=train,
    test=test,
    hparams={"client_lr": s.client_lr, "server_lr": s.server_lr},
    algorithm_fn=algorithm_fn,
    round_config=fl.RoundConfig(
      clients_per_round=config.clients_per_round,
      local_work=fl.LocalWork(
        batch_size=config.batch_size, num_epochs=config.num_epochs
      ),
    ),
    num_rounds=config.num_rounds,
    eval_every=config.eval_every,
    train_eval_clients=config.train_eval_clients,
    seed=config.seed,
    **kw,
  )


# ------------------------------------------------------------- the data
def generated(
  make: Callable[[np.random.Generator, int], dict],
  num_clients: int,
  examples_per_client: int,
  seed: int,
) -> fl.FederatedDataset:
  """``num_clients`` clients of ``examples_per_client`` examples each, one
  ``make(rng, n) -> {feature: array [n, ...]}`` call per client, from
  ``numpy.random.default_rng(seed)`` (the same seed gives the same data)."""
  rng = np.random.default_rng(seed)
  return fl.FederatedDataset.from_clients(
    {f"{k:04d}": make(rng, examples_per_client) for k in range(num_clients)}
  )


def generated_split(config, make) -> tuple:
  """``(train, test)`` of generated data (the test clients from ``seed +
  1``)."""
  train = generated(
    make, config.num_clients, config.examples_per_client, config.seed
  )
  test = generated(
    make,
    max(1, config.num_clients // 2),
    config.examples_per_client,
    config.seed + 1,
  )
  return train, test


def cap_examples(ds: fl.FederatedDataset, limit: int | None):
  """Each client cut to its first ``limit`` examples (None: unchanged)."""
  if limit is None or int(ds.counts.max()) <= limit:
    return ds
  return fl.FederatedDataset.from_clients(
    {
      cid: {k: v[:limit] for k, v in ds.client(i).items()}
      for i, cid in enumerate(ds.client_ids)
    }
  )


def sample_examples(ds: fl.FederatedDataset, n: int, seed: int):
  """One client ``"validation"`` of ``n`` examples drawn without
  replacement from all of ``ds`` (all of them if it has fewer)."""
  feats = ds.concatenate()
  total = len(next(iter(feats.values())))
  idx = np.sort(
    np.random.default_rng(seed).choice(total, min(n, total), replace=False)
  )
  return fl.FederatedDataset.from_clients(
    {"validation": {k: v[idx] for k, v in feats.items()}}
  )


def token_sequences(
  rng: np.random.Generator,
  n: int,
  length: int,
  pad: int,
  bos: int,
  eos: int,
  first: int,
  last: int,
) -> dict:
  """``n`` next-token rows ``x, y`` int32 ``[n, length]`` laid out as the
  real loaders lay them out: ``s = (BOS, t_1 .. t_m, EOS, PAD ..)`` with
  ``t_j`` uniform in ``[first, last]`` and ``m`` uniform in ``[1,
  length]``; ``x = s[:length]`` (EOS kept out of ``x``, FedJAX's layout),
  ``y = s[1:]``."""
  seq = np.full((n, length + 1), pad, np.int32)
  seq[:, 0] = bos
  lens = rng.integers(1, length + 1, n)
  for i, m in enumerate(lens):
    seq[i, 1 : m + 1] = rng.integers(first, last + 1, m)
    if m < length:
      seq[i, m + 1] = eos
  x = seq[:, :length].copy()
  x[x == eos] = pad
  return {"x": x, "y": seq[:, 1:].copy()}
