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
                  client_states) -> int:
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
    per_device = max(1, math.ceil(self.expected_clients(data, bucket) /
                                  self.num_devices))
    return auto_block_size(per_client, per_device, self.platform)

  def _round_body(self, state: EngineState, data: DeviceData):
    self.num_traces += 1
    alg, cfg, nd = self.algorithm, self.config, self.num_devices
    m = cfg.clients_per_round
    c = data.num_clients
    key = jax.random.fold_in(state.rng, state.round)
    k_sample, k_clients = jax.random.split(key)
    ids = self._sample(k_sample, data)
    slots = jnp.arange(m, dtype=jnp.int32)
    nb = len(data.bucket_sizes)
    if nb > 1:
      bk = data.bucket[ids]
      order = jnp.argsort(bk, stable=True)
      ids, slots, bk = ids[order], slots[order], bk[order]
      counts = jnp.zeros((nb,), jnp.int32).at[bk].add(1)
      starts = jnp.cumsum(counts) - counts
    else:
      counts = jnp.full((1,), m, jnp.int32)
      starts = jnp.zeros((1,), jnp.int32)

    broadcast = alg.broadcast(state.server)
    stateful = state.clients is not None
    sizes = {j: self._block_size(data, j, broadcast, state.clients)
             for j in range(len(data.bucket_sizes))}
    self.block_sizes = {data.bucket_sizes[j]: b for j, b in sizes.items()}
    pad = nd * max(sizes.values())
    ids_pad = jnp.concatenate([ids, jnp.zeros((pad,), jnp.int32)])
    slots_pad = jnp.concatenate([slots, jnp.zeros((pad,), jnp.int32)])

    def one_client(broadcast, cstate, cid, slot, bucket_size):
      k = jax.random.fold_in(k_clients, slot)
      k_data, k_train = jax.random.split(k)
      cdata = gather_client(data, cid, k_data, cfg.local_work, bucket_size,
                            slot)
      return alg.client_update(broadcast, cstate, cdata, k_train)

    # Output structure (for zero accumulators), from one abstract client.
    L0 = data.bucket_sizes[0]
    cs0 = None if not stateful else jax.tree.map(lambda a: a[0], state.clients)
    out_shape = jax.eval_shape(
        lambda: one_client(broadcast, cs0, jnp.int32(0), jnp.int32(0), L0))

    def zeros(shape_tree):
      return jax.tree.map(
          lambda s: self._constrain(jnp.zeros((nd,) + s.shape, jnp.float32
                                              if jnp.issubdtype(s.dtype,
                                                                jnp.integer)
                                              else s.dtype), P(AXIS)),
          shape_tree)

    carry = {
        "update": zeros(out_shape.update),
        "weight": zeros(out_shape.weight),
        "count": self._constrain(jnp.zeros((nd,), jnp.float32), P(AXIS)),
        "metrics": zeros(out_shape.metrics),
        "clients": state.clients,
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
        cid = self._constrain(cid, P(AXIS))
        valid = self._constrain(valid, P(AXIS))
        if stateful:
          cstate = jax.tree.map(lambda a: self._constrain(a[cid], P(AXIS)),
                                carry["clients"])
        else:
          cstate = None
        out = jax.vmap(one_client, in_axes=(None, 0, 0, 0, None))(
            broadcast, cstate, cid, slot, L)
        w = jnp.where(valid, out.weight.astype(jnp.float32), 0.0)

        def per_device_sum(x, scale=None):
          v = valid.reshape((blk,) + (1,) * (x.ndim - 1))
          x = jnp.where(v, x, jnp.zeros((), x.dtype))
          if scale is not None:
            x = x * scale.reshape((blk,) + (1,) * (x.ndim - 1)).astype(x.dtype)
          x = x.reshape((nd, bpd) + x.shape[1:])
          return jnp.sum(x, axis=1, dtype=jnp.float32 if jnp.issubdtype(
              x.dtype, jnp.integer) else x.dtype)

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
              lambda a, s: a.at[idx].set(s.astype(a.dtype), mode="drop"),
              carry["clients"], out.state)
        return new

      carry = jax.lax.fori_loop(0, num_blocks, body, carry)

    total = jnp.sum(carry["weight"])
    safe = jnp.where(total > 0, total, 1.0)
    mean = jax.tree.map(lambda a: jnp.where(total > 0, a.sum(0) / safe,
                                            jnp.zeros((), a.dtype)),
                        carry["update"])
    metric_sums = jax.tree.map(lambda a: a.sum(0), carry["metrics"])
    agg = Aggregate(mean=mean, total_weight=total,
                    num_clients=jnp.sum(carry["count"]), metrics=metric_sums)
    server = alg.server_update(state.server, agg)
    new_state = EngineState(server=server, clients=carry["clients"],
                            round=state.round + 1, rng=state.rng)
    return new_state, finalize_metrics(agg)


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
