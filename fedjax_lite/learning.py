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

TensorFlow Federated 0.87's names are here too:
``fedjax_lite.learning.algorithms.build_weighted_fed_avg``,
``build_unweighted_fed_avg``, ``build_weighted_fed_prox`` and
``build_fed_eval`` (:mod:`fedjax_lite.learning_algorithms`), and the
aggregators :func:`robust_aggregator`, :func:`dp_aggregator` and
:func:`secure_aggregator` with TFF's adaptive defaults. ``next`` returns a
:class:`LearningProcessOutput` ``(state, metrics)``, so both
``result.state`` and ``state, metrics = process.next(...)`` work.

As in TFF, ``next`` trains on exactly the clients it is given. Client data may
be a list (or dict) of per-client feature dicts, or a
:class:`~fedjax_lite.FederatedDataset`. A list is packed in one host pass
(one concatenation per feature, straight into the upload buffer) and uploaded
once per call; a FederatedDataset given again (the same object) is not packed
or uploaded again (so changes made in place to its arrays are not seen).

The round is compiled once per data layout. Padded client sizes and the
packed row count are rounded up on a grid at most 12.5% above the exact size
(with a batch size, in whole local steps: clients of 50 examples in batches
of 10 keep their 5 steps), so rounds with as many clients, split alike over
the size buckets, reuse the compiled round even when their sizes and example
totals differ slightly.

Privacy: :func:`build_dp_fed_avg_process` (user-level DP-FedAvg), and the
aggregators :func:`dp_aggregator` and :func:`secure_aggregator` for any
builder's ``model_aggregator=`` (see :mod:`fedjax_lite.privacy`). Called
without a clip norm they take TFF's adaptive defaults (see each function);
with one they are :func:`fedjax_lite.privacy.dp_aggregator` and
:func:`fedjax_lite.privacy.secure_aggregation.secure_aggregator` as before.

Other algorithms: :func:`build_fed_prox_process` (FedProx, arXiv:1812.06127)
and :func:`build_iterative_process` for any stateless
:class:`~fedjax_lite.algorithms.FederatedAlgorithm` (e.g.
``fedjax_lite.algorithms.fed_nova(model, 0.1)``). Algorithms that keep state
on every client across rounds (SCAFFOLD, Ditto) need stable client identities
and the population size: run them with :class:`~fedjax_lite.Engine`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lite import checks
from fedjax_lite.aggregators.base import (
  Aggregator,
  expand,
  taking_part,
  tree_norm,
  wrapper,
)
from fedjax_lite.aggregators.clipping import clipped
from fedjax_lite.aggregators.mean import unweighted_mean, weighted_mean
from fedjax_lite.algorithms.base import FederatedAlgorithm
from fedjax_lite.algorithms.fed_avg import fed_avg
from fedjax_lite.algorithms.fed_prox import fed_prox
from fedjax_lite.data.batching import DeviceData, LocalWork, choose_buckets
from fedjax_lite.data.federated_dataset import FederatedDataset
from fedjax_lite.engine.evaluation import EvalResult, evaluate
from fedjax_lite.engine.round import Engine, EngineState, RoundConfig
from fedjax_lite.models.core import Model
from fedjax_lite.privacy import dp as _dp
from fedjax_lite.privacy import secure_aggregation as _secagg
from fedjax_lite.privacy.dp import dp_fed_avg

__all__ = [
  "IterativeProcess",
  "LearningProcessOutput",
  "build_dp_fed_avg_process",
  "build_fed_prox_process",
  "build_federated_averaging_process",
  "build_iterative_process",
  "dp_aggregator",
  "robust_aggregator",
  "secure_aggregator",
]


class LearningProcessOutput(NamedTuple):
  """What ``next`` returns, as TFF's ``LearningProcessOutput``.

  A NamedTuple, so ``state, metrics = process.next(...)`` unpacks it.

  Attributes:
    state: the new process state.
    metrics: a flat dict of Python floats (TFF nests them, e.g.
      ``metrics["client_work"]["train"]["loss"]``; here ``metrics["loss"]``).
  """

  state: Any
  metrics: dict


def _check_client_data(data: Any) -> None:
  """``data`` is a FederatedDataset, DeviceData or a non-empty list or dict
  of clients (their contents are checked when packed)."""
  if isinstance(data, (FederatedDataset, DeviceData)):
    return
  if not isinstance(data, (Mapping, Sequence)) or isinstance(
    data, (str, bytes)
  ):
    raise TypeError(
      f"federated_train_data must be a list of per-client dicts "
      f"{{'x': array, 'y': array}} or a FederatedDataset, got "
      f"{type(data).__name__}."
    )
  if len(data) == 0:
    raise ValueError(
      "federated_train_data is empty; expected at least one client."
    )


def _as_dataset(data: Any) -> FederatedDataset:
  _check_client_data(data)
  if isinstance(data, FederatedDataset):
    return data
  return FederatedDataset.from_clients(data)


def _grid(v: int) -> int:
  """Smallest ``m * 2**e >= v`` with ``m < 16``: at most 12.5% above ``v``."""
  e = max(0, int(v).bit_length() - 4)
  return -(-int(v) >> e) << e


def _padded_sizes(counts: np.ndarray, local_work: LocalWork) -> tuple:
  """Size buckets for ``counts``, each limit rounded up on :func:`_grid`.

  With a batch size and epochs the rounding is in whole steps per epoch (the
  local work, and so the round's cost, grows with the steps), otherwise in
  examples.
  """
  limits = choose_buckets(counts, local_work, "auto")
  b, epochs = local_work.batch_size, local_work.num_steps is None
  if b is not None and epochs:
    return tuple(sorted({_grid(-(-s // b)) * b for s in limits}))
  return tuple(sorted({_grid(s) for s in limits}))


_ALIGN = 64


def _aligned_empty(shape: tuple, dtype: np.dtype) -> np.ndarray:
  """An uninitialised C-contiguous array on a 64-byte boundary.

  On CPU, JAX uploads such arrays without copying them (the device buffer
  aliases the host one; measured 0.1 ms instead of ~10 ms for 12 MB
  replicated on two host devices), so packing straight into it is the only
  copy of the data.
  """
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  raw = np.empty(nbytes + _ALIGN, np.uint8)
  start = -raw.ctypes.data % _ALIGN
  return raw[start : start + nbytes].view(dtype).reshape(shape)


def _packed_dtype(dtype: np.dtype) -> np.dtype:
  # As FederatedDataset stores features: 64-bit numbers become 32-bit.
  if dtype == np.float64:
    return np.dtype(np.float32)
  if dtype == np.int64:
    return np.dtype(np.int32)
  return dtype


def _pack_clients(
  clients: Any, local_work: LocalWork
) -> tuple[dict, np.ndarray, tuple] | None:
  """Per-client feature dicts packed in one host pass.

  Returns ``(features, counts, bucket_sizes)``: ``features[name]`` holds
  every client's rows back to back (client order) in an aligned upload
  buffer ending in zero rows (see :func:`_upload`). Returns None when the
  input is not a clean list of numeric per-client arrays (wrong types,
  missing features, mismatched lengths, dtypes or shapes, empty clients, NaN
  or inf): the caller then goes through
  :meth:`FederatedDataset.from_clients`, which converts what it can and
  names what is wrong.
  """
  items = list(clients.values()) if isinstance(clients, Mapping) else clients
  first = items[0]
  if not isinstance(first, Mapping) or not first:
    return None
  keys = first.keys()
  try:
    if not all(c.keys() == keys for c in items):
      return None
    cols = {
      k: [
        a if type(a) is np.ndarray else np.asarray(a)
        for a in [c[k] for c in items]
      ]
      for k in keys
    }
    lengths = [[len(a) for a in col] for col in cols.values()]
  except (AttributeError, TypeError):  # not dicts, or scalar features
    return None
  if any(n != lengths[0] for n in lengths[1:]):
    return None
  counts = np.asarray(lengths[0], np.int64)
  if counts.min() <= 0:
    return None
  total = int(counts.sum())
  sizes = _padded_sizes(counts, local_work)
  rows = _grid(total + sizes[-1])
  features = {}
  for k, col in cols.items():
    dtypes = {a.dtype for a in col}
    shapes = {a.shape[1:] for a in col}
    if len(dtypes) != 1 or len(shapes) != 1:
      return None
    dtype = _packed_dtype(dtypes.pop())
    if dtype == object:
      return None
    out = _aligned_empty((rows,) + shapes.pop(), dtype)
    np.concatenate(col, axis=0, out=out[:total], casting="same_kind")
    # A finite sum proves every value finite (inf and NaN propagate); a
    # non-finite one (NaN, inf, or an overflow) gets the exact check.
    if np.issubdtype(dtype, np.floating):
      with np.errstate(over="ignore", invalid="ignore"):
        if not np.isfinite(out[:total].sum()):
          return None
    out[total:] = 0
    features[k] = out
  return features, counts, sizes


def _pack_dataset(
  ds: FederatedDataset, local_work: LocalWork
) -> tuple[dict, tuple]:
  """A FederatedDataset's arrays copied into aligned upload buffers (zero
  rows at the end, see :func:`_upload`) and its padded bucket sizes."""
  sizes = _padded_sizes(ds.counts, local_work)
  features = {}
  for k, v in ds.features.items():
    out = _aligned_empty((_grid(len(v) + sizes[-1]),) + v.shape[1:], v.dtype)
    out[: len(v)] = v
    out[len(v) :] = 0
    features[k] = out
  return features, sizes


def _upload(
  features: dict,
  counts: np.ndarray,
  sizes: tuple,
  sharding,
  offsets: np.ndarray | None = None,
) -> DeviceData:
  """One upload of packed client data (replicated by ``sharding``).

  ``features`` have, after the clients' rows, at least ``max(sizes)`` zero
  rows, so the padded slice of any client stays in bounds; their row count
  is rounded up on :func:`_grid` so that rounds whose example totals differ
  slightly keep the same shapes.
  """
  counts = np.asarray(counts, np.int64)
  if offsets is None:
    offsets = np.cumsum(counts) - counts
  if max(len(v) for v in features.values()) >= 2**31:
    raise ValueError("datasets with >= 2**31 examples are not supported.")
  bucket = np.searchsorted(np.asarray(sizes), counts).astype(np.int32)
  feats, offsets, counts_d, bucket_d = jax.device_put(
    (features, offsets.astype(np.int32), counts.astype(np.int32), bucket),
    sharding,
  )
  return DeviceData(
    features=feats,
    offsets=offsets,
    counts=counts_d,
    bucket=bucket_d,
    bucket_sizes=tuple(sizes),
    bucket_clients=tuple(
      int(v) for v in np.bincount(bucket, minlength=len(sizes))
    ),
    # bucket_examples only matter to weighted sampling, which a process
    # never uses (it trains every client it is given); leaving them out
    # keeps the compiled round independent of the round's example total.
    bucket_examples=None,
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
    # The data (hence the population a DP aggregator binds to) arrives with
    # next(): its first round makes the aggregator's state.
    return self._engine(1).init(params, seed=k_engine, defer_aggregator=True)

  def _device_data(self, engine: Engine, data: Any) -> DeviceData:
    """``data`` packed and uploaded once (not at all for the
    FederatedDataset uploaded last)."""
    if isinstance(data, DeviceData):
      return data
    seen, seen_engine, uploaded = self._uploaded
    if seen is data and seen_engine is engine:
      return uploaded
    packed = None
    if not isinstance(data, FederatedDataset):
      packed = _pack_clients(data, self.local_work)
    if packed is None:
      ds = _as_dataset(data)
      checks.model_features(self.model, ds.features, "federated_train_data")
      features, sizes = _pack_dataset(ds, self.local_work)
      uploaded = _upload(
        features, ds.counts, sizes, engine.replicated, ds.offsets
      )
    else:
      features, counts, sizes = packed
      total = int(counts.sum())
      checks.model_features(
        self.model,
        {k: v[:total] for k, v in features.items()},
        "federated_train_data",
      )
      uploaded = _upload(features, counts, sizes, engine.replicated)
    if isinstance(data, FederatedDataset):
      self._uploaded = (data, engine, uploaded)
    return uploaded

  def next(
    self, state: EngineState, federated_train_data: Any
  ) -> LearningProcessOutput:
    """Runs one round on every client of ``federated_train_data``.

    Returns ``LearningProcessOutput(state, metrics)``: the new state and
    ``{"loss", "accuracy", ...}`` training metrics (means over the examples
    processed in local training) as Python floats.
    """
    if not isinstance(state, EngineState):
      raise TypeError(
        f"state must come from initialize(), got {type(state).__name__}."
      )
    data = federated_train_data
    _check_client_data(data)
    num_clients = (
      data.num_clients
      if isinstance(data, (FederatedDataset, DeviceData))
      else len(data)
    )
    engine = self._engine(num_clients)
    state, metrics = engine.round(state, self._device_data(engine, data))
    # One transfer for all metrics (it waits for the round).
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    return LearningProcessOutput(state, metrics)

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
  checks.optimizer_factories(
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
  checks.optimizer_factories(
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
  **kw,
) -> IterativeProcess:
  """User-level DP-FedAvg (McMahan et al. 2018, arXiv:1710.06963) as a
  TFF-style process.

  As in TFF, ``next(state, clients)`` trains on exactly the clients it is
  given: the caller samples them, and the reported ``dp_epsilon`` (with
  ``sampling=``, ``population=`` and ``delta=``) assumes they
  were drawn as ``sampling`` says (e.g. each user with probability
  ``clients_per_round / population``:
  :func:`fedjax_lite.privacy.poisson_sample`). The process only sees the
  sample, so accounting needs the declared ``population`` (the aggregator
  runs with ``simulate_sampling=False``); each round checks what it can
  against it: at most ``population`` clients, and exactly
  ``clients_per_round`` for ``sampling="fixed"`` (``ValueError``
  otherwise). The DP keywords are
  :func:`fedjax_lite.privacy.dp_fed_avg`'s (``noise_multiplier`` and
  ``clients_per_round`` required; ``clip``, ``adaptive``, ``local``, and
  :func:`dp_aggregator`'s ``sampling``, ``population``, ``delta``,
  ``accountant``, ``target_quantile``, ``learning_rate``,
  ``clipped_count_stddev``); local work (``local_epochs``, ``batch_size``,
  ``num_local_steps``, ``block_size``, ``mesh``) as
  :func:`build_federated_averaging_process`.
  """
  local_work = {k: kw.pop(k) for k in _LOCAL_WORK if k in kw}
  checks.optimizer_factories(
    client_optimizer_fn=client_optimizer_fn,
    server_optimizer_fn=server_optimizer_fn,
  )
  algorithm = dp_fed_avg(
    model,
    client_optimizer_fn(),
    server_optimizer_fn(),
    simulate_sampling=False,
    **kw,
  )
  return build_iterative_process(model, algorithm, **local_work)


# ------------------------------------------------ TFF's default aggregators
# Constants of tensorflow_federated/python/learning/model_update_aggregator.py
# (``_default_zeroing``, ``_default_clipping``, ``secure_aggregator``) and
# tensorflow_federated/python/aggregators/dp_factory.py
# (``DifferentiallyPrivateFactory.gaussian_adaptive``), TFF 0.87.
ZEROING_INITIAL, ZEROING_QUANTILE, ZEROING_LR = 10.0, 0.98, math.log(10.0)
ZEROING_MULTIPLIER, ZEROING_INCREMENT = 2.0, 1.0
CLIPPING_INITIAL, CLIPPING_QUANTILE, CLIPPING_LR = 1.0, 0.8, 0.2
SECURE_INITIAL, SECURE_QUANTILE, SECURE_LR, SECURE_MULTIPLIER = (
  50.0,
  0.95,
  1.0,
  2.0,
)
DP_INITIAL_CLIP, DP_TARGET_QUANTILE, DP_LR = 0.1, 0.5, 0.2


def _linf_norm(update: Any) -> jax.Array:
  return jnp.max(
    jnp.stack(
      [jnp.max(jnp.abs(u)).astype(jnp.float32) for u in jax.tree.leaves(update)]
    )
  )


def _norm_quantile_bound(
  inner: Aggregator,
  *,
  name: str,
  norm: Callable[[Any], jax.Array],
  initial: float,
  target_quantile: float,
  learning_rate: float,
  multiplier: float,
  increment: float,
  zero_above: bool,
) -> Aggregator:
  r"""``inner`` behind a bound that follows a quantile of the update norms.

  An estimate :math:`X_t` (``initial`` at first) of the ``target_quantile``
  :math:`\gamma` of the clients' norms moves geometrically without noise
  (Andrew et al. 2021, arXiv:1905.03871; TFF's
  ``PrivateQuantileEstimationProcess.no_noise``):

  .. math:: X_{t+1} = X_t \exp\big(-\eta (\bar b_t - \gamma)\big),
            \quad \bar b_t = \tfrac{1}{|S_t|} \textstyle\sum_{k \in S_t}
            \mathbb{1}[\|u_k\| \le X_t],

  and the round's bound is :math:`B_t = m X_t + c` (``multiplier``,
  ``increment``). ``zero_above``: an update with :math:`\|u_k\| > B_t`
  becomes zeros (it keeps its weight, as TFF's ``zeroing_factory``);
  metrics ``<name>_norm`` (:math:`B_t`) and ``<name>_fraction`` (the share
  zeroed). Otherwise every update is divided by :math:`B_t` before
  ``inner`` and the mean multiplied by it after, so an inner aggregator with
  bound 1 (a secure sum's fixed-point range) works at bound :math:`B_t`;
  metric ``<name>_bound``.
  """

  @wrapper
  def wrap(inner: Aggregator) -> Aggregator:
    def init_state(update_spec):
      return {
        "inner": inner.init_state(update_spec),
        "estimate": jnp.asarray(initial, jnp.float32),
      }

    def bound(state):
      return multiplier * state["estimate"] + increment

    def init(state, update_spec, num_slots):
      zero = jnp.zeros((), jnp.float32)
      return {
        "inner": inner.init(state["inner"], update_spec, num_slots),
        "below": zero,
        "over": zero,
        "count": zero,
      }

    def add(state, acc, updates, weights, valid, slots):
      b = bound(state)
      norms = jax.vmap(norm)(updates)  # [B]
      if zero_above:
        keep = (norms <= b).astype(jnp.float32)
        updates = jax.tree.map(
          lambda u: u * expand(keep, u.ndim).astype(u.dtype), updates
        )
      else:
        updates = jax.tree.map(lambda u: u / b.astype(u.dtype), updates)
      part = taking_part(weights, valid)
      return {
        "inner": inner.add(
          state["inner"], acc["inner"], updates, weights, valid, slots
        ),
        "below": acc["below"]
        + jnp.sum((part & (norms <= state["estimate"])).astype(jnp.float32)),
        "over": acc["over"] + jnp.sum((part & (norms > b)).astype(jnp.float32)),
        "count": acc["count"] + jnp.sum(part.astype(jnp.float32)),
      }

    def merge(accs):
      return {
        "inner": inner.merge(accs["inner"]),
        **{k: jnp.sum(accs[k], axis=0) for k in ("below", "over", "count")},
      }

    def finalize(state, acc, rng):
      out, inner_state = inner.finalize(state["inner"], acc["inner"], rng)
      b, x, n = bound(state), state["estimate"], acc["count"]
      safe_n = jnp.where(n > 0, n, 1.0)
      below = acc["below"] / safe_n
      new_x = jnp.where(
        n > 0, x * jnp.exp(-learning_rate * (below - target_quantile)), x
      )
      metrics = dict(out.metrics)
      if zero_above:
        metrics[f"{name}_norm"] = b
        metrics[f"{name}_fraction"] = jnp.where(
          n > 0, acc["over"] / safe_n, 0.0
        )
      else:
        out = out._replace(
          mean=jax.tree.map(lambda m: m * b.astype(m.dtype), out.mean)
        )
        metrics[f"{name}_bound"] = b
      return out._replace(metrics=metrics), {
        "inner": inner_state,
        "estimate": new_x,
      }

    label = f"{name}({inner.name})"
    return Aggregator(init_state, init, add, merge, finalize, name=label)

  return wrap(inner)


def _check_flag(name: str, value: Any) -> bool:
  if not isinstance(value, bool):
    raise TypeError(f"{name} must be True or False, got {value!r}.")
  return value


def _zeroing(inner: Aggregator) -> Aggregator:
  """TFF's default adaptive zeroing: updates whose largest absolute value
  exceeds ``2 X_t + 1`` become zeros, ``X_t`` tracking the 0.98 quantile
  (initially 10, learning rate ln 10) of that value."""
  return _norm_quantile_bound(
    inner,
    name="zeroing",
    norm=_linf_norm,
    initial=ZEROING_INITIAL,
    target_quantile=ZEROING_QUANTILE,
    learning_rate=ZEROING_LR,
    multiplier=ZEROING_MULTIPLIER,
    increment=ZEROING_INCREMENT,
    zero_above=True,
  )


def _clipping(inner: Aggregator) -> Aggregator:
  """TFF's default adaptive clipping: L2 clip norm from 1.0 towards the 0.8
  quantile of the update norms, learning rate 0.2."""
  return clipped(
    inner,
    CLIPPING_INITIAL,
    adaptive=True,
    target_quantile=CLIPPING_QUANTILE,
    learning_rate=CLIPPING_LR,
  )


def robust_aggregator(
  zeroing: bool = True, clipping: bool = True, weighted: bool = True
) -> Aggregator:
  """TFF's ``tff.learning.robust_aggregator``: a mean behind adaptive
  clipping and adaptive zeroing.

  Order (outermost first): zeroing (an update whose largest absolute value
  exceeds ``2 X_t + 1``, ``X_t`` tracking the 0.98 quantile of that value
  from 10, becomes zeros), then L2 clipping at ``C_t`` (from 1.0 towards the
  0.8 quantile of the update norms, ``eta = 0.2``,
  :func:`fedjax_lite.aggregators.clipped`), then the example-weighted mean
  (``weighted=False``: unweighted). Metrics: ``zeroing_norm``,
  ``zeroing_fraction``, ``clip_norm``, ``clipped_fraction``.

  Args:
    zeroing: enable adaptive zeroing.
    clipping: enable adaptive clipping.
    weighted: weighted (True) or unweighted mean.
  """
  _check_flag("zeroing", zeroing)
  _check_flag("clipping", clipping)
  _check_flag("weighted", weighted)
  agg = weighted_mean() if weighted else unweighted_mean()
  if clipping:
    agg = _clipping(agg)
  if zeroing:
    agg = _zeroing(agg)
  return agg


def dp_aggregator(
  noise_multiplier: float,
  clients_per_round: float,
  *,
  zeroing: bool | None = None,
  clip: float | None = None,
  adaptive: bool | None = None,
  **kwargs,
) -> Aggregator:
  r"""TFF's ``tff.learning.dp_aggregator``, or
  :func:`fedjax_lite.privacy.dp_aggregator` with a clip norm.

  Without ``clip`` and ``adaptive`` (TFF's call,
  ``dp_aggregator(noise_multiplier, clients_per_round)``): TFF's defaults,
  adaptive clipping from ``C_0 = 0.1`` towards the 0.5 quantile of the update
  norms with learning rate 0.2 (``gaussian_adaptive``), clipped-count noise
  ``clients_per_round / 20``, behind adaptive zeroing (``zeroing=True``):

  .. math:: \tilde\Delta_t = \frac{1}{D}\Big(\sum_k
            \mathrm{clip}_{C_t}(\Delta_k) + \mathcal N(0, z^2 C_t^2 I)\Big)

  (see :mod:`fedjax_lite.privacy.dp`). As in TFF, noise on the clipped count
  needs enough clients: ``clients_per_round / 20 > noise_multiplier / 2``.

  With ``clip`` (or ``adaptive``) given, the call is
  :func:`fedjax_lite.privacy.dp_aggregator`'s: a fixed clip unless
  ``adaptive=True``, no zeroing unless ``zeroing=True``. Before this module
  took TFF's defaults, ``dp_aggregator(z, n)`` silently clipped at a fixed
  1.0; pass ``clip=1.0`` for that.

  Other keywords (``target_quantile``, ``learning_rate``,
  ``clipped_count_stddev``, ``sampling``, ``population``, ``delta``, ...)
  go to :func:`fedjax_lite.privacy.dp_aggregator`.
  """
  tff_defaults = clip is None and adaptive is None
  if tff_defaults:
    clip, adaptive = DP_INITIAL_CLIP, True
    kwargs.setdefault("target_quantile", DP_TARGET_QUANTILE)
    kwargs.setdefault("learning_rate", DP_LR)
  elif adaptive is None:
    adaptive = False
  elif clip is None:
    clip = DP_INITIAL_CLIP if adaptive else 1.0
  if zeroing is None:
    zeroing = tff_defaults
  _check_flag("zeroing", zeroing)
  _check_flag("adaptive", adaptive)
  agg = _dp.dp_aggregator(
    noise_multiplier, clients_per_round, clip, adaptive, **kwargs
  )
  return _zeroing(agg) if zeroing else agg


def secure_aggregator(
  clip_norm: float | None = None,
  *,
  zeroing: bool | None = None,
  clipping: bool | None = None,
  weighted: bool = False,
  **kwargs,
) -> Aggregator:
  """TFF's ``tff.learning.secure_aggregator``, or
  :func:`fedjax_lite.privacy.secure_aggregation.secure_aggregator` with a
  fixed bound ``clip_norm``.

  Without ``clip_norm`` (TFF's call, ``secure_aggregator()``): the secure
  sum's bound adapts as TFF's does, ``B_t = 2 X_t`` with ``X_t`` tracking the
  0.95 quantile of the update norms (from 50, learning rate 1.0); each
  update is divided by ``B_t``, summed through SecAgg at bound 1 and the
  mean multiplied by ``B_t`` (metric ``secure_bound``). In front of it, as
  TFF's defaults, adaptive clipping (``clipping=True``, quantile 0.8) and
  adaptive zeroing (``zeroing=True``).

  With ``clip_norm``: a fixed bound, no zeroing or clipping unless asked.
  Either way the mean is unweighted (TFF's ``weighted=False``; TFF's default
  ``weighted=True`` is refused: a weighted secure mean would need a public
  bound on the weights); other keywords (``bits_per_value``, ``num_neighbors``, ``dropout_rate``,
  ``seed``, ...) go to the secure aggregator.
  """
  if _check_flag("weighted", weighted):
    raise ValueError(
      "secure_aggregator(weighted=True) is not available: the secure mean "
      "is unweighted; pass weighted=False (TFF's unweighted variant)."
    )
  tff_defaults = clip_norm is None
  zeroing = tff_defaults if zeroing is None else _check_flag("zeroing", zeroing)
  clipping = (
    tff_defaults if clipping is None else _check_flag("clipping", clipping)
  )
  if tff_defaults:
    agg = _norm_quantile_bound(
      _secagg.secure_aggregator(1.0, **kwargs),
      name="secure",
      norm=tree_norm,
      initial=SECURE_INITIAL,
      target_quantile=SECURE_QUANTILE,
      learning_rate=SECURE_LR,
      multiplier=SECURE_MULTIPLIER,
      increment=0.0,
      zero_above=False,
    )
  else:
    agg = _secagg.secure_aggregator(clip_norm, **kwargs)
  if clipping:
    agg = _clipping(agg)
  if zeroing:
    agg = _zeroing(agg)
  return agg


def __getattr__(name: str) -> Any:
  # ``fedjax_lite.learning.algorithms`` (TFF's ``tff.learning.algorithms``)
  # is :mod:`fedjax_lite.learning_algorithms`, which builds on this module.
  if name == "algorithms":
    import importlib  # pylint: disable=import-outside-toplevel

    return importlib.import_module("fedjax_lite.learning_algorithms")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
