"""TensorFlow-Federated-style iterative processes over the vectorized engine.

::

    process = fedjax_lite.learning.build_federated_averaging_process(
        model, client_optimizer_fn=lambda: optax.sgd(0.1),
        server_optimizer_fn=lambda: optax.sgd(1.0), local_epochs=1,
        batch_size=None)
    state = process.initialize(seed=0)
    for round_data in rounds:              # list of {"x": ..., "y": ...}
      state, metrics = process.next(state, round_data)
    params = process.get_model_weights(state)

As in TFF, ``next`` trains on exactly the clients it is given. Client data may
be a list (or dict) of per-client feature dicts, or a
:class:`~fedjax_lite.FederatedDataset`. The round is compiled once per data
layout; padded sizes are rounded up to powers of two so that rounds whose
clients differ slightly in size reuse the compiled round.

Privacy: :func:`build_dp_fed_avg_process` (user-level DP-FedAvg), and the
aggregators :func:`dp_aggregator` and :func:`secure_aggregator` for any
builder's ``model_aggregator=`` (see :mod:`fedjax_lite.privacy`).

Other algorithms: :func:`build_fed_prox_process` (FedProx, arXiv:1812.06127)
and :func:`build_iterative_process` for any stateless
:class:`~fedjax_lite.algorithms.FederatedAlgorithm` (e.g.
``fedjax_lite.algorithms.fed_nova(model, 0.1)``). Algorithms that keep state
on every client across rounds (SCAFFOLD, Ditto) need stable client identities
and the population size: run them with :class:`~fedjax_lite.Engine`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lite import checks
from fedjax_lite.algorithms.base import FederatedAlgorithm
from fedjax_lite.algorithms.fed_avg import fed_avg
from fedjax_lite.algorithms.fed_prox import fed_prox
from fedjax_lite.data.batching import DeviceData, LocalWork, to_device
from fedjax_lite.data.federated_dataset import FederatedDataset
from fedjax_lite.engine.evaluation import EvalResult, evaluate
from fedjax_lite.engine.round import Engine, EngineState, RoundConfig
from fedjax_lite.models.core import Model
from fedjax_lite.privacy.dp import dp_aggregator, dp_fed_avg
from fedjax_lite.privacy.secure_aggregation import secure_aggregator

__all__ = [
  "IterativeProcess",
  "build_dp_fed_avg_process",
  "build_fed_prox_process",
  "build_federated_averaging_process",
  "build_iterative_process",
  "dp_aggregator",
  "secure_aggregator",
]


def _as_dataset(data: Any) -> FederatedDataset:
  if isinstance(data, FederatedDataset):
    return data
  if isinstance(data, (Mapping, Sequence)) and not isinstance(
    data, (str, bytes)
  ):
    if len(data) == 0:
      raise ValueError(
        "federated_train_data is empty; expected at least one client."
      )
    return FederatedDataset.from_clients(data)
  raise TypeError(
    f"federated_train_data must be a list of per-client dicts "
    f"{{'x': array, 'y': array}} or a FederatedDataset, got "
    f"{type(data).__name__}."
  )


class IterativeProcess:
  """``initialize()`` / ``next(state, data)`` over an algorithm (TFF shape)."""

  def __init__(
    self,
    model: Model,
    algorithm: FederatedAlgorithm,
    local_work: LocalWork,
    *,
    block_size: int | None = None,
    mesh=None,
  ):
    if not isinstance(model, Model):
      raise TypeError(
        f"model must be a fedjax_lite Model, got {type(model).__name__}."
      )
    self.model = model
    self.algorithm = algorithm
    self.local_work = local_work
    self.block_size = block_size
    self.mesh = mesh
    self._engines: dict[int, Engine] = {}
    # The last FederatedDataset given to next() and its upload: feeding the
    # same dataset every round skips packing and uploading it again.
    self._uploaded: tuple = (None, None, None)

  def _engine(self, num_clients: int) -> Engine:
    if num_clients not in self._engines:
      cfg = RoundConfig(
        clients_per_round=num_clients,
        local_work=self.local_work,
        sampling="all",
        block_size=self.block_size,
      )
      self._engines[num_clients] = Engine(self.algorithm, cfg, self.mesh)
    return self._engines[num_clients]

  def initialize(self, seed: int = 0) -> EngineState:
    """Initial state: model params from ``seed``, fresh server optimizer."""
    k_init, k_engine = jax.random.split(jax.random.PRNGKey(seed))
    params = self.model.init(k_init)
    return self._engine(1).init(params, seed=k_engine)

  def _device_data(self, engine: Engine, data: Any) -> DeviceData:
    if isinstance(data, DeviceData):
      return data
    seen, seen_engine, uploaded = self._uploaded
    if seen is data and seen_engine is engine:
      return uploaded
    ds = _as_dataset(data)
    checks.model_features(self.model, ds.features, "federated_train_data")
    # Power-of-two padding limits recompiles across rounds.
    from fedjax_lite.data.batching import choose_buckets

    sizes = choose_buckets(ds.counts, self.local_work, "auto")
    sizes = tuple(sorted({1 << math.ceil(math.log2(s)) for s in sizes}))
    uploaded = to_device(ds, self.local_work, sizes, sharding=engine.replicated)
    if isinstance(data, FederatedDataset):
      self._uploaded = (data, engine, uploaded)
    return uploaded

  def next(
    self, state: EngineState, federated_train_data: Any
  ) -> tuple[EngineState, dict]:
    """Runs one round on every client of ``federated_train_data``.

    Returns the new state and ``{"loss", "accuracy", ...}`` training metrics
    (means over the examples processed in local training) as Python floats.
    """
    if not isinstance(state, EngineState):
      raise TypeError(
        f"state must come from initialize(), got {type(state).__name__}."
      )
    if not isinstance(federated_train_data, DeviceData):
      federated_train_data = _as_dataset(federated_train_data)
    engine = self._engine(federated_train_data.num_clients)
    data = self._device_data(engine, federated_train_data)
    state, metrics = engine.round(state, data)
    return state, {k: float(v) for k, v in metrics.items()}

  def get_model_weights(self, state: EngineState) -> Any:
    """The global model parameters pytree."""
    return self.algorithm.get_params(state.server)

  def set_model_weights(self, state: EngineState, weights: Any) -> EngineState:
    """``state`` with the global model replaced by ``weights`` (e.g. a
    pretrained or centrally trained model); optimizer and other server
    state are kept, as TFF's ``set_model_weights`` does."""
    if not hasattr(state.server, "params"):
      raise TypeError(
        f"{self.algorithm.name} keeps its model inside "
        f"{type(state.server).__name__} without a 'params' "
        "field; start a fresh state from the weights with "
        "fedjax_lite.Engine.init(weights) instead."
      )
    old = state.server.params
    if jax.tree.structure(old) != jax.tree.structure(weights):
      raise ValueError(
        f"weights have the structure "
        f"{jax.tree.structure(weights)}; the model's params "
        f"are {jax.tree.structure(old)}."
      )
    bad = [
      (np.shape(w), np.shape(p))
      for w, p in zip(jax.tree.leaves(weights), jax.tree.leaves(old))
      if np.shape(w) != np.shape(p)
    ]
    if bad:
      raise ValueError(
        f"weights have shapes {[b[0] for b in bad]} where the "
        f"model's params have {[b[1] for b in bad]}."
      )
    # Placed like the old params, so the compiled round is reused.
    weights = jax.tree.map(
      lambda w, p: jax.device_put(jnp.asarray(w, p.dtype), p.sharding),
      weights,
      old,
    )
    return state.replace(server=state.server.replace(params=weights))

  def evaluate(
    self, state: EngineState, data: Any, batch_size: int | None = 256
  ) -> EvalResult:
    """Federated evaluation of the current global model on ``data``."""
    return evaluate(
      self.model,
      self.get_model_weights(state),
      _as_dataset(data) if not isinstance(data, DeviceData) else data,
      batch_size=batch_size,
      mesh=self.mesh,
    )


def build_federated_averaging_process(
  model: Model,
  client_optimizer_fn: Callable[[], optax.GradientTransformation],
  server_optimizer_fn: Callable[[], optax.GradientTransformation] = (
    lambda: optax.sgd(1.0)
  ),
  *,
  local_epochs: int = 1,
  batch_size: int | None = None,
  num_local_steps: int | None = None,
  block_size: int | None = None,
  mesh=None,
  model_aggregator=None,
) -> IterativeProcess:
  """FedAvg/FedOpt as a TFF-style iterative process.

  Args:
    model: a :class:`~fedjax_lite.models.Model`.
    client_optimizer_fn: no-arg factory of the client optax optimizer.
    server_optimizer_fn: no-arg factory of the server optax optimizer (applied
      to the pseudo-gradient; ``optax.sgd(1.0)`` is plain FedAvg).
    local_epochs: local passes over each client's data.
    batch_size: local batch size; None = full-batch gradient descent.
    num_local_steps: fixed local steps instead of epochs.
    block_size: clients per device per block (default automatic).
    mesh: device mesh (default all devices).
    model_aggregator: how the round reduces the clients' updates, a
      :class:`fedjax_lite.aggregators.Aggregator` (e.g.
      ``aggregators.clipped(aggregators.trimmed_mean(0.1), 10.0)``,
      :func:`dp_aggregator`, :func:`secure_aggregator`); None is the
      example-weighted mean.
  """
  _check_optimizer_fns(
    client_optimizer_fn=client_optimizer_fn,
    server_optimizer_fn=server_optimizer_fn,
  )
  algorithm = fed_avg(
    model,
    client_optimizer_fn(),
    server_optimizer_fn(),
    aggregator=model_aggregator,
  )
  return build_iterative_process(
    model,
    algorithm,
    local_epochs=local_epochs,
    batch_size=batch_size,
    num_local_steps=num_local_steps,
    block_size=block_size,
    mesh=mesh,
  )


def _check_optimizer_fns(**fns):
  for name, fn in fns.items():
    if not callable(fn):
      raise TypeError(
        f"{name} must be a no-argument function returning an "
        f"optax optimizer, got {type(fn).__name__}."
      )


def build_fed_prox_process(
  model: Model,
  client_optimizer_fn,
  server_optimizer_fn=lambda: optax.sgd(1.0),
  *,
  mu: float,
  model_aggregator=None,
  **local_work,
) -> IterativeProcess:
  """FedProx (Li et al. 2020, arXiv:1812.06127) as a TFF-style process.

  Clients minimise ``F_k(w) + mu/2 ||w - w_t||^2`` from the server weights
  ``w_t``; the proximal coefficient ``mu >= 0`` (``mu = 0`` is FedAvg), other
  arguments (``local_epochs``, ``batch_size``, ``num_local_steps``,
  ``block_size``, ``mesh``) as :func:`build_federated_averaging_process`.
  """
  _check_optimizer_fns(
    client_optimizer_fn=client_optimizer_fn,
    server_optimizer_fn=server_optimizer_fn,
  )
  algorithm = fed_prox(
    model,
    client_optimizer_fn(),
    server_optimizer_fn(),
    mu=mu,
    aggregator=model_aggregator,
  )
  return build_iterative_process(model, algorithm, **local_work)


def build_iterative_process(
  model: Model,
  algorithm: FederatedAlgorithm,
  *,
  local_epochs: int = 1,
  batch_size: int | None = None,
  num_local_steps: int | None = None,
  block_size: int | None = None,
  mesh=None,
) -> IterativeProcess:
  """Any stateless algorithm as a TFF-style process (every client given to
  ``next`` trains; local work as :func:`build_federated_averaging_process`).

  Raises:
    ValueError: for algorithms with per-client state (``client_init``), whose
      states must follow the same clients round after round: use
      :class:`~fedjax_lite.Engine` with ``init(..., num_clients=N)``.
  """
  checks.instance_of("algorithm", algorithm, FederatedAlgorithm)
  if algorithm.client_init is not None:
    raise ValueError(
      f"{algorithm.name} keeps per-client state across rounds; "
      "a process that trains whichever clients it is given "
      "cannot track them. Use fedjax_lite.Engine with "
      "engine.init(params, num_clients=N) instead."
    )
  work = LocalWork(
    batch_size=batch_size, num_epochs=local_epochs, num_steps=num_local_steps
  )
  return IterativeProcess(
    model, algorithm, work, block_size=block_size, mesh=mesh
  )


_LOCAL_WORK = (
  "local_epochs",
  "batch_size",
  "num_local_steps",
  "block_size",
  "mesh",
)


def build_dp_fed_avg_process(
  model: Model,
  client_optimizer_fn,
  server_optimizer_fn=lambda: optax.sgd(1.0),
  *,
  noise_multiplier: float,
  clients_per_round: float,
  clip: float = 1.0,
  adaptive: bool = False,
  local: bool = False,
  **kw,
) -> IterativeProcess:
  """User-level DP-FedAvg (McMahan et al. 2018, arXiv:1710.06963) as a
  TFF-style process.

  As in TFF, ``next(state, clients)`` trains on exactly the clients it is
  given: the caller samples them, and the reported ``dp_epsilon`` (with
  ``sampling=``, ``population=`` and ``delta=``) assumes they
  were drawn as ``sampling`` says (e.g. each user with probability
  ``clients_per_round / population``:
  :func:`fedjax_lite.privacy.poisson_sample`). The DP arguments are
  :func:`dp_aggregator`'s (``sampling``, ``population``,
  ``delta``, ``accountant``, ``target_quantile``, ``learning_rate``,
  ``clipped_count_stddev``); local work (``local_epochs``, ``batch_size``,
  ``num_local_steps``, ``block_size``, ``mesh``) as
  :func:`build_federated_averaging_process`.
  """
  local_work = {k: kw.pop(k) for k in _LOCAL_WORK if k in kw}
  _check_optimizer_fns(
    client_optimizer_fn=client_optimizer_fn,
    server_optimizer_fn=server_optimizer_fn,
  )
  algorithm = dp_fed_avg(
    model,
    client_optimizer_fn(),
    server_optimizer_fn(),
    noise_multiplier=noise_multiplier,
    clients_per_round=clients_per_round,
    clip=clip,
    adaptive=adaptive,
    local=local,
    simulate_sampling=False,
    **kw,
  )
  return build_iterative_process(model, algorithm, **local_work)
