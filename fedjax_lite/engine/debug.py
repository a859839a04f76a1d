"""A debug round: the engine's round, one client at a time, without jit.

Like FedJAX's ``for_each_client_backend('debug')``: the clients of a round
run one by one in a Python loop under ``jax.disable_jit()``, so ``print``,
``breakpoint()`` and ``jax.debug`` calls inside ``client_update`` see
concrete values, once per client. Everything else is the jitted round's:
the same sample (``round_keys``), the same per-client keys
(``client_keys(k_clients, slot)``), the same data gathering, and the same
aggregator (``init``/``add``/``merge``/``finalize``, each client added as a
block of one), so its result equals :meth:`Engine.round` up to float
summation order. A Python loop over clients is the point here; it is slow.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lite.algorithms.base import Aggregate
from fedjax_lite.data.batching import DeviceData
from fedjax_lite.engine.round import (
  _NONFINITE_IDS,
  Engine,
  EngineState,
  finalize_metrics,
  round_keys,
  tree_finite,
)


def _to_float(x):
  x = jnp.asarray(x)
  return x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.integer) else x


def debug_round(
  engine: Engine, state: EngineState, data: DeviceData
) -> tuple[EngineState, dict]:
  """One round of ``engine``, client by client in Python (no jit).

  Args:
    engine: the engine (its algorithm, aggregator and round config).
    state: ONE run's EngineState.
    data: the device data.

  Returns:
    ``(new_state, metrics)`` as :meth:`Engine.round` returns them.
  """
  engine._check(state, data)  # pylint: disable=protected-access
  alg, agg = engine.algorithm, engine.aggregator_for(data)
  m = engine.config.clients_per_round
  with jax.disable_jit():
    k_sample, k_clients, k_agg = round_keys(state.rng, state.round)
    ids = np.asarray(engine._sample(k_sample, data))  # pylint: disable=protected-access
    buckets = np.asarray(data.bucket)
    bcast = alg.broadcast(state.server)
    clients = state.clients
    agg_state = state.aggregator

    def one_client(slot, cid):
      cstate = (
        None
        if clients is None
        else jax.tree.map(lambda a, cid=cid: a[cid], clients)
      )
      return engine._one_client_output(  # pylint: disable=protected-access
        alg,
        bcast,
        cstate,
        data,
        jnp.int32(cid),
        k_clients,
        jnp.int32(slot),
        data.bucket_sizes[int(buckets[cid])],
      )

    # Slots >= K do not take part (Aggregator.active_slots), as in the round.
    active, acc, dropped = m, None, []
    if agg_state is not None and agg.active_slots is not None:
      active = int(agg.active_slots(agg_state))
    for slot, cid in enumerate(ids):
      if slot >= active and acc is not None:
        break
      out = one_client(slot, cid)
      if acc is None:  # the first client's output gives the shapes
        spec = jax.tree.map(
          lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.asarray(a).dtype),
          out.update,
        )
        if agg_state is None:
          agg_state = agg.init_state(spec)
          if agg.active_slots is not None:
            active = int(agg.active_slots(agg_state))
        acc = agg.init(agg_state, spec, m)
        metric_sums = jax.tree.map(
          lambda x: jnp.zeros_like(_to_float(x)), out.metrics
        )
        count = jnp.zeros((), jnp.float32)
      if slot >= active:  # K == 0: slot 0 ran only for the shapes
        break
      if not bool(tree_finite((out.update, out.weight))):
        dropped.append(int(cid))  # RoundConfig.nonfinite: out of the round
        continue
      acc = agg.add(
        agg_state,
        acc,
        jax.tree.map(lambda u: jnp.asarray(u)[None], out.update),
        jnp.asarray(out.weight, jnp.float32).reshape(1),
        jnp.ones((1,), bool),
        jnp.full((1,), slot, jnp.int32),
      )
      metric_sums = jax.tree.map(
        jnp.add, metric_sums, jax.tree.map(_to_float, out.metrics)
      )
      count = count + 1.0
      if clients is not None:
        clients = jax.tree.map(
          lambda a, s, cid=cid: a.at[cid].set(jnp.asarray(s).astype(a.dtype)),
          clients,
          out.state,
        )
    merged = agg.merge(jax.tree.map(lambda a: jnp.asarray(a)[None], acc))
    output, new_agg_state = agg.finalize(agg_state, merged, k_agg)
    aggregate = Aggregate(
      mean=output.mean,
      total_weight=output.total_weight,
      num_clients=count,
      metrics=metric_sums,
    )
    server = alg.server_update(state.server, aggregate)
  stateful = bool(jax.tree.leaves(new_agg_state))
  new_state = EngineState(
    server=server,
    clients=clients,
    round=state.round + 1,
    rng=state.rng,
    aggregator=new_agg_state if stateful else None,
  )
  metrics = finalize_metrics(aggregate)
  metrics["dropped_nonfinite"] = jnp.float32(len(dropped))
  if engine.config.nonfinite == "raise":
    metrics[_NONFINITE_IDS] = jnp.asarray(
      dropped + [-1] * (m - len(dropped)), jnp.int32
    )
  metrics.update(output.metrics)
  return new_state, metrics
