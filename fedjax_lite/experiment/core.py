"""What an experiment file builds: :class:`Experiment`, everything a run needs.

An experiment file ``experiments/<name>.py`` defines a frozen config dataclass
(primitive fields: overridable from the command line), ``get_config(arg="")``
returning it, and ``build(config) -> Experiment``::

  python -m fedjax_lite run experiments/<name>.py[:smoke] --set client_lr=0.1

Sweepable hyperparameters: data, model and round shapes are static, but float
hyperparameters (learning rates, proximal weights, ...) can vary inside ONE
vmapped computation. An experiment declares them with ``hparams`` (name ->
default value) and ``algorithm_fn`` (builds the algorithm from a mapping of
those names to scalars, which may be traced arrays)::

  def algorithm_fn(h):
    return fl.fed_avg(model, optax.sgd(h["client_lr"]))

  fl.experiment.Experiment(..., hparams={"client_lr": config.client_lr},
                           algorithm_fn=algorithm_fn)

``algorithm`` may then be omitted: it defaults to ``algorithm_fn(hparams)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import numpy as np
from jax.sharding import Mesh

from fedjax_lite import checks
from fedjax_lite.algorithms.base import FederatedAlgorithm
from fedjax_lite.data.federated_dataset import FederatedDataset
from fedjax_lite.engine.round import RoundConfig
from fedjax_lite.models.core import Model

PyTree = Any
AlgorithmFn = Callable[[Mapping[str, Any]], FederatedAlgorithm]

# train_eval_clients=None evaluates the global model on this many training
# clients (all of them when there are fewer).
DEFAULT_TRAIN_EVAL_CLIENTS = 100
# Mixed into the seed of the training-evaluation sample, so the sample is
# not drawn from the stream of the initial params or the engine.
_TRAIN_EVAL_SALT = 0x7E5A


@dataclasses.dataclass(frozen=True, kw_only=True)
class Experiment:
  """A federated experiment: data, model, algorithm and schedule.

  Attributes:
    model: the model (its ``init`` gives the initial params unless
      ``init_params`` is set).
    algorithm: the federated algorithm; may be None when ``algorithm_fn`` is
      given (then ``algorithm_fn(hparams)``).
    train: the training population.
    test: held-out federated data evaluated every ``eval_every`` rounds
      (per-client metrics and quantiles), or None.
    round_config: clients per round, local work, sampling, block size.
    num_rounds: rounds to run.
    eval_every: evaluate on ``test`` every this many rounds (and after the
      last round); 0 evaluates only after the last round.
    train_eval_clients: how many training clients the global model is also
      evaluated on at those rounds (the ``global_train_<metric>`` columns:
      the global model's loss on the training data, unlike ``train_loss``,
      the mean loss of the clients' local training). A fixed sample drawn
      once from ``seed`` (:meth:`train_eval_sample`); None (default):
      ``min(100, train.num_clients)``; 0: off. At most ``train.num_clients``.
    seed: seeds the initial params and the engine's sampling/client rng
      (``k_init, k_engine = split(PRNGKey(seed))``).
    init_params: initial params shared by every seed, or None (``model.init``).
    eval_batch_size: evaluation batch size (None: one batch per client).
    name: run-folder prefix (default: the experiment file's name).
    mesh: device mesh for the engine (default: all devices).
    placement: ``"replicated"`` (every device holds every client) or
      ``"sharded"`` (each device holds ~1/nd of the clients: populations
      larger than one device's memory, multi-process runs); see
      :meth:`fedjax_lite.Engine.put_data`.
    hparams: sweepable float hyperparameters, name -> default value.
    algorithm_fn: ``hparams mapping -> FederatedAlgorithm`` for sweeps over
      ``hparams``; its values may be traced scalars (see the module docstring).
  """

  model: Model
  algorithm: FederatedAlgorithm | None = None
  train: FederatedDataset
  test: FederatedDataset | None = None
  round_config: RoundConfig
  num_rounds: int
  eval_every: int = 10
  train_eval_clients: int | None = None
  seed: int = 0
  init_params: PyTree = None
  eval_batch_size: int | None = 256
  name: str | None = None
  mesh: Mesh | None = None
  placement: str = "replicated"
  hparams: Mapping[str, float] = dataclasses.field(default_factory=dict)
  algorithm_fn: AlgorithmFn | None = None

  def __post_init__(self):
    def bad(field, expected, fix=""):
      value = getattr(self, field)
      raise TypeError(
        f"Experiment.{field} must be {expected}, got "
        f"{type(value).__name__} ({value!r:.80}).{fix}"
      )

    if not isinstance(self.model, Model):
      bad(
        "model",
        "a fedjax_lite Model",
        " Build one with "
        "fl.models.logistic_regression(...) or fl.models.from_flax(...).",
      )
    if not isinstance(self.train, FederatedDataset):
      bad(
        "train",
        "a FederatedDataset",
        " Build one with "
        "fl.FederatedDataset.from_clients(...) or a fl.datasets loader.",
      )
    if self.test is not None and not isinstance(self.test, FederatedDataset):
      bad("test", "a FederatedDataset or None")
    if not isinstance(self.round_config, RoundConfig):
      bad(
        "round_config",
        "a RoundConfig",
        " e.g. fl.RoundConfig("
        "clients_per_round=10, local_work=fl.LocalWork(batch_size=10)).",
      )
    if self.placement not in ("replicated", "sharded"):
      raise ValueError(
        f"Experiment.placement must be 'replicated' or 'sharded', got "
        f"{self.placement!r}."
      )
    for field in ("num_rounds", "seed"):
      if not checks.is_int(getattr(self, field)):
        bad(field, "an int")
    if self.num_rounds < 1:
      raise ValueError(
        f"Experiment.num_rounds must be >= 1, got {self.num_rounds}."
      )
    checks.int_at_least(
      "Experiment.eval_every",
      self.eval_every,
      0,
      hint=" (0: only after the last round)",
    )
    checks.positive_int(
      "Experiment.eval_batch_size", self.eval_batch_size, allow_none=True
    )
    n = self.train.num_clients
    checks.int_at_least(
      "Experiment.train_eval_clients",
      self.train_eval_clients,
      0,
      allow_none=True,
      hint=f" (0: off; None: min({DEFAULT_TRAIN_EVAL_CLIENTS}, the number "
      "of training clients))",
    )
    if self.train_eval_clients is not None and self.train_eval_clients > n:
      raise ValueError(
        f"Experiment.train_eval_clients={self.train_eval_clients} exceeds "
        f"the {n} training clients; expected at most {n} (None: "
        f"min({DEFAULT_TRAIN_EVAL_CLIENTS}, {n}) = "
        f"{min(DEFAULT_TRAIN_EVAL_CLIENTS, n)})."
      )
    if self.name is not None and not isinstance(self.name, str):
      bad("name", "a str or None")
    if not isinstance(self.hparams, Mapping) or not all(
      isinstance(k, str) for k in self.hparams
    ):
      bad("hparams", "a mapping of str names to default float values")
    if self.hparams and self.algorithm_fn is None:
      raise ValueError(
        f"Experiment.hparams={dict(self.hparams)} declares sweepable "
        "hyperparameters but algorithm_fn is None; pass "
        "algorithm_fn=lambda h: <algorithm built from h[name]>."
      )
    if self.algorithm_fn is not None and not callable(self.algorithm_fn):
      bad("algorithm_fn", "a callable hparams -> FederatedAlgorithm")
    if self.algorithm is None:
      if self.algorithm_fn is None:
        raise ValueError(
          "Experiment needs algorithm=... (e.g. "
          "fl.fed_avg(model, optax.sgd(0.01))) or "
          "algorithm_fn=... with hparams=...."
        )
      object.__setattr__(self, "algorithm", self.make_algorithm())
    if not isinstance(self.algorithm, FederatedAlgorithm):
      bad(
        "algorithm",
        "a FederatedAlgorithm",
        " e.g. fl.fed_avg(model, optax.sgd(0.01)).",
      )
    rc = self.round_config
    if rc.clients_per_round > self.train.num_clients and not rc.replace:
      raise ValueError(
        f"round_config.clients_per_round={rc.clients_per_round} exceeds the "
        f"{self.train.num_clients} training clients; lower it or set "
        "RoundConfig(replace=True)."
      )

  def make_algorithm(
    self, hparams: Mapping[str, Any] | None = None
  ) -> FederatedAlgorithm:
    """``algorithm_fn`` applied to ``hparams`` (missing names: the defaults).

    Without ``algorithm_fn`` this returns ``algorithm`` and ``hparams`` must
    be empty.
    """
    hparams = dict(hparams or {})
    if self.algorithm_fn is None:
      if hparams:
        raise ValueError(
          f"hyperparameters {sorted(hparams)} given but this "
          "experiment has no algorithm_fn (nothing is "
          "sweepable); see fedjax_lite.experiment.core."
        )
      return self.algorithm
    unknown = sorted(set(hparams) - set(self.hparams))
    if unknown:
      raise ValueError(
        f"unknown hyperparameters {unknown}; this experiment "
        f"declares {sorted(self.hparams)} in Experiment.hparams."
      )
    full = {**self.hparams, **hparams}
    alg = self.algorithm_fn(full)
    if not isinstance(alg, FederatedAlgorithm):
      raise TypeError(
        f"algorithm_fn returned {type(alg).__name__}; expected "
        "a FederatedAlgorithm (e.g. fl.fed_avg(...))."
      )
    return alg

  def train_eval_sample(self) -> np.ndarray:
    """The training clients the global model is evaluated on (see
    ``train_eval_clients``): sorted population indices, int64 ``[k]``.

    ``k = train_eval_clients`` (None: ``min(100, n)``, ``n`` the number of
    training clients). ``k == n`` is every client; otherwise ``k`` distinct
    clients drawn uniformly without replacement by
    ``np.random.default_rng((seed mod 2**64, 0x7E5A)).choice(n, k,
    replace=False)``: the same clients at every evaluation and in every run
    of this experiment and seed (a sweep's settings share ``exp.seed``'s
    sample), independent of the initial params and the engine's rng.
    """
    n = self.train.num_clients
    k = self.train_eval_clients
    k = min(DEFAULT_TRAIN_EVAL_CLIENTS, n) if k is None else int(k)
    if k >= n:
      return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng((int(self.seed) % 2**64, _TRAIN_EVAL_SALT))
    return np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)

  def initial_params(self, seed: int | None = None) -> PyTree:
    """``init_params`` or ``model.init(k_init)`` for ``seed`` (default own)."""
    if self.init_params is not None:
      return self.init_params
    k_init, _ = jax.random.split(
      jax.random.PRNGKey(self.seed if seed is None else seed)
    )
    return self.model.init(k_init)

  def engine_rng(self, seed: int | None = None) -> jax.Array:
    """The engine's base key for ``seed`` (independent of ``k_init``)."""
    _, k_engine = jax.random.split(
      jax.random.PRNGKey(self.seed if seed is None else seed)
    )
    return k_engine
