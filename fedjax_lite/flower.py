r"""A :class:`~fedjax_lite.FederatedAlgorithm` deployed with Flower.

The engine runs a round as one compiled program over simulated clients.
Here the same algorithm runs on real devices through Flower's Message API
(tested with ``flwr`` 1.42: ``ClientApp``, ``ServerApp``, ``Strategy``,
``ArrayRecord``; https://flower.ai/docs/framework/ and Flower's
``flwr/serverapp/strategy/strategy.py``): every node trains on the examples
it holds, which never leave it; only the broadcast, the update, its weight
and summed metrics travel. The pieces:

* :class:`ClientSetup` and :func:`client_app` -- the node's side: a
  ``ClientApp`` whose ``train`` runs the jitted ``client_update`` on the
  node's examples and whose ``evaluate`` reports the global model's loss;
* ``AlgorithmStrategy`` (a Flower ``Strategy``) and :func:`server_app` --
  the server's side: the algorithm's aggregator and ``server_update``;
* :func:`local_grid` -- a ``Grid`` that delivers the messages to a
  ``ClientApp`` in this process (tests, debugging);
* :func:`tree_to_arrays`, :func:`arrays_to_tree` -- the wire format below.

One round, with ``t`` the Flower round minus one (the engine's
``EngineState.round``)::

    server (AlgorithmStrategy)                    node k (client_app)
    k_sample, k_clients, k_agg = round_keys(rng, t)
    broadcast(server_state) --- ArrayRecord ----> k_data, k_train =
                            + k_clients             client_keys(k_clients, k)
                                                  data_k = gather(own examples)
                                                  out_k = client_update(...)
    <------ ArrayRecord out_k.update + MetricRecord weight, metric sums
    mean = aggregator(updates, weights)          (the algorithm's aggregator:
    server_state = server_update(server_state,     weighted mean by default,
                                 Aggregate(mean, ...))  robust or clipped ones)

so for the same seed, the same clients and the engine's
``RoundConfig(sampling="all")`` (where a client's slot is its index ``k``),
a Flower run reproduces the engine's rounds up to float summation order: the
same per-client keys, batch order and local steps, the same aggregation and
server optimizer (``tests/test_flower.py`` checks FedAvg, FedProx and
FedAdam with three SuperNodes as separate processes against
:class:`~fedjax_lite.Engine`). ``docs/flower.md`` lists what differs
(sampling, dropped nodes, dtypes) and what stays on the node.

Wire format. A pytree travels as an ``ArrayRecord`` with one ``Array`` per
leaf, named by its key path (``jax.tree_util.keystr(path, simple=True,
separator="/")``, e.g. ``"Dense_0/kernel"``; a bare leaf is
``"value"``), inserted in ``jax.tree`` flatten order and read back by name
against the receiver's own structure (shapes and dtypes are checked). Arrays
are NumPy ``.npy`` bytes (Flower's ``Array``, ``allow_pickle=False``);
leaves of a non-NumPy dtype (bfloat16) travel as float32 and typed PRNG keys
as their uint32 key data. Messages carry the records

* ``"arrays"``: the broadcast (train), the global params (evaluate) or the
  update (train reply);
* ``"fedjax"``: ``ArrayRecord`` with ``"round-key"``, the round's
  ``k_clients`` (uint32 ``[2]``);
* ``"config"``: ``ConfigRecord`` with ``"server-round"`` (Flower's, from 1);
* ``"metrics"`` (replies): ``MetricRecord`` with ``"weight"`` (the
  ``ClientOutput.weight``), ``"num-examples"`` (the node's examples, Flower's
  usual weighting key), ``"partition-id"`` and, per client metric ``m``,
  ``"m.sum"`` and ``"m.count"``.

A node finds its data with its node config, ``partition-id`` and
``num-partitions`` (``flower-supernode --node-config "partition-id=0
num-partitions=3"``; Flower's simulation engine sets both).

Algorithms with per-client state kept across rounds (``client_init``:
SCAFFOLD, Ditto) are not supported here, nor aggregators that choose their
own clients (``Aggregator.active_slots``).

``flwr`` is an optional dependency: ``import fedjax_lite.flower`` imports
nothing of it; building an app does.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lite import _optional, checks
from fedjax_lite.aggregators.base import RunSpec
from fedjax_lite.algorithms.base import Aggregate, FederatedAlgorithm
from fedjax_lite.data.batching import LocalWork, gather_client, to_device
from fedjax_lite.data.federated_dataset import FederatedDataset
from fedjax_lite.engine.stages import (
  aggregator_of,
  client_keys,
  finalize_metrics,
  round_keys,
  tree_finite,
)

PyTree = Any

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
FEDJAX = "fedjax"
ROUND_KEY = "round-key"
WEIGHT = "weight"
NUM_EXAMPLES = "num-examples"
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"

__all__ = [
  "ClientSetup",
  "RoundFailedError",
  "arrays_to_tree",
  "client_app",
  "local_grid",
  "node_partition",
  "server_app",
  "tree_to_arrays",
]


def _flwr(module: str = "flwr"):
  """``import module`` (part of flwr), or the one-line install hint."""
  return _optional.require(module, "flower")


class RoundFailedError(RuntimeError):
  """A Flower round that cannot go on (nodes that failed or never replied
  while the strategy does not accept failures, too few replies, too few
  connected nodes); the message names the round, the nodes and the reason."""


# ------------------------------------------------------------- wire format
def _leaf_names(tree: PyTree) -> list[str]:
  paths = jax.tree_util.tree_flatten_with_path(tree)[0]
  names = [
    jax.tree_util.keystr(p, simple=True, separator="/") or "value"
    for p, _ in paths
  ]
  if len(set(names)) != len(names):
    dup = sorted({n for n in names if names.count(n) > 1})
    raise ValueError(
      f"leaf names {dup[:3]} occur more than once in the pytree; give its "
      "dict keys names without '/'."
    )
  return names


def _is_key(dtype) -> bool:
  return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _wire(leaf) -> np.ndarray:
  """A leaf as the NumPy array that travels (see the module docstring)."""
  if _is_key(getattr(leaf, "dtype", None)):
    leaf = jax.random.key_data(leaf)
  a = np.asarray(jax.device_get(leaf))
  if a.dtype.kind not in "biufc":  # bfloat16 and other ml_dtypes
    a = a.astype(np.float32)
  return np.asarray(a, order="C")  # 0-d stays 0-d


def tree_to_arrays(tree: PyTree):
  """A pytree as a Flower ``ArrayRecord``, one ``Array`` per leaf named by
  its key path, in flatten order (see the module docstring)."""
  fa = _flwr("flwr.app")
  names = _leaf_names(tree)
  record = fa.ArrayRecord()
  for name, leaf in zip(names, jax.tree.leaves(tree)):
    record[name] = fa.Array(_wire(leaf))
  return record


def arrays_to_tree(record, like: PyTree, what: str = "arrays") -> PyTree:
  """The pytree of structure ``like`` (arrays or ``jax.ShapeDtypeStruct``)
  read from an ``ArrayRecord`` by leaf name; raises ``ValueError`` naming
  ``what`` and the first missing, unexpected or misshapen array."""
  names = _leaf_names(like)
  specs, treedef = jax.tree.flatten(like)
  got = list(record.keys())
  missing = [n for n in names if n not in record]
  extra = [k for k in got if k not in set(names)]
  if missing or extra:
    raise ValueError(
      f"{what}: the ArrayRecord holds {len(got)} arrays {got[:4]}, expected "
      f"{len(names)} {names[:4]} (missing {missing[:3]}, unexpected "
      f"{extra[:3]}); were both sides built from the same algorithm and "
      "model?"
    )
  leaves = []
  for name, spec in zip(names, specs):
    a = record[name].numpy()
    dtype = np.dtype(spec.dtype) if not _is_key(spec.dtype) else None
    want = tuple(spec.shape)
    if dtype is None:  # a typed key: its uint32 key data
      want = want + (a.shape[-1],) if a.ndim == len(want) + 1 else want
    if a.shape != want:
      raise ValueError(
        f"{what}: array {name!r} has shape {a.shape}, expected {want}."
      )
    if dtype is None:
      leaves.append(jax.random.wrap_key_data(jnp.asarray(a, jnp.uint32)))
      continue
    wire = dtype if dtype.kind in "biufc" else np.dtype(np.float32)
    if a.dtype != wire:
      raise ValueError(
        f"{what}: array {name!r} has dtype {a.dtype}, expected {wire}."
      )
    leaves.append(a.astype(dtype) if wire != dtype else a)
  return jax.tree.unflatten(treedef, leaves)


def _spec(tree: PyTree) -> PyTree:
  """``jax.ShapeDtypeStruct`` leaves of arrays (or of such structs)."""

  def one(a):
    if hasattr(a, "shape") and hasattr(a, "dtype"):
      return jax.ShapeDtypeStruct(tuple(a.shape), a.dtype)
    return jax.ShapeDtypeStruct(np.shape(a), jnp.asarray(a).dtype)

  return jax.tree.map(one, tree)


def node_partition(context) -> tuple[int, int]:
  """``(partition-id, num-partitions)`` from a Flower node config, checked."""
  config = dict(context.node_config)
  missing = [k for k in (PARTITION_ID, NUM_PARTITIONS) if k not in config]
  if missing:
    raise ValueError(
      f"the node config {config} lacks {missing}; start the SuperNode with "
      '--node-config "partition-id=<k> num-partitions=<n>".'
    )
  pid, num = config[PARTITION_ID], config[NUM_PARTITIONS]
  checks.positive_int(f"node config {NUM_PARTITIONS}", num)
  if not checks.is_int(pid) or not 0 <= pid < num:
    raise ValueError(
      f"node config {PARTITION_ID} must be an int in [0, {num}), got {pid!r}."
    )
  return int(pid), int(num)


def _check_algorithm(algorithm: FederatedAlgorithm) -> None:
  checks.instance_of("algorithm", algorithm, FederatedAlgorithm)
  if algorithm.client_init is not None:
    raise ValueError(
      f"{algorithm.name} keeps per-client state across rounds (client_init); "
      "the Flower path runs algorithms whose clients keep no state (FedAvg, "
      "FedProx, FedOpt, FedNova, Mime, q-FFL, ...)."
    )
  if algorithm.model is None:
    raise ValueError(
      f"{algorithm.name} has no model (algorithm.model is None); build it "
      "with a Model (e.g. fl.fed_avg(model, ...))."
    )


def _broadcast_spec(algorithm: FederatedAlgorithm) -> PyTree:
  model = algorithm.model
  return jax.eval_shape(
    lambda k: algorithm.broadcast(algorithm.server_init(model.init(k))),
    jax.random.PRNGKey(0),
  )


def _metric_record(values: Mapping[str, Any]):
  fa = _flwr("flwr.app")
  out = {}
  for k, v in values.items():
    a = np.asarray(v)
    if np.issubdtype(a.dtype, np.integer) and a.ndim == 0:
      out[k] = int(a)
    else:
      out[k] = float(a) if a.ndim == 0 else a.astype(float).ravel().tolist()
  return fa.MetricRecord(out)


# ------------------------------------------------------------------ client
class ClientSetup(NamedTuple):
  """What one node trains: built on the node by :func:`client_app`'s
  ``setup(context)``, from its node config and the run config.

  Attributes:
    algorithm: a stateless-client FederatedAlgorithm with a model (the
      same as the server's :class:`AlgorithmStrategy`).
    local_work: local training per round (the engine's
      ``RoundConfig.local_work``).
    train_data: the node's examples, ``{"x": [n, ...], "y": [n]}``.
    eval_data: examples for evaluate messages (default ``train_data``).
    bucket_size: pad the examples to this size before the shuffle (the
      engine pads a client to its size bucket: pass that bucket to get the
      engine's batch order); None: the node's own size.
    eval_batch_size: examples per evaluation batch.
  """

  algorithm: FederatedAlgorithm
  local_work: LocalWork
  train_data: Mapping[str, np.ndarray]
  eval_data: Mapping[str, np.ndarray] | None = None
  bucket_size: int | None = None
  eval_batch_size: int = 256


def _client_dataset(setup, features, pid, where) -> FederatedDataset:
  if not isinstance(features, Mapping):
    raise TypeError(
      f"ClientSetup.{where} must be a dict of feature arrays, got "
      f"{type(features).__name__}."
    )
  ds = FederatedDataset.from_clients([dict(features)])
  checks.model_features(
    setup.algorithm.model, ds.features, f"ClientSetup.{where} (partition {pid})"
  )
  return ds


class _Client:
  """One node's data and jitted steps, for train and evaluate messages."""

  def __init__(self, setup: ClientSetup, pid: int, num: int):
    checks.instance_of("setup(context)", setup, ClientSetup)
    _check_algorithm(setup.algorithm)
    checks.instance_of("ClientSetup.local_work", setup.local_work, LocalWork)
    checks.positive_int(
      "ClientSetup.bucket_size", setup.bucket_size, allow_none=True
    )
    checks.positive_int("ClientSetup.eval_batch_size", setup.eval_batch_size)
    self.algorithm = setup.algorithm
    self.model = setup.algorithm.model
    self.local_work = setup.local_work
    self.pid, self.num = pid, num
    train = _client_dataset(setup, setup.train_data, pid, "train_data")
    n = int(train.counts[0])
    size = n if setup.bucket_size is None else setup.bucket_size
    if size < n:
      raise ValueError(
        f"ClientSetup.bucket_size={size} is smaller than partition {pid}'s "
        f"{n} examples; pass None (the node's own size) or at least {n}."
      )
    self.train_data = to_device(train, self.local_work, (size,))
    self.num_examples = n
    self.eval_data = (
      train
      if setup.eval_data is None
      else _client_dataset(setup, setup.eval_data, pid, "eval_data")
    )
    self.eval_batch_size = setup.eval_batch_size
    self.broadcast_spec = _broadcast_spec(self.algorithm)
    self.params_spec = jax.eval_shape(self.model.init, jax.random.PRNGKey(0))
    self._train = jax.jit(self._train_fn)
    self._eval = jax.jit(self._eval_fn)

  def _train_fn(self, broadcast, k_clients, data):
    client_id = jnp.int32(self.pid)
    k_data, k_train = client_keys(k_clients, client_id)
    cdata = gather_client(
      data,
      jnp.int32(0),
      k_data,
      self.local_work,
      data.bucket_sizes[0],
      slot=client_id,
    )
    cdata = cdata.replace(client_id=client_id, num_clients=self.num)
    return self.algorithm.client_update(broadcast, None, cdata, k_train)

  def _eval_fn(self, params, batches, mask):
    def body(acc, inputs):
      stats = self.model.evaluate_batch(params, *inputs)
      return jax.tree.map(jnp.add, acc, stats), None

    first = jax.tree.map(lambda v: v[0], batches)
    shapes = jax.eval_shape(self.model.evaluate_batch, params, first, mask[0])
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    return jax.lax.scan(body, zeros, (batches, mask))[0]

  def train(self, msg):
    fa = _flwr("flwr.app")
    content = msg.content
    for name in (ARRAYS, FEDJAX):
      if name not in content.array_records:
        raise ValueError(
          f"the train message holds records {list(content.keys())}, "
          f"expected {ARRAYS!r} and {FEDJAX!r} (sent by AlgorithmStrategy)."
        )
    broadcast = arrays_to_tree(
      content.array_records[ARRAYS], self.broadcast_spec, "train broadcast"
    )
    key = content.array_records[FEDJAX][ROUND_KEY].numpy()
    if key.shape != (2,) or key.dtype != np.uint32:
      raise ValueError(
        f"the round key has shape {key.shape} and dtype {key.dtype}, "
        "expected uint32 (2,)."
      )
    out = jax.device_get(
      self._train(broadcast, jnp.asarray(key), self.train_data)
    )
    metrics = {
      WEIGHT: np.float32(out.weight).item(),
      NUM_EXAMPLES: self.num_examples,
      PARTITION_ID: self.pid,
    }
    for name, (total, count) in out.metrics.items():
      metrics[f"{name}.sum"] = total
      metrics[f"{name}.count"] = count
    reply = fa.RecordDict(
      {ARRAYS: tree_to_arrays(out.update), METRICS: _metric_record(metrics)}
    )
    return fa.Message(reply, reply_to=msg)

  def evaluate(self, msg):
    fa = _flwr("flwr.app")
    if ARRAYS not in msg.content.array_records:
      raise ValueError(
        f"the evaluate message holds records {list(msg.content.keys())}, "
        f"expected {ARRAYS!r}."
      )
    params = arrays_to_tree(
      msg.content.array_records[ARRAYS], self.params_spec, "evaluate params"
    )
    ds = self.eval_data
    n = int(ds.counts[0])
    b = min(self.eval_batch_size, n)
    steps = math.ceil(n / b)
    pad = steps * b - n
    batches = {
      k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]).reshape(
        (steps, b) + v.shape[1:]
      )
      for k, v in ds.features.items()
    }
    mask = (np.arange(steps * b) < n).reshape(steps, b)
    stats = jax.device_get(self._eval(params, batches, mask))
    metrics = {NUM_EXAMPLES: n, PARTITION_ID: self.pid}
    for name, (total, count) in stats.items():
      metrics[name] = float(total) / max(float(count), 1.0)
      metrics[f"{name}.sum"] = total
      metrics[f"{name}.count"] = count
    reply = fa.RecordDict({METRICS: _metric_record(metrics)})
    return fa.Message(reply, reply_to=msg)


def client_app(setup: Callable[[Any], ClientSetup]):
  """A Flower ``ClientApp`` that runs ``algorithm.client_update`` (jitted)
  on the node's own examples.

  ``setup(context) -> ClientSetup`` runs on the node, once per run (read the
  node's partition with :func:`node_partition` and the run config from
  ``context.run_config``).

  Train messages: the broadcast and the round key arrive; the node derives
  its keys ``client_keys(k_clients, partition-id)``, lays its examples out
  as ``[steps, batch, ...]`` exactly as the engine's gather does (the same
  shuffle for the same key and bucket size), runs ``client_update`` and
  replies with the update, its weight and its metric sums. Evaluate
  messages: the model's loss and metrics of the global params on the
  node's ``eval_data``, as means and ``(sum, count)``.

  Returns:
    A ``flwr.clientapp.ClientApp`` with a ``train`` and an ``evaluate``
    function.
  """
  if not callable(setup):
    raise TypeError(
      f"setup must be a function context -> ClientSetup, got "
      f"{type(setup).__name__}."
    )
  fc = _flwr("flwr.clientapp")
  clients: dict = {}  # (run, node) -> _Client; a ClientApp handles one
  # message at a time (and Ray pickles the app: no lock here)

  def client(context) -> _Client:
    pid, num = node_partition(context)
    key = (context.run_id, context.node_id)
    if key not in clients:
      clients[key] = _Client(setup(context), pid, num)
    return clients[key]

  app = fc.ClientApp()

  @app.train()
  def train(msg, context):
    return client(context).train(msg)

  @app.evaluate()
  def evaluate(msg, context):
    return client(context).evaluate(msg)

  return app


# ------------------------------------------------------------------ server
def _finish_round(
  algorithm,
  aggregator,
  update_spec,
  num_slots,
  server,
  agg_state,
  updates,
  weights,
  valid,
  slots,
  metric_sums,
  num_clients,
  k_agg,
):
  """The aggregator over the round's replies (one block, one device), then
  the algorithm's ``server_update`` (jitted by the strategy)."""
  acc = aggregator.init(agg_state, update_spec, num_slots)
  acc = aggregator.add(agg_state, acc, updates, weights, valid, slots)
  acc = aggregator.merge(jax.tree.map(lambda a: a[None], acc))
  output, agg_state = aggregator.finalize(agg_state, acc, k_agg)
  aggregate = Aggregate(
    mean=output.mean,
    total_weight=output.total_weight,
    num_clients=num_clients,
    metrics=metric_sums,
  )
  server = algorithm.server_update(server, aggregate)
  metrics = finalize_metrics(aggregate)
  metrics.update(output.metrics)
  return server, agg_state, metrics


def _decode_reply(msg, update_spec, metric_names):
  """``(partition id, update, weight, {name: (sum, count)})`` of a reply."""
  content = msg.content
  if (
    ARRAYS not in content.array_records or METRICS not in content.metric_records
  ):
    raise ValueError(
      f"the reply holds records {list(content.keys())}, expected "
      f"{ARRAYS!r} and {METRICS!r}."
    )
  m = content.metric_records[METRICS]
  for k in (WEIGHT, PARTITION_ID):
    if k not in m:
      raise ValueError(f"the reply's metrics lack {k!r}.")
  update = arrays_to_tree(content.array_records[ARRAYS], update_spec, "update")
  sums = {}
  for name in metric_names:
    if f"{name}.sum" not in m or f"{name}.count" not in m:
      raise ValueError(f"the reply's metrics lack {name!r} (sum, count).")
    sums[name] = (m[f"{name}.sum"], m[f"{name}.count"])
  return int(m[PARTITION_ID]), update, float(m[WEIGHT]), sums


def _make_strategy_class():
  fa = _flwr("flwr.app")
  strategy_lib = _flwr("flwr.serverapp.strategy")
  log = logging.getLogger("flwr").log  # Flower's logger
  info, warning = logging.INFO, logging.WARNING

  class AlgorithmStrategy(strategy_lib.Strategy):
    """A Flower ``Strategy`` that is a FederatedAlgorithm's server side.

    It keeps the algorithm's server state (params and server optimizer
    state), the aggregator's state and the base key ``PRNGKey(seed)``;
    round ``t`` (Flower's ``server_round - 1``) uses the engine's
    ``round_keys(rng, t)``. ``configure_train`` sends the broadcast and the
    round key to the sampled nodes; ``aggregate_train`` reduces the replies
    with ``algorithm.aggregator`` (None: the weighted mean ``sum_k w_k u_k /
    sum_k w_k``), sorted by partition id and each in its own slot, drops
    non-finite ones (as ``RoundConfig(nonfinite="drop")``), and applies
    ``algorithm.server_update``; it returns the new global params. The
    round's metrics are the engine's (client metric means, ``num_clients``,
    ``total_weight``, ``dropped_nonfinite``, the aggregator's) plus
    ``failed_nodes``; :attr:`history` keeps them per round, with
    ``"failures"`` (node id -> reason) where nodes failed.

    Failures: a node whose reply carries an error (its ClientApp raised, or
    the SuperLink reports it unavailable), is malformed, or did not arrive
    within the round's timeout (``Strategy.start(timeout=)``) is a failure.
    With ``accept_failures`` the round goes on with the replies that arrived
    (at least ``min_train_replies``); without, it raises
    :class:`RoundFailedError`, which ends the ServerApp.

    Sampling: ``max(fraction * connected, min_nodes)`` of the connected
    nodes, drawn from ``numpy.random.default_rng((seed, round))`` (all of
    them for fraction 1), after waiting at most ``wait_for_nodes`` seconds
    for ``min_available_nodes`` to connect.

    Args:
      algorithm: a stateless-client FederatedAlgorithm with a model.
      params: the initial global params (e.g. ``model.init(PRNGKey(0))``).
      seed: base seed of the round keys (the engine's ``Engine.init`` seed).
      fraction_train, min_train_nodes: nodes sampled for training.
      fraction_evaluate, min_evaluate_nodes: nodes sampled for evaluation
        (0: no federated evaluation).
      min_available_nodes: nodes that must be connected before sampling.
      accept_failures: go on without the nodes that failed.
      min_train_replies: fewest replies a round aggregates.
      wait_for_nodes: seconds to wait for ``min_available_nodes``.
      update_like: a pytree with the structure, shapes and dtypes of ONE
        client's update (arrays or ``jax.ShapeDtypeStruct``); default the
        params' (every algorithm whose update is ``w_t - w^k``).
      out_dir: if set, every round appends its metrics as one JSON line to
        ``out_dir/metrics.jsonl`` (see :meth:`save`).
    """

    def __init__(
      self,
      algorithm: FederatedAlgorithm,
      params: PyTree,
      *,
      seed: int = 0,
      fraction_train: float = 1.0,
      min_train_nodes: int = 1,
      fraction_evaluate: float = 0.0,
      min_evaluate_nodes: int = 1,
      min_available_nodes: int = 1,
      accept_failures: bool = True,
      min_train_replies: int = 1,
      wait_for_nodes: float = 300.0,
      update_like: PyTree | None = None,
      out_dir: str | os.PathLike | None = None,
    ):
      _check_algorithm(algorithm)
      checks.int_at_least("seed", seed, 0)
      checks.in_range(
        "fraction_train",
        fraction_train,
        0.0,
        1.0,
        low_open=True,
        high_open=False,
      )
      checks.in_range(
        "fraction_evaluate", fraction_evaluate, 0.0, 1.0, high_open=False
      )
      checks.positive_int("min_train_nodes", min_train_nodes)
      checks.positive_int("min_evaluate_nodes", min_evaluate_nodes)
      checks.positive_int("min_available_nodes", min_available_nodes)
      checks.positive_int("min_train_replies", min_train_replies)
      checks.positive_float("wait_for_nodes", wait_for_nodes)
      checks.instance_of("accept_failures", accept_failures, bool)
      self.algorithm = algorithm
      self.seed = int(seed)
      self.fraction_train = float(fraction_train)
      self.min_train_nodes = int(min_train_nodes)
      self.fraction_evaluate = float(fraction_evaluate)
      self.min_evaluate_nodes = int(min_evaluate_nodes)
      self.min_available_nodes = int(min_available_nodes)
      self.accept_failures = accept_failures
      self.min_train_replies = int(min_train_replies)
      self.wait_for_nodes = float(wait_for_nodes)
      self.out_dir = None if out_dir is None else Path(out_dir)
      self.server_state = algorithm.server_init(params)
      self.rng = jax.random.PRNGKey(self.seed)
      self.params_spec = _spec(algorithm.get_params(self.server_state))
      self.broadcast_spec = jax.eval_shape(
        algorithm.broadcast, self.server_state
      )
      like = self.params_spec if update_like is None else update_like
      self.update_spec = _spec(like)
      self.aggregator = aggregator_of(algorithm)
      if self.aggregator.active_slots is not None:
        raise ValueError(
          f"aggregator {self.aggregator.name} chooses the clients of a round "
          "(active_slots); the Flower strategy samples the nodes itself."
        )
      self.aggregator_state = self.aggregator.init_state(self.update_spec)
      self.history: list[dict] = []
      self._round: dict = {}
      self._finish: dict = {}

    # ---- helpers
    def global_params(self) -> PyTree:
      """The current global params (numpy leaves)."""
      return jax.device_get(self.algorithm.get_params(self.server_state))

    def global_arrays(self):
      """The current global params as an ``ArrayRecord`` (what
      ``Strategy.start(initial_arrays=)`` takes)."""
      return tree_to_arrays(self.global_params())

    def save(self, out_dir: str | os.PathLike) -> Path:
      """Writes ``params.msgpack`` (the global params, flax msgpack, as
      :meth:`fedjax_lite.models.Model.load_params` reads) and
      ``history.json`` (every round's metrics) into ``out_dir``."""
      from flax import serialization  # pylint: disable=g-import-not-at-top

      out = Path(out_dir)
      out.mkdir(parents=True, exist_ok=True)
      (out / "params.msgpack").write_bytes(
        serialization.msgpack_serialize(self.global_params())
      )
      (out / "history.json").write_text(json.dumps(self.history, indent=1))
      return out

    def _sample(self, grid, server_round, fraction, min_nodes, stream):
      need = max(self.min_available_nodes, min_nodes)
      deadline = time.monotonic() + self.wait_for_nodes
      while True:
        nodes = sorted(int(n) for n in grid.get_node_ids())
        if len(nodes) >= need:
          break
        if time.monotonic() > deadline:
          raise RoundFailedError(
            f"round {server_round}: {len(nodes)} nodes connected after "
            f"{self.wait_for_nodes:g} s, expected at least {need} "
            f"(min_available_nodes={self.min_available_nodes})."
          )
        log(info, "waiting for nodes: %d of %d connected", len(nodes), need)
        time.sleep(0.5)
      size = min(max(int(len(nodes) * fraction), min_nodes), len(nodes))
      if size == len(nodes):
        return nodes
      order = np.random.default_rng((self.seed, server_round, stream))
      return sorted(nodes[i] for i in order.permutation(len(nodes))[:size])

    def _messages(self, content, nodes, message_type):
      return [
        fa.Message(content=content, dst_node_id=n, message_type=message_type)
        for n in nodes
      ]

    # ---- Strategy
    def summary(self) -> None:
      log(
        info,
        "\t├──> algorithm %s, aggregator %s, seed %d",
        self.algorithm.name,
        self.aggregator.name,
        self.seed,
      )
      log(
        info,
        "\t└──> fraction train %.2f (min %d), evaluate %.2f (min %d)",
        self.fraction_train,
        self.min_train_nodes,
        self.fraction_evaluate,
        self.min_evaluate_nodes,
      )

    def configure_train(self, server_round, arrays, config, grid):
      del arrays  # the broadcast of the server state (what arrays came from)
      nodes = self._sample(
        grid, server_round, self.fraction_train, self.min_train_nodes, 0
      )
      _, k_clients, k_agg = round_keys(self.rng, jnp.int32(server_round - 1))
      config = fa.ConfigRecord(dict(config))
      config["server-round"] = server_round
      content = fa.RecordDict(
        {
          ARRAYS: tree_to_arrays(self.algorithm.broadcast(self.server_state)),
          FEDJAX: fa.ArrayRecord(
            {ROUND_KEY: fa.Array(np.asarray(k_clients, np.uint32))}
          ),
          CONFIG: config,
        }
      )
      run = RunSpec(
        population=len(list(grid.get_node_ids())),
        clients_per_round=len(nodes),
        sampling="uniform",
        replace=False,
      )
      messages = self._messages(content, nodes, fa.MessageType.TRAIN)
      self._round = dict(
        round=server_round,
        nodes=nodes,
        k_agg=k_agg,
        run=run,
        messages=messages,
      )
      log(info, "configure_train: %d nodes", len(nodes))
      return messages

    def aggregate_train(self, server_round, replies):
      replies = list(replies)
      sent = self._round.get("nodes", [])
      if self._round.get("round") != server_round:
        raise RoundFailedError(
          f"round {server_round}: aggregate_train without configure_train."
        )
      # A reply's node: the destination of the message it answers (error
      # replies of the SuperLink come from the SuperLink itself).
      node_of = {
        m.metadata.message_id: int(m.metadata.dst_node_id)
        for m in self._round["messages"]
        if m.metadata.message_id
      }
      failures = {}
      decoded = []
      metric_names = None
      answered = set()
      for msg in replies:
        node = node_of.get(
          msg.metadata.reply_to_message_id, int(msg.metadata.src_node_id)
        )
        answered.add(node)
        if msg.has_error():
          failures[node] = f"error {msg.error.code}: {msg.error.reason}"
          continue
        try:
          if metric_names is None:
            m = msg.content.metric_records.get(METRICS, {})
            metric_names = sorted(
              k[: -len(".sum")] for k in m.keys() if k.endswith(".sum")
            )
          decoded.append(_decode_reply(msg, self.update_spec, metric_names))
        except (ValueError, KeyError, TypeError) as e:
          failures[node] = f"malformed reply: {e}"
      for n in sent:
        if n not in answered:
          failures[n] = "no reply within the round's timeout"
      detail = "; ".join(f"node {n}: {r}" for n, r in sorted(failures.items()))
      if failures and not self.accept_failures:
        raise RoundFailedError(
          f"round {server_round}: {len(failures)} of {len(sent)} sampled "
          f"nodes failed ({detail[:1000]}); AlgorithmStrategy("
          "accept_failures=True) aggregates the replies that arrived."
        )
      if len(decoded) < self.min_train_replies:
        raise RoundFailedError(
          f"round {server_round}: {len(decoded)} usable replies of "
          f"{len(sent)} sampled nodes, expected at least "
          f"min_train_replies={self.min_train_replies}"
          + (f" ({detail[:1000]})" if detail else "")
          + "."
        )
      if failures:
        log(
          warning,
          "round %d: %d failures: %s",
          server_round,
          len(failures),
          detail[:1000],
        )
      decoded.sort(key=lambda r: r[0])
      pids = [r[0] for r in decoded]
      if len(set(pids)) != len(pids):
        raise RoundFailedError(
          f"round {server_round}: partition ids {pids} repeat; give every "
          "SuperNode its own --node-config partition-id."
        )
      updates = jax.tree.map(lambda *xs: np.stack(xs), *[r[1] for r in decoded])
      weights = np.asarray([r[2] for r in decoded], np.float32)
      finite = np.array(
        [bool(tree_finite(r[1])) for r in decoded], bool
      ) & np.isfinite(weights)
      weights = np.where(finite, weights, 0.0).astype(np.float32)
      updates = jax.tree.map(
        lambda u: np.where(
          finite.reshape((-1,) + (1,) * (u.ndim - 1)), u, np.zeros((), u.dtype)
        ),
        updates,
      )
      metric_sums = {
        name: tuple(
          np.float32(
            sum(float(r[3][name][i]) for r, f in zip(decoded, finite) if f)
          )
          for i in (0, 1)
        )
        for name in (metric_names or [])
      }
      num_slots = len(sent)
      run = self._round["run"]
      if run not in self._finish:
        agg = aggregator_of(self.algorithm, run)
        self._finish[run] = (
          agg,
          jax.jit(
            functools.partial(
              _finish_round, self.algorithm, agg, self.update_spec, num_slots
            )
          ),
        )
      agg, finish = self._finish[run]
      server, agg_state, metrics = finish(
        self.server_state,
        self.aggregator_state,
        updates,
        weights,
        finite,
        np.arange(len(decoded), dtype=np.int32),
        metric_sums,
        np.float32(finite.sum()),
        self._round["k_agg"],
      )
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      metrics["dropped_nonfinite"] = float((~finite).sum())
      metrics["failed_nodes"] = float(len(failures))
      if agg.check_output is not None:
        agg.check_output(metrics)
      self.server_state, self.aggregator_state = server, agg_state
      row = {"round": server_round, **metrics}
      if failures:
        row["failures"] = {str(n): r for n, r in sorted(failures.items())}
      self.history.append(row)
      if self.out_dir is not None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
          f.write(json.dumps(row) + "\n")
      return self.global_arrays(), _metric_record(metrics)

    def configure_evaluate(self, server_round, arrays, config, grid):
      del arrays
      if self.fraction_evaluate == 0.0:
        return []
      nodes = self._sample(
        grid, server_round, self.fraction_evaluate, self.min_evaluate_nodes, 1
      )
      config = fa.ConfigRecord(dict(config))
      config["server-round"] = server_round
      content = fa.RecordDict({ARRAYS: self.global_arrays(), CONFIG: config})
      return self._messages(content, nodes, fa.MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round, replies):
      sums: dict = {}
      count = 0
      for msg in replies:
        if msg.has_error() or METRICS not in msg.content.metric_records:
          continue
        m = msg.content.metric_records[METRICS]
        count += 1
        for k, v in m.items():
          if k.endswith(".sum") or k.endswith(".count"):
            sums[k] = sums.get(k, 0.0) + float(v)
      if not count:
        return None
      out = {
        f"eval_{k[: -len('.sum')]}": sums[k]
        / max(sums.get(k[: -len(".sum")] + ".count", 0.0), 1e-12)
        for k in sums
        if k.endswith(".sum")
      }
      out["eval_num_clients"] = float(count)
      if self.history and self.history[-1]["round"] == server_round:
        self.history[-1].update(out)
      return _metric_record(out)

  AlgorithmStrategy.__module__ = __name__
  AlgorithmStrategy.__qualname__ = "AlgorithmStrategy"
  return AlgorithmStrategy


@functools.lru_cache(maxsize=None)
def _strategy_class():
  return _make_strategy_class()


def __getattr__(name: str):
  if name == "AlgorithmStrategy":
    return _strategy_class()
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def server_app(
  build_strategy: Callable[[Any], Any],
  *,
  num_rounds: int | None = None,
  round_timeout: float = 600.0,
  out_dir: str | os.PathLike | None = None,
):
  """A Flower ``ServerApp`` that runs an :class:`AlgorithmStrategy`.

  ``build_strategy(context) -> AlgorithmStrategy`` (read the run config
  from ``context.run_config``). The run config's ``num-server-rounds``,
  ``round-timeout`` (seconds a round waits for replies) and ``out-dir``
  (``""``: none) override the arguments of the same meaning; the app then
  calls ``Strategy.start``. With an output folder, every round appends a
  line to ``metrics.jsonl``, the end writes ``params.msgpack`` and
  ``history.json`` (:meth:`AlgorithmStrategy.save`) and a failure writes
  ``error.txt`` (``<ErrorType>: <message>``) before the ServerApp fails.

  Args:
    build_strategy: ``context -> AlgorithmStrategy``.
    num_rounds: rounds to run when the run config has no
      ``num-server-rounds``.
    round_timeout: seconds a round waits for the nodes' replies.
    out_dir: the output folder (None: none).
  """
  if not callable(build_strategy):
    raise TypeError(
      f"build_strategy must be a function context -> AlgorithmStrategy, got "
      f"{type(build_strategy).__name__}."
    )
  checks.positive_int("num_rounds", num_rounds, allow_none=True)
  checks.positive_float("round_timeout", round_timeout)
  fs = _flwr("flwr.serverapp")
  app = fs.ServerApp()

  @app.main()
  def main(grid, context) -> None:
    config = dict(context.run_config)
    rounds = config.get("num-server-rounds", num_rounds)
    if rounds is None:
      raise ValueError(
        "the run config lacks num-server-rounds; add it to [tool.flwr.app."
        "config], pass --run-config num-server-rounds=<n>, or "
        "server_app(..., num_rounds=<n>)."
      )
    rounds = checks.positive_int("num-server-rounds", rounds)
    timeout = checks.positive_float(
      "round-timeout", config.get("round-timeout", round_timeout)
    )
    out = config.get("out-dir", out_dir) or None
    try:
      strategy = build_strategy(context)
      checks.instance_of("build_strategy(context)", strategy, _strategy_class())
      if out is not None and strategy.out_dir is None:
        strategy.out_dir = Path(out)
      strategy.start(
        grid=grid,
        initial_arrays=strategy.global_arrays(),
        num_rounds=rounds,
        timeout=timeout,
      )
    except Exception as e:
      if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "error.txt").write_text(f"{type(e).__name__}: {e}\n")
      raise
    if out is not None:
      strategy.save(out)

  return app


# --------------------------------------------------------------- in process
def _roundtrip(content):
  """``content`` through Flower's protobuf bytes and back (what a network
  hop does to a RecordDict)."""
  serde = _flwr("flwr.common.serde")
  proto = _flwr("flwr.proto.recorddict_pb2")
  blob = serde.recorddict_to_proto(content).SerializeToString()
  parsed = proto.RecordDict()
  parsed.ParseFromString(blob)
  return serde.recorddict_from_proto(parsed)


def local_grid(
  client_app_,
  node_configs: list[Mapping[str, Any]],
  *,
  run_config: Mapping[str, Any] | None = None,
  unreachable: tuple[int, ...] = (),
):
  """A Flower ``Grid`` that delivers messages to ``client_app_`` in this
  process, one node per entry of ``node_configs`` (each a node config,
  e.g. ``{"partition-id": 0, "num-partitions": 3}``), for tests and
  debugging without a SuperLink: contents pass through Flower's protobuf
  serialization both ways; a ClientApp exception becomes an error reply
  (as a SuperNode sends); nodes at the positions in ``unreachable`` never
  reply. Node ids are ``1 .. len(node_configs)``. It sets Flower's task
  identity of this process (run 1) so that ``Message`` can be built here.
  """
  fa = _flwr("flwr.app")
  grid_lib = _flwr("flwr.serverapp")
  identity = _flwr("flwr.supercore.task_identity").TaskIdentity
  checks.instance_of("node_configs", node_configs, (list, tuple))
  if not node_configs:
    raise ValueError("node_configs is empty; expected one config per node.")
  for i in unreachable:
    if not checks.is_int(i) or not 0 <= i < len(node_configs):
      raise ValueError(
        f"unreachable holds {i!r}; expected node positions in "
        f"[0, {len(node_configs)})."
      )
  run_id = 1
  identity.run_id, identity.node_id, identity.task_id = run_id, 0, 0

  class LocalGrid(grid_lib.Grid):
    def __init__(self):
      self.contexts = {
        i + 1: fa.Context(
          run_id=run_id,
          node_id=i + 1,
          node_config=dict(c),
          state=fa.RecordDict(),
          run_config=dict(run_config or {}),
        )
        for i, c in enumerate(node_configs)
      }
      self.replies: dict = {}
      self._run = None

    def set_run(self, run):
      self._run = run

    @property
    def run(self):
      return self._run

    def create_message(
      self, content, message_type, dst_node_id, group_id, ttl=None
    ):
      return fa.Message(
        content, dst_node_id, message_type, ttl=ttl, group_id=group_id
      )

    def get_node_ids(self):
      return list(self.contexts)

    def push_messages(self, messages):
      ids = []
      for msg in messages:
        node = msg.metadata.dst_node_id
        if node not in self.contexts:
          raise ValueError(f"no node {node} in this grid.")
        msg_id = uuid.uuid4().hex
        msg.metadata.__dict__["_message_id"] = msg_id
        ids.append(msg_id)
        if node - 1 in unreachable:
          continue
        incoming = fa.Message(
          metadata=msg.metadata, content=_roundtrip(msg.content)
        )
        try:
          reply = client_app_(incoming, self.contexts[node])
          reply = fa.Message(
            metadata=reply.metadata, content=_roundtrip(reply.content)
          )
        except Exception as e:  # a SuperNode's error reply (code and reason)
          reply = fa.Message(
            fa.Error(code=2, reason=f"{type(e)}:<'{e}'>"),
            reply_to=incoming,
          )
        self.replies[msg_id] = reply
      return ids

    def pull_messages(self, message_ids):
      return [self.replies.pop(i) for i in message_ids if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None):
      del timeout  # delivery is synchronous: what did not reply never will
      return self.pull_messages(self.push_messages(messages))

  return LocalGrid()
