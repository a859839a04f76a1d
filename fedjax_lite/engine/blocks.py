r"""The jitted backend: a round's stages as ONE traceable function.

Layout of a round (``nd`` devices on the ``"clients"`` mesh axis, ``B_j``
clients per device per block of size bucket ``j``; the stages are those of
:mod:`fedjax_lite.engine.stages`)::

    plan = block plan (host side, once per data layout)   # B_j per bucket
    ids = sample(rng)                                     # [clients_per_round]
    sort ids by size bucket                               # static shapes per bucket
    sums[nd, ...] = init_sums(...)                        # per device (and run)
    for each bucket j (static, usually 1):
      fori_loop over ceil(count_j / (nd*B_j)) blocks:     # the block step
        block ids [nd*B_j], sharded over devices          # each device: B_j clients
        vmap(gather, client_work)                         # written for ONE client
        sums[d] = add_block(sums[d], outputs[d], ...)     # per-device, no sync
    merge, finalize, server_update                        # finish_round

Several independent runs (seeds, hyperparameter settings) share one round:
every run's sampled clients share the same blocks, each client starting from
its run's broadcast and adding into its run's accumulator (the aggregator is
vmapped over runs).

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

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from fedjax_lite.aggregators.base import update_bytes
from fedjax_lite.data.batching import DeviceData
from fedjax_lite.engine import stages
from fedjax_lite.engine.plan import BlockPlan, check_materialized_memory
from fedjax_lite.engine.state import AXIS, EngineState, RoundConfig

PyTree = Any


class GivenSample(NamedTuple):
  """A round's clients chosen by the caller instead of the ``"sample"``
  stage (e.g. by a simulated clock: the first arrivals before a deadline,
  the clients an asynchronous server step aggregates).

  Attributes:
    ids: int32 ``[R, m]`` client ids (``m = clients_per_round``).
    count: int32 ``[R]``: only slots ``< count`` take part (the others are
      not trained, as slots past ``Aggregator.active_slots``).
    broadcast: optional table of broadcasts, leaves ``[T, ...]``, replacing
      every run's broadcast: slot ``i`` of run ``r`` starts from row
      ``table_index[r, i]`` (e.g. the model version a client downloaded).
    table_index: int32 ``[R, m]``, with ``broadcast``.
  """

  ids: jax.Array
  count: jax.Array
  broadcast: PyTree = None
  table_index: jax.Array | None = None


def _spec(tree):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def sorted_sample(
  config: RoundConfig,
  k_sample,
  data: DeviceData,
  num_runs,
  num_devices,
  active,
  given_ids=None,
):
  """Every run's sample (stage ``"sample"``, or ``given_ids [R, m]``) as
  ``(ids, slots, runs)``, sorted by size bucket, and each bucket's
  ``(start, count)`` in that order.

  With ``active`` (``[R]`` counts ``K``, see ``Aggregator.active_slots``) the
  slots ``>= K`` of each run sort last and are in no bucket's count: they are
  not trained. With sharded data the groups are ``(bucket, device)``: device
  ``d`` trains the clients it holds (starts and counts ``[buckets, nd]``)."""
  m = config.clients_per_round
  if given_ids is None:
    ids = jax.vmap(lambda k: stages.sample(config, k, data))(k_sample)
  else:
    ids = jnp.asarray(given_ids, jnp.int32)
  ids = ids.reshape(-1)
  runs = jnp.repeat(jnp.arange(num_runs, dtype=jnp.int32), m)
  slots = jnp.tile(jnp.arange(m, dtype=jnp.int32), num_runs)
  nb = len(data.bucket_sizes)
  if nb == 1 and not data.sharded and active is None:
    counts = jnp.full((1,), num_runs * m, jnp.int32)
    return ids, slots, runs, jnp.zeros((1,), jnp.int32), counts
  nd = num_devices if data.sharded else 1
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


class _Round:
  """What every block step of one traced round reads (fixed for the round)."""

  def __init__(
    self,
    engine,
    runs,
    plan,
    sample,
    data,
    broadcast,
    k_clients,
    agg_states,
    table_index=None,
  ):
    self.engine, self.runs, self.plan = engine, runs, plan
    self.sample, self.data = sample, data
    self.broadcast, self.k_clients = broadcast, k_clients
    self.agg_states = agg_states
    self.table_index = table_index

  def constrain(self, x, spec):
    mesh = self.engine.mesh
    if self.engine.num_devices == 1:
      return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

  def block_step(self, j: int, bucket_size: int):
    """``(i, (sums, clients), start, count) -> (sums, clients)``: block ``i``
    of bucket ``j``."""
    runs, plan, data = self.runs, self.plan, self.data
    config = self.engine.config
    nd, bpd = plan.num_devices, plan.block_sizes[j]
    blk, R = nd * bpd, runs.num_runs
    # One run: every client receives the same broadcast, passed unbatched
    # (its matmuls serve the whole block); pooled runs: each client its run's.
    table_index = self.table_index
    shared_broadcast = R == 1 and table_index is None
    ids, slots, run_ids, _, _ = self.sample
    zpad = jnp.zeros((plan.pad,), jnp.int32)
    ids_pad = jnp.concatenate([ids, zpad])
    slots_pad = jnp.concatenate([slots, zpad])
    runs_pad = jnp.concatenate([run_ids, zpad])
    k_clients, agg_states = self.k_clients, self.agg_states

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

    def device_block(features, bcast, cstate, cid, slot, run, row, valid, sums):
      """One device's ``B`` clients: gather and client work (vmapped), then
      the device's ``add_block`` (``sums``: leading axis 1). Runs under
      ``shard_map``, so no device ever computes another's clients. With a
      broadcast table every device reads its own clients' rows of it."""
      if table_index is not None:
        bcast = jax.tree.map(lambda a: a[row], bcast)
      view = data.replace(
        features=features
        if not data.sharded
        else {k: v[0] for k, v in features.items()},
        bucket=data.counts if data.sharded else data.bucket,
        owner=None,
      )

      def client(b, s, c, sl, r):
        return stages.client_output(
          config, runs.of_run(r), b, s, view, c, k_clients[r], sl, bucket_size
        )

      b_axis = None if shared_broadcast else 0
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
      mine = jax.tree.map(lambda a: a[0], sums)
      mine, finite = stages.add_block(
        runs, agg_states, mine, out, valid, cid, slot, run
      )
      return jax.tree.map(lambda a: a[None], mine), (out.state, finite)

    per_device = P(AXIS)
    data_spec = P(AXIS) if data.sharded else P()
    bcast_spec = (
      P() if shared_broadcast or table_index is not None else (per_device)
    )

    def step(i, carry, start, count):
      sums, clients = carry
      valid, cid, slot, run = block_clients(i, start, count)
      cid = jnp.where(valid, cid, 0)
      cstate = stages.client_states_of(clients, run, cid)
      row = run if table_index is None else table_index[run, slot]
      if shared_broadcast:
        bcast = jax.tree.map(lambda a: a[0], self.broadcast)
      elif table_index is None:
        bcast = jax.tree.map(lambda a: a[row], self.broadcast)
      else:  # the whole table: each device gathers its clients' rows
        bcast = self.broadcast
      sums, (state, finite) = jax.shard_map(
        device_block,
        mesh=self.engine.mesh,
        in_specs=(data_spec, bcast_spec) + (per_device,) * 7,
        out_specs=per_device,
        # Client code (custom VJPs, callbacks) need not know about manual
        # axes; nothing inside communicates across devices.
        check_vma=False,
      )(data.features, bcast, cstate, cid, slot, run, row, valid, sums)
      clients = stages.store_client_states(
        clients, run, cid, state, valid & finite
      )
      return sums, clients

    return step


def pooled_round(
  engine,
  runs: stages.Runs,
  states: EngineState,
  data: DeviceData,
  given: GivenSample | None = None,
) -> tuple[EngineState, dict]:
  """One round of ``R`` runs (``states`` leaves ``[R, ...]``), traceable.

  ``engine`` provides the config, the mesh and the cached host-side block
  plan (:meth:`Engine.block_plan`); ``given`` replaces the sampled clients
  (and optionally their broadcasts)."""
  config = engine.config
  R = runs.num_runs
  k_sample, k_clients, k_agg, broadcast = stages.begin_round(runs, states)
  table_index = None
  if given is not None and given.broadcast is not None:
    broadcast, table_index = given.broadcast, given.table_index
  one_broadcast = jax.tree.map(lambda a: a[0], broadcast)
  one_cstates = (
    None
    if states.clients is None
    else jax.tree.map(lambda a: a[0], states.clients)
  )
  plan: BlockPlan = engine._plan(  # pylint: disable=protected-access
    data,
    _spec(one_broadcast),
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
    lambda: stages.client_output(
      config,
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
  agg = runs.aggregator
  if agg.materialized:
    check_materialized_memory(
      agg.name,
      num_slots=config.clients_per_round,
      one_update=update_bytes(out_shape.update),
      num_runs=R,
      num_devices=engine.num_devices,
      device=engine.mesh.devices.reshape(-1)[0],
    )
  agg_states, stateful = stages.aggregator_states(
    runs, states.aggregator, out_shape.update
  )
  active = stages.active_slots(runs, agg_states)
  given_ids = None
  if given is not None:
    given_ids, count = given.ids, jnp.asarray(given.count, jnp.int32)
    active = count if active is None else jnp.minimum(active, count)
  sample = sorted_sample(
    config, k_sample, data, R, engine.num_devices, active, given_ids
  )
  ctx = _Round(
    engine,
    runs,
    plan,
    sample,
    data,
    broadcast,
    k_clients,
    agg_states,
    table_index,
  )
  nd = engine.num_devices
  sums = stages.init_sums(
    runs,
    agg_states,
    out_shape,
    config.clients_per_round,
    report_ids=config.nonfinite == "raise",
  )
  sums = jax.tree.map(
    lambda a: ctx.constrain(jnp.broadcast_to(a, (nd,) + a.shape), P(AXIS)),
    sums,
  )
  carry = (sums, states.clients)
  for j, bucket_size in enumerate(plan.bucket_sizes):
    step = ctx.block_step(j, bucket_size)
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
  sums, clients = carry
  return stages.finish_round(
    runs, states, sums, agg_states, k_agg, stateful, clients
  )
