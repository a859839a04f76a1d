r"""The round engine: one round of federated training as ONE jitted function.

:class:`Engine` ties an algorithm, a :class:`RoundConfig` and a device mesh
to the round's stages (:mod:`fedjax_lite.engine.stages`)::

    block plan (host side, once per data layout)  -> sample -> gather
    -> client work on a block -> aggregator add -> merge -> finalize
    -> server update

run by one of two backends over the same stage functions: the jitted one
(:mod:`fedjax_lite.engine.blocks`: vmapped blocks in ``lax`` loops, sharded
over devices) or, with ``Engine(..., debug=True)``, the debug one
(:mod:`fedjax_lite.engine.debug`: clients one by one in Python, no jit).

The aggregator is ``algorithm.aggregator`` (None: :func:`weighted_mean`, the
FedAvg reduction); its state (e.g. an adaptive clip norm) lives in
``EngineState.aggregator`` (made by :meth:`Engine.init`) and its metrics
join the round's metrics. Several independent runs (seeds, hyperparameter
settings) can share one round (:meth:`Engine.rounds_body`).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedjax_lite import checks
from fedjax_lite.aggregators.base import Aggregator, RunSpec
from fedjax_lite.algorithms.base import FederatedAlgorithm
from fedjax_lite.data import placement as placement_lib
from fedjax_lite.data.batching import DeviceData
from fedjax_lite.data.federated_dataset import FederatedDataset
from fedjax_lite.data.sharding import ClientLoader
from fedjax_lite.engine import blocks, stages
from fedjax_lite.engine.debug import debug_round
from fedjax_lite.engine.plan import (
  BlockPlan,
  auto_block_size,
  expected_clients,
  make_plan,
)
from fedjax_lite.engine.stages import (
  NONFINITE_IDS as _NONFINITE_IDS,
  client_keys,
  finalize_metrics,
  round_keys,
  tree_finite,
)
from fedjax_lite.engine.state import (
  AXIS,
  EngineState,
  NonFiniteUpdateError,
  RoundConfig,
)

PyTree = Any

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


def _layout_key(data: DeviceData) -> tuple:
  """The static layout of ``data`` (what a traced round depends on)."""
  return (
    data.bucket_sizes,
    data.bucket_clients,
    data.bucket_examples,
    data.num_clients,
    data.sharded,
    tuple(
      (k, tuple(v.shape[1:]), str(v.dtype))
      for k, v in sorted(data.features.items())
    ),
  )


def _stack1(tree):
  return jax.tree.map(lambda a: jnp.asarray(a)[None], tree)


def _unstack1(tree):
  return jax.tree.map(lambda a: a[0], tree)


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
      :func:`fedjax_lite.engine.debug_round`): the same stage functions, so
      ``print`` and breakpoints inside ``client_update`` work, and an error
      names the client and the stage.
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
    stages.aggregator_of(algorithm)  # type check early
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
    self._keeps_state: dict = {}
    self._bound: dict = {}
    self._round_jit = jax.jit(self._round_body)
    self._run_jit = jax.jit(self._run_body, static_argnums=2)

  @property
  def aggregator(self) -> Aggregator:
    """The algorithm's aggregator (``algorithm.aggregator`` or weighted mean),
    before it is bound to a run's data (see :meth:`aggregator_for`)."""
    return stages.aggregator_of(self.algorithm)

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
      self._bound[run] = stages.aggregator_of(self.algorithm, run)
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
    """Uploads a dataset to the mesh's devices
    (:func:`fedjax_lite.data.placement.put_data` with this engine's mesh and
    local work); already placed :class:`DeviceData` is returned as is.

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
    if not isinstance(dataset, DeviceData):
      dataset = placement_lib.put_data(
        dataset,
        self.config.local_work,
        self.mesh,
        buckets,
        model=self.algorithm.model if model is None else model,
        placement=placement,
        axis=AXIS,
      )
    self._data_layout = dataset
    return dataset

  # -------------------------------------------------------------------- state
  def init(
    self,
    params: PyTree,
    seed: int | jax.Array = 0,
    num_clients: int | None = None,
    *,
    data: DeviceData | None = None,
    defer_aggregator: bool = False,
  ) -> EngineState:
    """The complete initial state: server state from ``params``, client
    states if any, and the aggregator's state.

    Args:
      params: initial global model parameters.
      seed: int seed or PRNG key for sampling and client randomness.
      num_clients: population size (required for stateful algorithms).
      data: the device data (default: the last :meth:`put_data`). With data
        the round's client work is traced once here (``jax.eval_shape``):
        a stateful aggregator sizes its state from one client's update.
      defer_aggregator: leave the aggregator's state None (the first round
        makes it from that round's data), for callers whose data only
        arrives with the rounds (e.g. the TFF-style processes of
        :mod:`fedjax_lite.learning`).

    Raises:
      ValueError: the aggregator may keep state and no data is known (pass
        ``data=engine.put_data(dataset)``).
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
    if not defer_aggregator:
      state = state.replace(aggregator=self._initial_aggregator(state, data))
    return jax.device_put(state, self.replicated)

  def _initial_aggregator(self, state: EngineState, data: DeviceData | None):
    """The aggregator's initial state for ``state`` (None if stateless)."""
    if data is None:
      agg = self.aggregator
      if stages.keeps_no_state(agg):
        return None
      raise ValueError(
        f"{self.algorithm.name}: aggregator {agg.name} may keep state sized "
        "from one client's update, and this engine has no data yet; pass "
        "the device data: engine.init(params, ..., "
        "data=engine.put_data(dataset)) (or call put_data before init)."
      )
    self.check_inputs(state, data)
    agg = self.aggregator_for(data)
    if self.debug and stages.keeps_no_state(agg):
      return None  # debug: client code may need concrete values, no tracing
    spec = self.update_spec(state, data)
    new = agg.init_state(spec)
    keeps = bool(jax.tree.leaves(new))
    self._keeps_state[(self.run_spec(data), _layout_key(data))] = keeps
    return new if keeps else None

  def update_spec(self, state: EngineState, data: DeviceData) -> PyTree:
    """Shapes (``jax.ShapeDtypeStruct``) of ONE client's update (the
    round's gather and client work, traced with ``jax.eval_shape``; in
    debug mode, client code that needs concrete values runs once)."""

    def update(s):
      cstate = (
        None if s.clients is None else jax.tree.map(lambda a: a[0], s.clients)
      )
      return stages.client_output(
        self.config,
        self.algorithm,
        self.algorithm.broadcast(s.server),
        cstate,
        data,
        jnp.int32(0),
        s.rng,
        jnp.int32(0),
        data.bucket_sizes[0],
      ).update

    one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    try:
      return jax.eval_shape(update, one)
    except (
      jax.errors.ConcretizationTypeError,
      jax.errors.TracerIntegerConversionError,
      jax.errors.TracerArrayConversionError,
    ):
      if not self.debug:
        raise
    with jax.disable_jit():
      out = update(state)
    return jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.asarray(a).dtype), out
    )

  def init_aggregator_state(
    self, state: EngineState, data: DeviceData
  ) -> EngineState:
    """``state``, with a fresh aggregator state where its ``aggregator`` is
    None and the aggregator keeps state (states from :meth:`init` are
    complete already)."""
    if state.aggregator is not None:
      return state
    key = (self.run_spec(data), _layout_key(data))
    if self._keeps_state.get(key, True) is False:
      return state
    return state.replace(aggregator=self._initial_aggregator(state, data))

  # -------------------------------------------------------------------- check
  def check_inputs(self, state: EngineState, data: DeviceData) -> None:
    """Host-side checks of a round's inputs (data type and layout,
    population, client states); the round calls it."""
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
    """Runs one round (compiled once per data layout; debug engines run
    :func:`~fedjax_lite.engine.debug_round`)."""
    self.check_inputs(state, data)
    state = self.init_aggregator_state(state, data)
    if self.debug:
      state, metrics = debug_round(self, state, data)
    else:
      state, metrics = self._round_jit(state, data)
    return state, self.check_metrics(metrics, data)

  def run(
    self, state: EngineState, data: DeviceData, num_rounds: int
  ) -> tuple[EngineState, dict]:
    """Runs ``num_rounds`` rounds in one ``lax.scan`` (no host work between;
    debug engines: debug rounds one by one, metrics stacked alike).

    Returns the final state and metrics stacked over rounds.
    """
    checks.positive_int("num_rounds", num_rounds)
    self.check_inputs(state, data)
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
    """The round as a pure, traceable function (not jitted), to compose
    with other transformations (``jax.jit``, ``lax.scan``).

    Several runs (seeds, hyperparameter settings) are one pooled round of
    :meth:`rounds_body` (their clients share the blocks), not a
    ``jax.vmap`` of this one.
    """
    return self._round_body(state, data)

  def rounds_body(
    self,
    states: EngineState,
    data: DeviceData,
    algorithm_fn: Callable[[dict], FederatedAlgorithm] | None = None,
    hparams: dict | None = None,
    given: blocks.GivenSample | None = None,
  ) -> tuple[EngineState, dict]:
    """One round of ``R`` independent runs as ONE pooled round (traceable).

    ``states`` carries a leading run axis ``R`` on every leaf (server,
    clients, round, rng, aggregator). Every run samples its own clients with
    its own rng, exactly as a separate :meth:`round` would; the sampled
    clients of all runs then share the size-bucket blocks (full blocks
    instead of ``R`` partly filled ones), and aggregation (with each run's
    own aggregator state) and the server update stay per run. Results equal
    ``R`` separate rounds up to float summation order. An ordinary round is
    the pooled round of one run.

    Args:
      states: ``R`` stacked EngineStates.
      data: the device data.
      algorithm_fn: optional ``hparams -> FederatedAlgorithm`` for runs that
        differ in hyperparameters (called with traced scalars); default: this
        engine's algorithm for every run.
      hparams: ``{name: [R] values}`` passed to ``algorithm_fn``.
      given: the round's clients (and broadcasts) chosen by the caller
        (:class:`~fedjax_lite.engine.blocks.GivenSample`, e.g. by a
        simulated clock) instead of sampled.
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
    runs = self.runs_for(data, R, algorithm_fn, hparams)
    return blocks.pooled_round(self, runs, states, data, given)

  def runs_for(
    self,
    data: DeviceData,
    num_runs: int = 1,
    algorithm_fn: Callable[[dict], FederatedAlgorithm] | None = None,
    hparams: dict | None = None,
  ) -> stages.Runs:
    """The :class:`~fedjax_lite.engine.stages.Runs` of ``num_runs`` runs on
    ``data`` (the engine's algorithm, or ``algorithm_fn(hparams[r])`` per
    run), with the run spec and aggregator bound to ``data``."""
    return stages.Runs(
      self.algorithm,
      algorithm_fn,
      hparams,
      num_runs,
      run=self.run_spec(data),
      aggregator=self.aggregator_for(data),
    )

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
      _layout_key(data),
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

  def _round_body(self, state: EngineState, data: DeviceData):
    new, metrics = self.rounds_body(_stack1(state), data)
    return _unstack1((new, metrics))

  def _run_body(self, state, data, num_rounds):
    def body(s, _):
      return self._round_body(s, data)

    return jax.lax.scan(body, state, None, length=num_rounds)
