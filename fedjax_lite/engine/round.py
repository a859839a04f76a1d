r"""The round engine: sampling, gathering, local training, aggregation and the
server update in ONE jitted function.

Layout of a round (``nd`` devices on the ``"clients"`` mesh axis, ``B_j``
clients per device per block of size bucket ``j``)::

    plan = block plan (host side, once per data layout)   # B_j per bucket
    ids = sample(rng)                                     # [clients_per_round]
    sort ids by size bucket                               # static shapes per bucket
    acc[nd, ...] = aggregator.init(...)                   # per device (and run)
    for each bucket j (static, usually 1):
      fori_loop over ceil(count_j / (nd*B_j)) blocks:     # the block step
        block ids [nd*B_j], sharded over devices          # each device: B_j clients
        gather  [nd*B_j, steps_j, batch, ...]             # from the packed device data
        vmap(client_update)                               # written for ONE client
        acc[d] = aggregator.add(acc[d], updates[d], ...)  # per-device, no sync
    acc = aggregator.merge(acc)                           # one cross-device reduction
    aggregate = aggregator.finalize(acc, rng_agg)         # mean, medians, noise ...
    server_state = server_update(server_state, aggregate)

The aggregator is ``algorithm.aggregator`` (None: :func:`weighted_mean`, the
FedAvg reduction); its state (e.g. an adaptive clip norm) lives in
``EngineState.aggregator`` and its metrics join the round's metrics.

Several independent runs (seeds, hyperparameter settings) can share one
round: :meth:`Engine.rounds_body` pools every run's sampled clients into the
same blocks, each client starting from its run's broadcast and adding into
its run's accumulator (the aggregator is vmapped over runs).

Memory is O(nd * B x model) for streaming aggregators, independent of clients
per round; materialized ones (median, Krum, ...) add ``clients_per_round x
update`` per device and run. Each block step runs under ``jax.shard_map``:
every device trains exactly its own ``B_j`` clients and adds them into its
own accumulator (no partitioner choice can replicate client work), and the
per-device accumulators are merged once at the end of the round, so devices
never synchronise inside the block loop. Host callbacks inside client work or
``Aggregator.add`` are called by every device, from its own thread.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedjax_lite import checks
from fedjax_lite.aggregators.base import Aggregator, RunSpec, update_bytes
from fedjax_lite.aggregators.mean import weighted_mean
from fedjax_lite.algorithms.base import Aggregate, FederatedAlgorithm
from fedjax_lite.data.batching import (
  DeviceData,
  LocalWork,
  gather_client,
  sample_clients,
  to_device,
)
from fedjax_lite.data.federated_dataset import FederatedDataset
from fedjax_lite.data.sharding import (
  ClientLoader,
  check_data_memory,
  to_device_sharded,
)
from fedjax_lite.engine.plan import (
  BlockPlan,
  auto_block_size,
  check_materialized_memory,
  expected_clients,
  make_plan,
  tree_bytes,
)

PyTree = Any
AXIS = "clients"
_SAMPLING = ("uniform", "weighted", "all")
_NONFINITE = ("drop", "raise")
_PLACEMENTS = ("replicated", "sharded")
# fold_in data of the round's aggregation key (the sampling and client keys
# stay split(fold_in(rng, round)) as before aggregators existed).
_AGGREGATION_STREAM = 0x61676772
# Private metric of nonfinite="raise" rounds (popped by Engine.check_metrics).
_NONFINITE_IDS = "_nonfinite_client_ids"

__all__ = [
  "AXIS",
  "BlockPlan",
  "Engine",
  "EngineState",
  "NonFiniteUpdateError",
  "RoundConfig",
  "tree_finite",
  "auto_block_size",
  "client_keys",
  "default_mesh",
  "finalize_metrics",
  "round_keys",
]


@dataclasses.dataclass(frozen=True)
class RoundConfig:
  """Static configuration of a round (changing it recompiles).

  Attributes:
    clients_per_round: clients sampled each round.
    local_work: local training per client (batch size, epochs or steps).
    sampling: ``"uniform"`` (without replacement unless ``replace``),
      ``"weighted"`` (proportional to client size), or ``"all"`` (every client
      of the dataset, in order; ``clients_per_round`` must equal the
      population).
    replace: sample with replacement.
    block_size: clients per device per block; None chooses automatically from
      the model and data sizes (see :func:`auto_block_size`).
    nonfinite: what a round does with a client whose update (or weight)
      holds a NaN or an infinity, before any aggregator sees it.
      ``"drop"`` (default): the client does not take part (it is left out of
      the aggregate, of ``num_clients`` and of the client metrics) and the
      round reports how many were dropped as ``dropped_nonfinite``; the
      aggregator, DP and secure aggregation run on the finite ones.
      ``"raise"``: :meth:`Engine.round` and :meth:`Engine.run` raise
      :class:`NonFiniteUpdateError` naming the clients' ids. For DP, a
      dropped client was still sampled: the accounting (which counts every
      sampled user) stays valid, and its fixed denominator is unchanged.
  """

  clients_per_round: int
  local_work: LocalWork = dataclasses.field(default_factory=LocalWork)
  sampling: str = "uniform"
  replace: bool = False
  block_size: int | None = None
  nonfinite: str = "drop"

  def __post_init__(self):
    checks.positive_int("clients_per_round", self.clients_per_round)
    if self.sampling not in _SAMPLING:
      raise ValueError(
        f"sampling must be one of {_SAMPLING}, got {self.sampling!r}."
      )
    checks.positive_int(
      "block_size", self.block_size, allow_none=True, hint=" (None: automatic)"
    )
    checks.instance_of("local_work", self.local_work, LocalWork)
    if self.nonfinite not in _NONFINITE:
      raise ValueError(
        f"nonfinite must be one of {_NONFINITE}, got {self.nonfinite!r}."
      )


class NonFiniteUpdateError(FloatingPointError):
  """A round with ``RoundConfig(nonfinite="raise")`` met a client whose
  update held a NaN or an infinity (the message names the client ids)."""


@flax.struct.dataclass
class EngineState:
  """Everything a round reads and writes (a pytree: checkpoint it whole).

  Attributes:
    server: the algorithm's server state.
    clients: per-client persistent states, leading axis ``num_clients`` (only
      for stateful algorithms), else None.
    round: int32 round counter.
    rng: the experiment's base PRNG key; round ``t`` uses
      ``fold_in(rng, t)``, so resuming from a checkpoint is exact.
    aggregator: the aggregator's state kept across rounds (e.g. an adaptive
      clip norm, the centered-clipping center), or None for stateless
      aggregators (and before the first round, which then starts from
      ``aggregator.init_state``).
  """

  server: PyTree
  clients: PyTree
  round: jax.Array
  rng: jax.Array
  aggregator: PyTree = None


def round_keys(rng: jax.Array, round_index: jax.Array):
  """``(k_sample, k_clients, k_aggregate)`` of round ``round_index``."""
  key = jax.random.fold_in(rng, round_index)
  k_sample, k_clients = jax.random.split(key)
  return k_sample, k_clients, jax.random.fold_in(key, _AGGREGATION_STREAM)


def client_keys(k_clients: jax.Array, slot: jax.Array):
  """``(k_data, k_train)`` of the client at position ``slot`` of the sample."""
  return jax.random.split(jax.random.fold_in(k_clients, slot))


def default_mesh(devices=None) -> Mesh:
  """A 1-D mesh over all devices of the default backend, axis ``"clients"``."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (AXIS,))


_WARNED = []


def _warn_if_untuned_cpu(platform: str, num_devices: int) -> None:
  from fedjax_lite import runtime  # pylint: disable=g-import-not-at-top

  if (
    platform == "cpu"
    and num_devices == 1
    and runtime.usable_cores() > 1
    and not runtime.settings().get("applied")
    and not _WARNED
  ):
    _WARNED.append(True)
    warnings.warn(
      "fedjax_lite runs on one CPU device with JAX's default threading, "
      "which is several times slower for federated rounds. Import "
      "fedjax_lite (or call fedjax_lite.configure_cpu()) before any JAX "
      "computation so each core becomes its own device.",
      stacklevel=3,
    )


def _tree_bytes(tree) -> int:
  return tree_bytes(tree)


def _has_leaves(tree) -> bool:
  return bool(jax.tree.leaves(tree))


def _aggregator_of(
  algorithm: FederatedAlgorithm, run: RunSpec | None = None
) -> Aggregator:
  """The algorithm's aggregator; bound to ``run`` (``Aggregator.bind``)."""
  agg = algorithm.aggregator
  if agg is None:
    return weighted_mean()
  if not isinstance(agg, Aggregator):
    raise TypeError(
      f"{algorithm.name}: aggregator must be a "
      f"fedjax_lite.aggregators.Aggregator or None, got "
      f"{type(agg).__name__}."
    )
  if run is not None and agg.bind is not None:
    agg = agg.bind(run)
    if not isinstance(agg, Aggregator):
      raise TypeError(
        f"{algorithm.name}: aggregator.bind must return an Aggregator, got "
        f"{type(agg).__name__}."
      )
  return agg


def tree_finite(tree: PyTree) -> jax.Array:
  """bool scalar: every element of every floating leaf is finite."""
  ok = jnp.ones((), bool)
  for x in jax.tree.leaves(tree):
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.inexact):
      ok = ok & jnp.all(jnp.isfinite(x))
  return ok


class _Runs:
  """The round's ``R`` runs: per-run algorithms and aggregators.

  ``map(fn, *args)`` calls ``fn(algorithm, aggregator, *args)`` for every run
  (vmapped over the leading run axis of ``args``; with per-run
  hyperparameters the algorithm is built from that run's traced values).
  """

  def __init__(
    self, algorithm, algorithm_fn, hparams, num_runs, run=None, aggregator=None
  ):
    self.num_runs = num_runs
    self.run = run
    self.algorithm_fn = algorithm_fn
    if algorithm_fn is not None:
      hparams = {k: jnp.asarray(v, jnp.float32) for k, v in hparams.items()}
      if any(v.shape != (num_runs,) for v in hparams.values()):
        raise ValueError(
          f"hparams must be [R={num_runs}] arrays, got "
          f"{ {k: v.shape for k, v in hparams.items()} }."
        )
      probe = algorithm_fn({k: v[0] for k, v in hparams.items()})
    else:
      probe = algorithm
    self.algorithm, self.hparams = algorithm, hparams
    self.probe = probe
    self.probe_aggregator = (
      aggregator
      if aggregator is not None and algorithm_fn is None
      else _aggregator_of(probe, run)
    )

  def of(self, h):
    alg = (
      self.algorithm_fn(h) if self.algorithm_fn is not None else self.algorithm
    )
    if self.algorithm_fn is None:
      return alg, self.probe_aggregator
    return alg, _aggregator_of(alg, self.run)

  def of_run(self, run):
    """The algorithm of run index ``run`` (traced int)."""
    if self.algorithm_fn is None:
      return self.algorithm
    return self.algorithm_fn({n: v[run] for n, v in self.hparams.items()})

  def map(self, fn, *args):
    if self.algorithm_fn is not None:
      return jax.vmap(
        lambda h, *a: fn(*self.of(h), *a), axis_size=self.num_runs
      )(self.hparams, *args)
    alg, agg = self.algorithm, self.probe_aggregator
    return jax.vmap(lambda *a: fn(alg, agg, *a), axis_size=self.num_runs)(*args)


class Engine:
  """Compiles an algorithm's round for a round configuration and a mesh.

  Example::

    engine = Engine(fed_avg(model, optax.sgd(0.1)), RoundConfig(10))
    data = engine.put_data(dataset)
    state = engine.init(model.init(jax.random.PRNGKey(0)), seed=0,
                        num_clients=dataset.num_clients)
    state, metrics = engine.round(state, data)          # one jitted round
    state, history = engine.run(state, data, 100)       # lax.scan over rounds

  Args:
    algorithm: the federated algorithm; its ``aggregator`` (None: weighted
      mean) reduces the clients' updates.
    config: the round configuration.
    mesh: a mesh with a ``"clients"`` axis (default: all devices).
    debug: run rounds client by client in Python without jit (see
      :func:`fedjax_lite.engine.debug_round`): same sampling, rngs, data and
      aggregation, so ``print`` and breakpoints inside ``client_update`` work.
  """

  def __init__(
    self,
    algorithm: FederatedAlgorithm,
    config: RoundConfig,
    mesh: Mesh | None = None,
    *,
    debug: bool = False,
  ):
    checks.instance_of("algorithm", algorithm, FederatedAlgorithm)
    checks.instance_of("config", config, RoundConfig)
    _aggregator_of(algorithm)  # type check early
    self.algorithm = algorithm
    self.config = config
    self.debug = bool(debug)
    self.mesh = mesh if mesh is not None else default_mesh()
    if AXIS not in self.mesh.axis_names:
      raise ValueError(
        f"mesh must have an axis named {AXIS!r}, got {self.mesh.axis_names}."
      )
    self.num_devices = int(self.mesh.shape[AXIS])
    self.platform = self.mesh.devices.reshape(-1)[0].platform
    _warn_if_untuned_cpu(self.platform, self.num_devices)
    self.num_traces = 0
    self._plans: dict = {}
    self._last_plan: BlockPlan | None = None
    self._data_layout: DeviceData | None = None
    self._stateless_aggregator = False
    self._bound: dict = {}
    self._round_jit = jax.jit(self._round_body)
    self._run_jit = jax.jit(self._run_body, static_argnums=2)

  @property
  def aggregator(self) -> Aggregator:
    """The algorithm's aggregator (``algorithm.aggregator`` or weighted mean),
    before it is bound to a run's data (see :meth:`aggregator_for`)."""
    return _aggregator_of(self.algorithm)

  def run_spec(self, data: DeviceData) -> RunSpec:
    """What a round over ``data`` does: population and sampling."""
    cfg = self.config
    return RunSpec(
      population=int(data.num_clients),
      clients_per_round=int(cfg.clients_per_round),
      sampling=cfg.sampling,
      replace=bool(cfg.replace),
    )

  def aggregator_for(self, data: DeviceData) -> Aggregator:
    """The aggregator rounds over ``data`` use (bound to :meth:`run_spec`)."""
    run = self.run_spec(data)
    if run not in self._bound:
      self._bound[run] = _aggregator_of(self.algorithm, run)
    return self._bound[run]

  @property
  def block_sizes(self) -> dict:
    """``{bucket size: clients per device per block}`` of the last planned
    data layout (see :meth:`block_plan`); empty before the first round."""
    return {} if self._last_plan is None else self._last_plan.as_dict

  # ---------------------------------------------------------------- placement
  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def put_data(
    self,
    dataset: FederatedDataset | ClientLoader | DeviceData,
    buckets: int | str | tuple = "auto",
    *,
    model=None,
    placement: str = "replicated",
  ) -> DeviceData:
    """Uploads a dataset to the mesh's devices.

    Args:
      dataset: the packed federated dataset (or, with
        ``placement="sharded"``, a :class:`~fedjax_lite.data.ClientLoader`
        that reads clients' examples on demand).
      buckets: size buckets (``"auto"``, a maximum count, or explicit limits).
      model: its input and label features are checked (present, integer
        class labels in range) before upload; default the algorithm's
        ``model`` (every built-in algorithm that trains a model has one).
      placement: ``"replicated"``: every device holds every client (small
        populations); ``"sharded"``: each device holds ~1/nd of the clients
        and trains the sampled clients it holds (see
        :mod:`fedjax_lite.data.sharding`); results equal replicated data up
        to float summation order.

    Raises:
      MemoryError: the data cannot fit in the devices' memory (the message
        says how much it needs).
    """
    if isinstance(dataset, DeviceData):
      self._data_layout = dataset
      return dataset
    if placement not in _PLACEMENTS:
      raise ValueError(
        f"placement must be one of {_PLACEMENTS}, got {placement!r}."
      )
    if isinstance(dataset, ClientLoader) and placement != "sharded":
      raise TypeError(
        "a ClientLoader reads clients on demand for placement='sharded'; "
        "pack a FederatedDataset for replicated data."
      )
    if model is None:
      model = self.algorithm.model
    if model is not None and isinstance(dataset, FederatedDataset):
      checks.model_features(model, dataset.features, "dataset")
    if placement == "sharded":
      data = to_device_sharded(
        dataset, self.config.local_work, self.mesh, buckets, axis=AXIS
      )
      self._data_layout = data
      return data
    checks.instance_of("dataset", dataset, FederatedDataset)
    local = [
      d
      for d in self.mesh.devices.reshape(-1)
      if d.process_index == jax.process_index()
    ]
    check_data_memory(
      [dataset.num_examples + int(dataset.counts.max())] * len(local),
      sum(v[:1].nbytes for v in dataset.features.values()),
      local,
      what=f"replicated data ({dataset.num_clients} clients, "
      f"{dataset.num_examples} examples on each of {len(local)} devices)",
    )
    data = to_device(
      dataset, self.config.local_work, buckets, sharding=self.replicated
    )
    self._data_layout = data
    return data

  def init(
    self,
    params: PyTree,
    seed: int | jax.Array = 0,
    num_clients: int | None = None,
    *,
    data: DeviceData | None = None,
  ) -> EngineState:
    """The initial state: server state from ``params``, client states if any.

    Args:
      params: initial global model parameters.
      seed: int seed or PRNG key for sampling and client randomness.
      num_clients: population size (required for stateful algorithms).
      data: the device data (default: the last :meth:`put_data`); a stateful
        aggregator sizes its state from one client's update on it (traced
        with ``jax.eval_shape``). Without any, and in debug mode, the
        aggregator state is created in the first round.
    """
    rng = (
      jax.random.PRNGKey(seed)
      if isinstance(seed, (int, np.integer))
      else jnp.asarray(seed)
    )
    server = self.algorithm.server_init(params)
    clients = None
    if self.algorithm.client_init is not None:
      if num_clients is None:
        raise ValueError(
          f"{self.algorithm.name} keeps per-client state: pass "
          "num_clients (the population size) to init()."
        )
      one = self.algorithm.client_init(params)
      clients = jax.tree.map(
        lambda a: jnp.broadcast_to(a, (num_clients,) + a.shape), one
      )
    state = EngineState(
      server=server, clients=clients, round=jnp.zeros((), jnp.int32), rng=rng
    )
    data = data if data is not None else self._data_layout
    if data is not None:
      state = self.init_aggregator_state(state, data)
    return jax.device_put(state, self.replicated)

  def update_spec(self, state: EngineState, data: DeviceData) -> PyTree:
    """Shapes (``jax.ShapeDtypeStruct``) of ONE client's update."""
    one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)

    def update(s):
      cstate = (
        None if s.clients is None else jax.tree.map(lambda a: a[0], s.clients)
      )
      return self._one_client_output(
        self.algorithm,
        self.algorithm.broadcast(s.server),
        cstate,
        data,
        jnp.int32(0),
        s.rng,
        jnp.int32(0),
        data.bucket_sizes[0],
      ).update

    return jax.eval_shape(update, one)

  def init_aggregator_state(
    self, state: EngineState, data: DeviceData
  ) -> EngineState:
    """``state`` with the aggregator's initial state (None if stateless)."""
    if (
      state.aggregator is not None or self._stateless_aggregator or self.debug
    ):  # debug rounds size it from the first client's update
      return state
    agg = self.aggregator_for(data)
    spec = self.update_spec(state, data)
    if not _has_leaves(jax.eval_shape(lambda: agg.init_state(spec))):
      self._stateless_aggregator = True
      return state
    return state.replace(aggregator=agg.init_state(spec))

  # -------------------------------------------------------------------- check
  def _check(self, state: EngineState, data: DeviceData) -> None:
    if not isinstance(data, DeviceData):
      raise TypeError(
        f"data must be DeviceData (use engine.put_data(dataset)),"
        f" got {type(data).__name__}."
      )
    c = data.num_clients
    m = self.config.clients_per_round
    if data.sharded:
      shards = jax.tree.leaves(data.features)[0].shape[0]
      if shards != self.num_devices:
        raise ValueError(
          f"the data is sharded over {shards} devices but the engine's mesh "
          f"has {self.num_devices}; upload it with this engine's put_data."
        )
    if self.config.sampling == "all" and m != c:
      raise ValueError(
        f"sampling='all' needs clients_per_round == population; "
        f"got clients_per_round={m} for {c} clients."
      )
    if m > c and not self.config.replace:
      raise ValueError(
        f"clients_per_round={m} is larger than the population "
        f"of {c} clients; expected at most {c} (or "
        "replace=True)."
      )
    if state.clients is not None:
      n = jax.tree.leaves(state.clients)[0].shape[0]
      if n != c:
        raise ValueError(
          f"state holds client states for {n} clients but the "
          f"data has {c}; init the engine with num_clients={c}."
        )

  # ------------------------------------------------------------------- public
  def round(
    self, state: EngineState, data: DeviceData
  ) -> tuple[EngineState, dict]:
    """Runs one round (compiled once per data layout)."""
    self._check(state, data)
    state = self.init_aggregator_state(state, data)
    if self.debug:
      from fedjax_lite.engine.debug import debug_round  # pylint: disable=g-import-not-at-top

      state, metrics = debug_round(self, state, data)
    else:
      state, metrics = self._round_jit(state, data)
    return state, self.check_metrics(metrics, data)

  def run(
    self, state: EngineState, data: DeviceData, num_rounds: int
  ) -> tuple[EngineState, dict]:
    """Runs ``num_rounds`` rounds in one ``lax.scan`` (no host work between).

    Returns the final state and metrics stacked over rounds.
    """
    checks.positive_int("num_rounds", num_rounds)
    self._check(state, data)
    state = self.init_aggregator_state(state, data)
    if self.debug:
      history = []
      for _ in range(int(num_rounds)):
        state, metrics = self.round(state, data)
        history.append(metrics)
      return state, jax.tree.map(lambda *xs: jnp.stack(xs), *history)
    state, metrics = self._run_jit(state, data, int(num_rounds))
    return state, self.check_metrics(metrics, data)

  def check_metrics(self, metrics: dict, data: DeviceData) -> dict:
    """Host-side checks of a round's metrics (one round, or stacked over
    rounds or runs): ``RoundConfig(nonfinite="raise")`` and the
    aggregator's ``check_output``. Returns the metrics without the engine's
    private entries. :meth:`round` and :meth:`run` call it; call it yourself
    after :meth:`round_body` or :meth:`rounds_body`."""
    metrics = dict(metrics)
    bad = metrics.pop(_NONFINITE_IDS, None)
    if bad is not None:
      bad = np.asarray(jax.device_get(bad)).reshape(-1)
      bad = np.unique(bad[bad >= 0])
      if bad.size:
        raise NonFiniteUpdateError(
          f"{bad.size} client update(s) held NaN or infinity (client ids "
          f"{bad[:20].tolist()}{' ...' if bad.size > 20 else ''}); "
          'RoundConfig(nonfinite="drop") leaves such clients out of the '
          "round instead."
        )
    check = self.aggregator_for(data).check_output
    if check is not None:
      check(jax.device_get(metrics))
    return metrics

  def round_body(
    self, state: EngineState, data: DeviceData
  ) -> tuple[EngineState, dict]:
    """The round as a pure, traceable function (not jitted).

    Use it to compose rounds with other transformations, e.g. ``jax.vmap``
    over a leading axis of states (several seeds) or hyperparameters.
    """
    return self._round_body(state, data)

  def expected_clients(self, data: DeviceData, bucket: int) -> float:
    """Expected number of a round's clients that fall in ``bucket``."""
    cfg = self.config
    return expected_clients(
      data, bucket, cfg.clients_per_round, cfg.sampling, cfg.replace
    )

  def block_plan(
    self, data: DeviceData, state: EngineState, num_runs: int = 1
  ) -> BlockPlan:
    """The block sizes a round over ``data`` uses (host side, cached).

    Args:
      data: the device data (its layout: bucket sizes and counts).
      state: ONE run's EngineState (arrays or ``ShapeDtypeStruct``).
      num_runs: pooled runs sharing the blocks.
    """
    bcast = jax.eval_shape(self.algorithm.broadcast, state.server)
    cstate = (
      None
      if state.clients is None
      else jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), state.clients
      )
    )
    return self._plan(data, bcast, cstate, num_runs)

  # ------------------------------------------------------------------ tracing
  def _plan(
    self, data, broadcast_spec, client_state_spec, num_runs
  ) -> BlockPlan:
    spec = lambda t: tuple(
      (tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(t)
    )
    key = (
      data.bucket_sizes,
      data.bucket_clients,
      data.bucket_examples,
      data.num_clients,
      tuple(
        (k, tuple(v.shape[1:]), str(v.dtype))
        for k, v in sorted(data.features.items())
      ),
      spec(broadcast_spec),
      spec(client_state_spec),
      int(num_runs),
    )
    if key not in self._plans:
      cfg = self.config
      self._plans[key] = make_plan(
        data,
        cfg.local_work,
        clients_per_round=cfg.clients_per_round,
        sampling=cfg.sampling,
        replace=cfg.replace,
        block_size=cfg.block_size,
        num_devices=self.num_devices,
        platform=self.platform,
        broadcast_spec=broadcast_spec,
        client_state_spec=client_state_spec,
        num_runs=num_runs,
      )
    self._last_plan = self._plans[key]
    return self._last_plan

  def _run_body(self, state, data, num_rounds):
    def body(s, _):
      return self._round_body(s, data)

    return jax.lax.scan(body, state, None, length=num_rounds)

  def _constrain(self, x, spec):
    if self.num_devices == 1:
      return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

  def _sample(self, rng, data: DeviceData):
    cfg = self.config
    c = data.num_clients
    if cfg.sampling == "all":
      return jnp.arange(c, dtype=jnp.int32)
    weights = (
      data.counts.astype(jnp.float32) if cfg.sampling == "weighted" else None
    )
    return sample_clients(rng, c, cfg.clients_per_round, weights, cfg.replace)

  def _one_client_output(
    self, alg, bcast, cstate, data, cid, k_clients, slot, bucket_size
  ):
    """ONE client's ``ClientOutput`` (the jitted and debug rounds share it).

    With client-sharded data this reads the shard of the client's device
    (in the jitted round every device passes the view of its own shard)."""
    k_data, k_train = client_keys(k_clients, slot)
    if data.sharded:
      data = data.shard_view(data.owner[cid])
    cdata = gather_client(
      data, cid, k_data, self.config.local_work, bucket_size, slot
    )
    return alg.client_update(bcast, cstate, cdata, k_train)

  def _round_body(self, state: EngineState, data: DeviceData):
    states = jax.tree.map(lambda a: a[None], state)
    new, metrics = self.rounds_body(states, data)
    return jax.tree.map(lambda a: a[0], (new, metrics))

  def _sorted_sample(self, k_sample, data, num_runs, active=None):
    """Every run's sample as (ids, slots, runs), sorted by size bucket, and
    each bucket's ``(start, count)`` in that order. With ``active`` (``[R]``
    counts ``K``, see ``Aggregator.active_slots``) the slots ``>= K`` of each
    run sort last and are in no bucket's count: they are not trained."""
    m = self.config.clients_per_round
    ids = jax.vmap(lambda k: self._sample(k, data))(k_sample).reshape(-1)
    runs = jnp.repeat(jnp.arange(num_runs, dtype=jnp.int32), m)
    slots = jnp.tile(jnp.arange(m, dtype=jnp.int32), num_runs)
    nb = len(data.bucket_sizes)
    if nb == 1 and not data.sharded and active is None:
      counts = jnp.full((1,), num_runs * m, jnp.int32)
      return ids, slots, runs, jnp.zeros((1,), jnp.int32), counts
    # Groups: (bucket, device) with sharded data (device d trains the
    # clients it holds), else buckets; one last group for inactive slots.
    nd = self.num_devices if data.sharded else 1
    key = data.bucket[ids] * nd + (data.owner[ids] if data.sharded else 0)
    if active is not None:
      key = jnp.where(slots < active[runs], key, nb * nd)
    order = jnp.argsort(key, stable=True)
    ids, slots, runs, key = ids[order], slots[order], runs[order], key[order]
    counts = jnp.zeros((nb * nd + 1,), jnp.int32).at[key].add(1)[:-1]
    starts = jnp.cumsum(counts) - counts
    if data.sharded:
      return ids, slots, runs, starts.reshape(nb, nd), counts.reshape(nb, nd)
    return ids, slots, runs, starts, counts

  def _aggregator_states(self, runs: _Runs, states, update_spec):
    """Per-run aggregator states ``[R, ...]`` (leafless ones rebuilt)."""
    agg = runs.probe_aggregator
    fresh_spec = jax.eval_shape(lambda: agg.init_state(update_spec))
    if not _has_leaves(fresh_spec):
      return runs.map(lambda alg, ag: ag.init_state(update_spec)), False
    if states.aggregator is None:
      return runs.map(lambda alg, ag: ag.init_state(update_spec)), True
    want = jax.tree.structure(fresh_spec)
    got = jax.tree.structure(jax.tree.map(lambda a: a[0], states.aggregator))
    if want != got:
      raise ValueError(
        f"EngineState.aggregator has structure {got}, but "
        f"aggregator {agg.name} keeps {want}; init the state "
        "with this engine (engine.init) or set "
        "state.replace(aggregator=None) to start it afresh."
      )
    return states.aggregator, True

  def _check_aggregator(self, runs: _Runs, update_spec):
    agg = runs.probe_aggregator
    if agg.materialized:
      check_materialized_memory(
        agg.name,
        num_slots=self.config.clients_per_round,
        one_update=update_bytes(update_spec),
        num_runs=runs.num_runs,
        num_devices=self.num_devices,
        device=self.mesh.devices.reshape(-1)[0],
      )

  def rounds_body(
    self,
    states: EngineState,
    data: DeviceData,
    algorithm_fn: Callable[[dict], FederatedAlgorithm] | None = None,
    hparams: dict | None = None,
  ) -> tuple[EngineState, dict]:
    """One round of ``R`` independent runs as ONE pooled round (traceable).

    ``states`` carries a leading run axis ``R`` on every leaf (server,
    clients, round, rng, aggregator). Every run samples its own clients with
    its own rng, exactly as a separate :meth:`round` would; the sampled
    clients of all runs then share the size-bucket blocks (full blocks
    instead of ``R`` partly filled ones), and aggregation (with each run's
    own aggregator state) and the server update stay per run. Results equal
    ``R`` separate rounds up to float summation order.

    The stages of the module docstring: block plan, sample, blocks (gather,
    client update, aggregator add), merge and finalize, server update; ``R ==
    1`` is the ordinary round (:meth:`round`).

    Args:
      states: ``R`` stacked EngineStates.
      data: the device data.
      algorithm_fn: optional ``hparams -> FederatedAlgorithm`` for runs that
        differ in hyperparameters (called with traced scalars); default: this
        engine's algorithm for every run.
      hparams: ``{name: [R] values}`` passed to ``algorithm_fn``.
    """
    if (algorithm_fn is None) != (hparams is None):
      raise ValueError("pass algorithm_fn and hparams together.")
    if not isinstance(states, EngineState) or jnp.ndim(states.round) != 1:
      raise ValueError(
        "rounds_body expects EngineStates stacked on a leading "
        "run axis (round of shape [R]); stack them with "
        "jax.tree.map(lambda *xs: jnp.stack(xs), *states)."
      )
    R = int(jnp.shape(states.round)[0])
    bad = [x.shape for x in jax.tree.leaves(states) if x.shape[:1] != (R,)]
    if bad:
      raise ValueError(
        f"every state leaf needs the leading run axis of size "
        f"{R}; got leaves of shape {bad[:3]}."
      )
    self.num_traces += 1
    runs = _Runs(
      self.algorithm,
      algorithm_fn,
      hparams,
      R,
      run=self.run_spec(data),
      aggregator=self.aggregator_for(data),
    )
    k_sample, k_clients, k_agg = jax.vmap(round_keys)(states.rng, states.round)
    broadcast = runs.map(lambda a, _, s: a.broadcast(s), states.server)
    one_broadcast = jax.tree.map(lambda a: a[0], broadcast)
    one_cstates = (
      None
      if states.clients is None
      else jax.tree.map(lambda a: a[0], states.clients)
    )
    plan = self._plan(
      data,
      jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), one_broadcast
      ),
      None
      if one_cstates is None
      else jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), one_cstates
      ),
      R,
    )

    # One client's output shapes (zero accumulators, aggregator state).
    cs0 = (
      None if one_cstates is None else jax.tree.map(lambda a: a[0], one_cstates)
    )
    out_shape = jax.eval_shape(
      lambda: self._one_client_output(
        runs.probe,
        one_broadcast,
        cs0,
        data,
        jnp.int32(0),
        k_clients[0],
        jnp.int32(0),
        data.bucket_sizes[0],
      )
    )
    self._check_aggregator(runs, out_shape.update)
    agg_states, stateful_agg = self._aggregator_states(
      runs, states, out_shape.update
    )
    active = None
    if runs.probe_aggregator.active_slots is not None:
      active = runs.map(lambda alg, ag, st: ag.active_slots(st), agg_states)
    sample = self._sorted_sample(k_sample, data, R, active)

    carry = self._init_carry(runs, states, agg_states, out_shape)
    inputs = _BlockInputs(
      runs,
      plan,
      sample,
      data,
      broadcast,
      one_broadcast,
      k_clients,
      agg_states,
    )
    for j, bucket_size in enumerate(plan.bucket_sizes):
      step = self._block_step(inputs, j, bucket_size)
      start, count = sample[3][j], sample[4][j]
      if data.sharded:  # blocks until the fullest device is done
        blk, most = plan.block_sizes[j], jnp.max(count)
      else:
        blk, most = plan.num_devices * plan.block_sizes[j], count
      carry = jax.lax.fori_loop(
        0,
        (most + blk - 1) // blk,
        lambda i, c, step=step, start=start, count=count: step(
          i, c, start, count
        ),
        carry,
      )

    output, new_agg_states = self._reduce(runs, carry["acc"], agg_states, k_agg)
    agg = Aggregate(
      mean=output.mean,
      total_weight=output.total_weight,
      num_clients=jnp.sum(carry["count"], axis=0),
      metrics=jax.tree.map(lambda a: a.sum(0), carry["metrics"]),
    )
    server = runs.map(
      lambda a, _, s, g: a.server_update(s, g), states.server, agg
    )
    new_states = EngineState(
      server=server,
      clients=carry["clients"],
      round=states.round + 1,
      rng=states.rng,
      aggregator=new_agg_states if stateful_agg else None,
    )
    metrics = finalize_metrics(agg)
    metrics["dropped_nonfinite"] = jnp.sum(carry["extra"]["dropped"], axis=0)
    if "bad_ids" in carry["extra"]:
      metrics[_NONFINITE_IDS] = jnp.max(carry["extra"]["bad_ids"], axis=0)
    for name, value in output.metrics.items():
      if name in metrics:
        raise ValueError(
          f"aggregator {runs.probe_aggregator.name} reports a "
          f"metric {name!r} that the round already reports "
          f"({sorted(metrics)}); rename it."
        )
      metrics[name] = value
    return new_states, metrics

  def _per_device(self, tree, R):
    """A per-run tree ``[R, ...]`` -> ``[nd, R, ...]`` (one copy per device),
    sharded over devices."""
    nd = self.num_devices
    return jax.tree.map(
      lambda a: self._constrain(jnp.broadcast_to(a, (nd,) + a.shape), P(AXIS)),
      tree,
    )

  def _init_carry(self, runs: _Runs, states, agg_states, out_shape):
    nd, R = self.num_devices, runs.num_runs
    m = self.config.clients_per_round
    spec = out_shape.update
    if R == 1 and runs.algorithm_fn is None:
      one = jax.tree.map(lambda a: a[0], agg_states)
      acc = jax.tree.map(
        lambda a: a[None], runs.probe_aggregator.init(one, spec, m)
      )
    else:
      acc = runs.map(lambda _, ag, st: ag.init(st, spec, m), agg_states)

    def zeros(shape_tree):
      return jax.tree.map(
        lambda s: self._constrain(
          jnp.zeros(
            (nd, R) + s.shape,
            jnp.float32 if jnp.issubdtype(s.dtype, jnp.integer) else s.dtype,
          ),
          P(AXIS),
        ),
        shape_tree,
      )

    extra = {
      "dropped": self._constrain(jnp.zeros((nd, R), jnp.float32), P(AXIS))
    }
    if self.config.nonfinite == "raise":  # client id per slot, -1: finite
      extra["bad_ids"] = self._constrain(
        jnp.full((nd, R, m), -1, jnp.int32), P(AXIS)
      )
    return {
      "acc": self._per_device(acc, R),
      "count": self._constrain(jnp.zeros((nd, R), jnp.float32), P(AXIS)),
      "metrics": zeros(out_shape.metrics),
      "extra": extra,
      "clients": states.clients,
    }

  def _block_step(self, inputs: "_BlockInputs", j: int, bucket_size: int):
    """``(i, carry, start, count) -> carry``: block ``i`` of bucket ``j``."""
    runs, plan, sample, data = inputs[:4]
    broadcast, one_broadcast, k_clients, agg_states = inputs[4:]
    nd, bpd = plan.num_devices, plan.block_sizes[j]
    blk, R = nd * bpd, runs.num_runs
    c = data.num_clients
    ids, slots, run_ids, _, _ = sample
    zpad = jnp.zeros((plan.pad,), jnp.int32)
    ids_pad = jnp.concatenate([ids, zpad])
    slots_pad = jnp.concatenate([slots, zpad])
    runs_pad = jnp.concatenate([run_ids, zpad])

    def block_clients(i, start, count):
      """``(valid, client id, slot, run)`` of the block, device-major."""
      if data.sharded:  # device d: its next B clients, from start[d]
        local = i * bpd + jnp.arange(bpd)
        valid = (local[None, :] < count[:, None]).reshape(-1)
        pos = jnp.where(valid, (start[:, None] + local[None, :]).reshape(-1), 0)
        return valid, ids_pad[pos], slots_pad[pos], runs_pad[pos]
      lo = start + i * blk
      valid = lo + jnp.arange(blk) < start + count
      cut = lambda a: jax.lax.dynamic_slice(a, (lo,), (blk,))
      return valid, cut(ids_pad), cut(slots_pad), cut(runs_pad)

    def device_block(features, bcast, cstate, cid, slot, run, valid, part):
      """One device's ``B`` clients: their client work and the device's
      accumulator, count and metric sums (``part``, leading axis 1). Runs
      under ``shard_map``, so no device ever computes another's clients."""
      view = data.replace(
        features=features
        if not data.sharded
        else {k: v[0] for k, v in features.items()},
        bucket=data.counts if data.sharded else data.bucket,
        owner=None,
      )
      b_axis = None if R == 1 else 0
      client = lambda b, s, c, sl, r: self._one_client_output(
        runs.of_run(r), b, s, view, c, k_clients[r], sl, bucket_size
      )
      if bpd == 1:  # one client per device: no vmap of size 1 (whose
        # batched shapes and predicates would reach every client op)
        first = lambda t: jax.tree.map(lambda a: a[0], t)
        out = client(
          bcast if b_axis is None else first(bcast),
          first(cstate),
          cid[0],
          slot[0],
          run[0],
        )
        out = jax.tree.map(lambda a: jnp.asarray(a)[None], out)
      else:
        out = jax.vmap(client, in_axes=(b_axis, 0, 0, 0, 0))(
          bcast, cstate, cid, slot, run
        )
      acc, count, metrics, extra = part
      # Non-finite updates (or weights) leave the round here, before any
      # aggregator sees them (RoundConfig.nonfinite).
      finite = jax.vmap(tree_finite)(out.update) & jnp.isfinite(
        jnp.asarray(out.weight, jnp.float32).reshape(-1)
      )
      bad = valid & ~finite
      valid = valid & finite
      extra = dict(extra)
      extra["dropped"] = extra["dropped"] + _per_device_sum(
        bad.astype(jnp.float32), bad, run, 1, bpd, R
      )
      if "bad_ids" in extra:
        extra["bad_ids"] = (
          extra["bad_ids"]
          .at[0, run, jnp.where(bad, slot, self.config.clients_per_round)]
          .set(cid, mode="drop")
        )
      acc = self._add(runs, acc, agg_states, out, valid, slot, run, 1, bpd)
      count = count + _per_device_sum(
        valid.astype(jnp.float32), valid, run, 1, bpd, R
      )
      metrics = jax.tree.map(
        lambda a, v: a + _per_device_sum(v, valid, run, 1, bpd, R),
        metrics,
        out.metrics,
      )
      return (acc, count, metrics, extra), (out.state, finite)

    per_device = P(AXIS)
    data_spec = P(AXIS) if data.sharded else P()
    bcast_spec = P() if R == 1 else per_device

    def step(i, carry, start, count):
      valid, cid, slot, run = block_clients(i, start, count)
      cid = jnp.where(valid, cid, 0)
      stateful = carry["clients"] is not None
      cstate = (
        None
        if not stateful
        else jax.tree.map(lambda a: a[run, cid], carry["clients"])
      )
      bcast = (
        one_broadcast if R == 1 else jax.tree.map(lambda a: a[run], broadcast)
      )
      part = (carry["acc"], carry["count"], carry["metrics"], carry["extra"])
      part, (state, finite) = jax.shard_map(
        device_block,
        mesh=self.mesh,
        in_specs=(data_spec, bcast_spec) + (per_device,) * 6,
        out_specs=per_device,
        # Client code (custom VJPs, callbacks) need not know about manual
        # axes; nothing inside communicates across devices.
        check_vma=False,
      )(data.features, bcast, cstate, cid, slot, run, valid, part)
      new = dict(carry)
      new["acc"], new["count"], new["metrics"], new["extra"] = part
      if stateful:
        # A dropped (non-finite) client keeps its previous state.
        idx = jnp.where(valid & finite, cid, c)
        new["clients"] = jax.tree.map(
          lambda a, s: a.at[run, idx].set(s.astype(a.dtype), mode="drop"),
          carry["clients"],
          state,
        )
      return new

    return step

  def _add(self, runs: _Runs, acc, agg_states, out, valid, slot, run, nd, bpd):
    """The aggregator's ``add`` on every device's part of the block (and,
    pooled, every run's clients of it)."""
    by_device = lambda x: x.reshape((nd, bpd) + x.shape[1:])
    updates = jax.tree.map(by_device, out.update)
    weights = by_device(jnp.asarray(out.weight, jnp.float32).reshape(-1))
    valid, slot, run = by_device(valid), by_device(slot), by_device(run)
    if runs.num_runs == 1 and runs.algorithm_fn is None:
      agg = runs.probe_aggregator
      st = jax.tree.map(lambda a: a[0], agg_states)
      a0 = jax.tree.map(lambda a: a[:, 0], acc)
      new = jax.vmap(lambda a, u, w, v, s: agg.add(st, a, u, w, v, s))(
        a0, updates, weights, valid, slot
      )
      return jax.tree.map(lambda a: a[:, None], new)

    def per_device(acc_d, u, w, v, s, r):
      # acc_d [R, ...]: every run adds its own clients of the device's block.
      def per_run(_, ag, st, a, run_index):
        return ag.add(st, a, u, w, v & (r == run_index), s)

      return runs.map(
        per_run, agg_states, acc_d, jnp.arange(runs.num_runs, dtype=jnp.int32)
      )

    return jax.vmap(per_device)(acc, updates, weights, valid, slot, run)

  def _reduce(self, runs: _Runs, acc, agg_states, k_agg):
    """Merge over devices, then finalize every run: ``(AggregatorOutput
    [R, ...], new aggregator states [R, ...])``."""
    if runs.num_runs == 1 and runs.algorithm_fn is None:
      # vmapped over the run axis of size 1 (in place, axis 1 of acc): the
      # shapes, hence XLA's fusions and float results, of the reduction
      # before aggregators existed.
      agg = runs.probe_aggregator
      return jax.vmap(
        lambda a, st, k: agg.finalize(st, agg.merge(a), k), in_axes=(1, 0, 0)
      )(acc, agg_states, k_agg)

    def per_run(_, ag, a, st, k):
      return ag.finalize(st, ag.merge(a), k)

    by_run = jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), acc)
    return runs.map(per_run, by_run, agg_states, k_agg)


class _BlockInputs(NamedTuple):
  """What every block step of a round reads (fixed for the round)."""

  runs: _Runs
  plan: BlockPlan
  sample: tuple  # (ids, slots, runs, starts, counts), see _sorted_sample
  data: DeviceData
  broadcast: PyTree  # [R, ...] every run's broadcast
  one_broadcast: PyTree  # run 0's (the only one when R == 1)
  k_clients: jax.Array  # [R] client keys of the round
  agg_states: PyTree  # [R, ...] aggregator states


def _per_device_sum(x, valid, run, nd, bpd, R):
  """``[blk, ...]`` -> ``[nd, R, ...]``: each device's sum per run of the
  valid clients (client metrics and counts)."""
  blk = nd * bpd
  v = valid.reshape((blk,) + (1,) * (x.ndim - 1))
  x = jnp.where(v, x, jnp.zeros((), x.dtype))
  x = x.reshape((nd, bpd) + x.shape[1:])
  if jnp.issubdtype(x.dtype, jnp.integer):
    x = x.astype(jnp.float32)
  if R == 1:
    return jnp.sum(x, axis=1)[:, None]
  onehot = (
    (run[:, None] == jnp.arange(R)[None, :]).astype(x.dtype).reshape(nd, bpd, R)
  )
  return jnp.einsum(
    "dbr,db...->dr...", onehot, x, precision=jax.lax.Precision.HIGHEST
  )


def finalize_metrics(agg: Aggregate) -> dict:
  """``{name: sum/count}`` for every ``(sum, count)`` pair, plus totals."""
  out = {}
  for name, pair in agg.metrics.items():
    if isinstance(pair, (tuple, list)) and len(pair) == 2:
      s, n = pair
      out[name] = s / jnp.maximum(n, 1e-12)
    else:
      out[name] = pair
  out["num_clients"] = agg.num_clients
  out["total_weight"] = agg.total_weight
  return out
