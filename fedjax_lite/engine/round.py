r"""The round engine: sampling, gathering, local training, aggregation and the
server update in ONE jitted function.

Layout of a round (``nd`` devices on the ``"clients"`` mesh axis, ``B`` clients
per device per block)::

    ids = sample(rng)                           # [clients_per_round]
    sort ids by size bucket                     # static shapes per bucket
    for each bucket j (static, usually 1):
      fori_loop over ceil(count_j / (nd*B)) blocks:
        block ids [nd*B], sharded over devices  # each device: B clients
        gather  [nd*B, steps_j, batch, ...]      # from the packed device data
        vmap(client_update)                      # written for ONE client
        carry[nd, ...] += sum over B of w_k * update_k   # per-device partials
    aggregate = sum over devices / total weight  # one cross-device reduction
    server_state = server_update(server_state, aggregate)

Several independent runs (seeds, hyperparameter settings) can share one
round: :meth:`Engine.rounds_body` pools every run's sampled clients into the
same blocks, each client starting from its run's broadcast and adding into
its run's partial sums.

Memory is O(nd * B x model), independent of clients per round. The client axis
is sharded with ``jax.sharding`` (automatic SPMD partitioning); per-device
partial sums are only reduced once at the end of the round, so devices never
synchronise inside the block loop.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedjax_lite.algorithms.base import Aggregate, FederatedAlgorithm
from fedjax_lite.data.batching import (DeviceData, LocalWork, gather_client,
                                       sample_clients, to_device)
from fedjax_lite.data.federated_dataset import FederatedDataset

PyTree = Any
AXIS = "clients"
_SAMPLING = ("uniform", "weighted", "all")


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
  """
  clients_per_round: int
  local_work: LocalWork = dataclasses.field(default_factory=LocalWork)
  sampling: str = "uniform"
  replace: bool = False
  block_size: int | None = None

  def __post_init__(self):
    if not isinstance(self.clients_per_round, (int, np.integer)) or (
        self.clients_per_round < 1):
      raise ValueError(f"clients_per_round must be a positive int, got "
                       f"{self.clients_per_round!r}.")
    if self.sampling not in _SAMPLING:
      raise ValueError(f"sampling must be one of {_SAMPLING}, got "
                       f"{self.sampling!r}.")
    if self.block_size is not None and (not isinstance(self.block_size, int)
                                        or self.block_size < 1):
      raise ValueError(f"block_size must be a positive int or None (auto), "
                       f"got {self.block_size!r}.")
    if not isinstance(self.local_work, LocalWork):
      raise TypeError(f"local_work must be a LocalWork, got "
                      f"{type(self.local_work).__name__}.")


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
  """
  server: PyTree
  clients: PyTree
  round: jax.Array
  rng: jax.Array


def default_mesh(devices=None) -> Mesh:
  """A 1-D mesh over all devices of the default backend, axis ``"clients"``."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (AXIS,))


_WARNED = []


def _warn_if_untuned_cpu(platform: str, num_devices: int) -> None:
  from fedjax_lite import runtime  # pylint: disable=g-import-not-at-top
  if (platform == "cpu" and num_devices == 1 and runtime.usable_cores() > 1
      and not runtime.settings().get("applied") and not _WARNED):
    _WARNED.append(True)
    warnings.warn(
        "fedjax_lite runs on one CPU device with JAX's default threading, "
        "which is several times slower for federated rounds. Import "
        "fedjax_lite (or call fedjax_lite.configure_cpu()) before any JAX "
        "computation so each core becomes its own device.", stacklevel=3)


def _tree_bytes(tree) -> int:
  return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(tree)))


def auto_block_size(per_client_bytes: int, clients_per_device: int,
                    platform: str) -> int:
  """Clients per device per block.

  On CPU a block should stay within a core's share of the caches (about
  8 MiB of per-client working memory; measured on mlp100: 2-4 clients per
  block beat 1 by ~10% and 10 lose ~20%): a big model trains a few clients at
  a time per core, a tiny one hundreds. On accelerators blocks use up to 2 GiB.
  """
  target = (8 << 20) if platform == "cpu" else (2 << 30)
  b = int(max(1, min(target // max(1, per_client_bytes), clients_per_device)))
  # Same number of blocks, evenly filled: less padding in the last block.
  num_blocks = math.ceil(clients_per_device / b)
  return int(math.ceil(clients_per_device / num_blocks))


class Engine:
  """Compiles an algorithm's round for a round configuration and a mesh.

  Example::

    engine = Engine(fed_avg(model, optax.sgd(0.1)), RoundConfig(10))
    data = engine.put_data(dataset)
    state = engine.init(model.init(jax.random.PRNGKey(0)), seed=0,
                        num_clients=dataset.num_clients)
    state, metrics = engine.round(state, data)          # one jitted round
    state, history = engine.run(state, data, 100)       # lax.scan over rounds
  """

  def __init__(self, algorithm: FederatedAlgorithm, config: RoundConfig,
               mesh: Mesh | None = None):
    if not isinstance(algorithm, FederatedAlgorithm):
      raise TypeError(f"algorithm must be a FederatedAlgorithm, got "
                      f"{type(algorithm).__name__}.")
    if not isinstance(config, RoundConfig):
      raise TypeError(f"config must be a RoundConfig, got "
                      f"{type(config).__name__}.")
    self.algorithm = algorithm
    self.config = config
    self.mesh = mesh if mesh is not None else default_mesh()
    if AXIS not in self.mesh.axis_names:
      raise ValueError(f"mesh must have an axis named {AXIS!r}, got "
                       f"{self.mesh.axis_names}.")
    self.num_devices = int(self.mesh.shape[AXIS])
    self.platform = self.mesh.devices.reshape(-1)[0].platform
    _warn_if_untuned_cpu(self.platform, self.num_devices)
    self.num_traces = 0
    self.block_sizes: dict[int, int] = {}
    self._round_jit = jax.jit(self._round_body)
    self._run_jit = jax.jit(self._run_body, static_argnums=2)

  # ---------------------------------------------------------------- placement
  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def put_data(self, dataset: FederatedDataset | DeviceData,
               buckets: int | str | tuple = "auto", *,
               model=None) -> DeviceData:
    """Uploads a dataset, replicated on every device of the mesh.

    Args:
      dataset: the packed federated dataset.
      buckets: size buckets (``"auto"``, a maximum count, or explicit limits).
      model: if given, its input and label features are checked (present,
        integer class labels in range) before upload.
    """
    if isinstance(dataset, DeviceData):
      return dataset
    if model is not None:
      for key in (model.input_key, model.label_key):
        if key not in dataset.features:
          raise ValueError(f"dataset has features {sorted(dataset.features)}"
                           f"; the model needs {key!r}.")
      if model.num_classes is not None:
        model.validate_labels(dataset.features[model.label_key], "dataset")
    return to_device(dataset, self.config.local_work, buckets,
                     sharding=self.replicated)

  def init(self, params: PyTree, seed: int | jax.Array = 0,
           num_clients: int | None = None) -> EngineState:
    """The initial state: server state from ``params``, client states if any.

    Args:
      params: initial global model parameters.
      seed: int seed or PRNG key for sampling and client randomness.
      num_clients: population size (required for stateful algorithms).
    """
    rng = jax.random.PRNGKey(seed) if isinstance(seed, (int, np.integer)) \
        else jnp.asarray(seed)
    server = self.algorithm.server_init(params)
    clients = None
    if self.algorithm.client_init is not None:
      if num_clients is None:
        raise ValueError(f"{self.algorithm.name} keeps per-client state: pass "
                         "num_clients (the population size) to init().")
      one = self.algorithm.client_init(params)
      clients = jax.tree.map(
          lambda a: jnp.broadcast_to(a, (num_clients,) + a.shape), one)
    state = EngineState(server=server, clients=clients,
                        round=jnp.zeros((), jnp.int32), rng=rng)
    return jax.device_put(state, self.replicated)

  # -------------------------------------------------------------------- check
  def _check(self, state: EngineState, data: DeviceData) -> None:
    if not isinstance(data, DeviceData):
      raise TypeError(f"data must be DeviceData (use engine.put_data(dataset)),"
                      f" got {type(data).__name__}.")
    c = data.num_clients
    m = self.config.clients_per_round
    if self.config.sampling == "all" and m != c:
      raise ValueError(f"sampling='all' needs clients_per_round == population; "
                       f"got clients_per_round={m} for {c} clients.")
    if m > c and not self.config.replace:
      raise ValueError(f"clients_per_round={m} is larger than the population "
                       f"of {c} clients; expected at most {c} (or "
                       "replace=True).")
    if state.clients is not None:
      n = jax.tree.leaves(state.clients)[0].shape[0]
      if n != c:
        raise ValueError(f"state holds client states for {n} clients but the "
                         f"data has {c}; init the engine with num_clients={c}.")

  # ------------------------------------------------------------------- public
  def round(self, state: EngineState, data: DeviceData
            ) -> tuple[EngineState, dict]:
    """Runs one round (compiled once per data layout)."""
    self._check(state, data)
    return self._round_jit(state, data)

  def run(self, state: EngineState, data: DeviceData, num_rounds: int
          ) -> tuple[EngineState, dict]:
    """Runs ``num_rounds`` rounds in one ``lax.scan`` (no host work between).

    Returns the final state and metrics stacked over rounds.
    """
    if not isinstance(num_rounds, (int, np.integer)) or num_rounds < 1:
      raise ValueError(f"num_rounds must be a positive int, got {num_rounds!r}.")
    self._check(state, data)
    return self._run_jit(state, data, int(num_rounds))

  def round_body(self, state: EngineState, data: DeviceData
                 ) -> tuple[EngineState, dict]:
    """The round as a pure, traceable function (not jitted).

    Use it to compose rounds with other transformations, e.g. ``jax.vmap``
    over a leading axis of states (several seeds) or hyperparameters.
    """
    return self._round_body(state, data)

  # ------------------------------------------------------------------ tracing
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
    weights = data.counts.astype(jnp.float32) if cfg.sampling == "weighted" \
        else None
    return sample_clients(rng, c, cfg.clients_per_round, weights, cfg.replace)

  def expected_clients(self, data: DeviceData, bucket: int) -> float:
    """Expected number of a round's clients that fall in ``bucket``."""
    cfg = self.config
    if data.bucket_clients is None:
      return float(cfg.clients_per_round)
    if cfg.sampling == "weighted":
      share = data.bucket_examples[bucket] / max(1, sum(data.bucket_examples))
    else:
      share = data.bucket_clients[bucket] / max(1, sum(data.bucket_clients))
    return min(float(data.bucket_clients[bucket]) if not cfg.replace else
               float(cfg.clients_per_round), cfg.clients_per_round * share)

  def _block_size(self, data: DeviceData, bucket: int, broadcast,
                  client_states, num_runs: int = 1) -> int:
    if self.config.block_size is not None:
      return self.config.block_size
    bucket_size = data.bucket_sizes[bucket]
    steps, b = self.config.local_work.plan(bucket_size)
    per_example = sum(math.prod(v.shape[1:]) * v.dtype.itemsize
                      for v in data.features.values())
    one_state = 0 if client_states is None else _tree_bytes(
        jax.tree.map(lambda a: a[0], client_states))
    # params + update + gradient + optimizer state, plus the gathered data.
    per_client = 4 * _tree_bytes(broadcast) + steps * b * per_example + \
        2 * one_state
    # A block holds about the bucket's expected share of the round (never
    # the whole round for a rarely sampled bucket: that block would be
    # mostly padding).
    per_device = max(1, math.ceil(num_runs * self.expected_clients(
        data, bucket) / self.num_devices))
    return auto_block_size(per_client, per_device, self.platform)

  def _round_body(self, state: EngineState, data: DeviceData):
    states = jax.tree.map(lambda a: a[None], state)
    new, metrics = self._rounds_body(states, data)
    return jax.tree.map(lambda a: a[0], (new, metrics))

  def _rounds_body(self, states: EngineState, data: DeviceData,
                   algorithm_fn: Callable[[dict], FederatedAlgorithm] | None
                   = None, hparams: dict | None = None):
    """One round of ``R`` independent runs (leading axis ``R`` on ``states``).

    The runs' sampled clients are pooled into the same size-bucket blocks
    (a client is a (run, client id) pair that starts from its run's
    broadcast), and each run's updates are summed into its own slot of the
    per-device partial sums. ``R == 1`` is the ordinary round.
    """
    self.num_traces += 1
    cfg, nd = self.config, self.num_devices
    R = int(jax.tree.leaves(states.round)[0].shape[0])
    m = cfg.clients_per_round
    c = data.num_clients
    per_run_algs = algorithm_fn is not None
    if per_run_algs:
      hparams = {k: jnp.asarray(v, jnp.float32) for k, v in hparams.items()}
      if any(v.shape != (R,) for v in hparams.values()):
        raise ValueError(f"hparams must be [R={R}] arrays, got "
                         f"{ {k: v.shape for k, v in hparams.items()} }.")

    def alg_of(h):
      return algorithm_fn(h) if per_run_algs else self.algorithm

    def per_run(fn, *args):
      # fn(alg, *args) for every run (vmapped over the run axis).
      if per_run_algs:
        return jax.vmap(lambda h, *a: fn(alg_of(h), *a))(hparams, *args)
      return jax.vmap(lambda *a: fn(self.algorithm, *a))(*args)

    keys = jax.vmap(jax.random.fold_in)(states.rng, states.round)
    k_sample, k_clients = jax.vmap(jax.random.split, out_axes=1)(keys)
    ids = jax.vmap(lambda k: self._sample(k, data))(k_sample).reshape(-1)
    runs = jnp.repeat(jnp.arange(R, dtype=jnp.int32), m)
    slots = jnp.tile(jnp.arange(m, dtype=jnp.int32), R)
    total_m = R * m
    nb = len(data.bucket_sizes)
    if nb > 1:
      bk = data.bucket[ids]
      order = jnp.argsort(bk, stable=True)
      ids, slots, runs, bk = ids[order], slots[order], runs[order], bk[order]
      counts = jnp.zeros((nb,), jnp.int32).at[bk].add(1)
      starts = jnp.cumsum(counts) - counts
    else:
      counts = jnp.full((1,), total_m, jnp.int32)
      starts = jnp.zeros((1,), jnp.int32)

    broadcast = per_run(lambda a, s: a.broadcast(s), states.server)
    one_broadcast = jax.tree.map(lambda a: a[0], broadcast)
    client_states = states.clients
    stateful = client_states is not None
    one_cstates = None if not stateful else jax.tree.map(lambda a: a[0],
                                                         client_states)
    sizes = {j: self._block_size(data, j, one_broadcast, one_cstates, R)
             for j in range(nb)}
    self.block_sizes = {data.bucket_sizes[j]: b for j, b in sizes.items()}
    pad = nd * max(sizes.values())
    zpad = jnp.zeros((pad,), jnp.int32)
    ids_pad = jnp.concatenate([ids, zpad])
    slots_pad = jnp.concatenate([slots, zpad])
    runs_pad = jnp.concatenate([runs, zpad])

    def one_client(bcast, cstate, cid, slot, run, bucket_size):
      k = jax.random.fold_in(k_clients[run], slot)
      k_data, k_train = jax.random.split(k)
      cdata = gather_client(data, cid, k_data, cfg.local_work, bucket_size,
                            slot)
      alg = alg_of({n: v[run] for n, v in hparams.items()}) \
          if per_run_algs else self.algorithm
      return alg.client_update(bcast, cstate, cdata, k_train)

    # Output structure (for zero accumulators), from one abstract client.
    L0 = data.bucket_sizes[0]
    cs0 = None if not stateful else jax.tree.map(lambda a: a[0], one_cstates)
    out_shape = jax.eval_shape(
        lambda: one_client(one_broadcast, cs0, jnp.int32(0), jnp.int32(0),
                           jnp.int32(0), L0))

    def zeros(shape_tree):
      return jax.tree.map(
          lambda s: self._constrain(jnp.zeros((nd, R) + s.shape, jnp.float32
                                              if jnp.issubdtype(s.dtype,
                                                                jnp.integer)
                                              else s.dtype), P(AXIS)),
          shape_tree)

    carry = {
        "update": zeros(out_shape.update),
        "weight": zeros(out_shape.weight),
        "count": self._constrain(jnp.zeros((nd, R), jnp.float32), P(AXIS)),
        "metrics": zeros(out_shape.metrics),
        "clients": client_states,
    }

    for j, L in enumerate(data.bucket_sizes):
      bpd = sizes[j]
      blk = nd * bpd
      start, count = starts[j], counts[j]
      num_blocks = (count + blk - 1) // blk

      def body(i, carry, start=start, count=count, blk=blk, bpd=bpd, L=L):
        lo = start + i * blk
        valid = lo + jnp.arange(blk) < start + count
        cid = jnp.where(valid, jax.lax.dynamic_slice(ids_pad, (lo,), (blk,)), 0)
        slot = jax.lax.dynamic_slice(slots_pad, (lo,), (blk,))
        run = jax.lax.dynamic_slice(runs_pad, (lo,), (blk,))
        cid = self._constrain(cid, P(AXIS))
        valid = self._constrain(valid, P(AXIS))
        if stateful:
          cstate = jax.tree.map(
              lambda a: self._constrain(a[run, cid], P(AXIS)),
              carry["clients"])
        else:
          cstate = None
        if R == 1:
          bcast, b_axis = one_broadcast, None
        else:
          bcast = jax.tree.map(lambda a: self._constrain(a[run], P(AXIS)),
                               broadcast)
          b_axis = 0
        out = jax.vmap(one_client, in_axes=(b_axis, 0, 0, 0, 0, None))(
            bcast, cstate, cid, slot, run, L)
        w = jnp.where(valid, out.weight.astype(jnp.float32), 0.0)
        onehot = None if R == 1 else (
            run[:, None] == jnp.arange(R)[None, :]).astype(jnp.float32
                                                           ).reshape(nd, bpd, R)

        def per_device_sum(x, scale=None):
          # [blk, ...] -> [nd, R, ...]: each device's sum per run.
          v = valid.reshape((blk,) + (1,) * (x.ndim - 1))
          x = jnp.where(v, x, jnp.zeros((), x.dtype))
          if scale is not None:
            x = x * scale.reshape((blk,) + (1,) * (x.ndim - 1)).astype(x.dtype)
          x = x.reshape((nd, bpd) + x.shape[1:])
          if jnp.issubdtype(x.dtype, jnp.integer):
            x = x.astype(jnp.float32)
          if R == 1:
            return jnp.sum(x, axis=1)[:, None]
          return jnp.einsum("dbr,db...->dr...", onehot.astype(x.dtype), x,
                            precision=jax.lax.Precision.HIGHEST)

        new = dict(carry)
        new["update"] = jax.tree.map(lambda a, u: a + per_device_sum(u, w),
                                     carry["update"], out.update)
        new["weight"] = carry["weight"] + per_device_sum(w)
        new["count"] = carry["count"] + per_device_sum(valid.astype(
            jnp.float32))
        new["metrics"] = jax.tree.map(lambda a, v: a + per_device_sum(v),
                                      carry["metrics"], out.metrics)
        if stateful:
          idx = jnp.where(valid, cid, c)
          new["clients"] = jax.tree.map(
              lambda a, s: a.at[run, idx].set(s.astype(a.dtype), mode="drop"),
              carry["clients"], out.state)
        return new

      carry = jax.lax.fori_loop(0, num_blocks, body, carry)

    total = jnp.sum(carry["weight"], axis=0)  # [R]
    safe = jnp.where(total > 0, total, 1.0)

    def mean_of(a):
      t = total.reshape((R,) + (1,) * (a.ndim - 2))
      s = safe.reshape(t.shape)
      return jnp.where(t > 0, a.sum(0) / s, jnp.zeros((), a.dtype))
    mean = jax.tree.map(mean_of, carry["update"])
    metric_sums = jax.tree.map(lambda a: a.sum(0), carry["metrics"])
    agg = Aggregate(mean=mean, total_weight=total,
                    num_clients=jnp.sum(carry["count"], axis=0),
                    metrics=metric_sums)
    server = per_run(lambda a, s, g: a.server_update(s, g), states.server, agg)
    new_states = EngineState(server=server, clients=carry["clients"],
                             round=states.round + 1, rng=states.rng)
    return new_states, finalize_metrics(agg)

  def rounds_body(self, states: EngineState, data: DeviceData,
                  algorithm_fn: Callable[[dict], FederatedAlgorithm] | None
                  = None, hparams: dict | None = None
                  ) -> tuple[EngineState, dict]:
    """One round of ``R`` independent runs as ONE pooled round (traceable).

    ``states`` carries a leading run axis ``R`` on every leaf (server,
    clients, round, rng). Every run samples its own clients with its own rng,
    exactly as a separate :meth:`round` would; the sampled clients of all
    runs then share the size-bucket blocks (full blocks instead of ``R``
    partly filled ones), and aggregation and the server update stay per run.
    Results equal ``R`` separate rounds up to float summation order.

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
      raise ValueError("rounds_body expects EngineStates stacked on a leading "
                       "run axis (round of shape [R]); stack them with "
                       "jax.tree.map(lambda *xs: jnp.stack(xs), *states).")
    r = jnp.shape(states.round)[0]
    bad = [x.shape for x in jax.tree.leaves(states) if x.shape[:1] != (r,)]
    if bad:
      raise ValueError(f"every state leaf needs the leading run axis of size "
                       f"{r}; got leaves of shape {bad[:3]}.")
    return self._rounds_body(states, data, algorithm_fn, hparams)


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
