"""The debug backend: the round's stages, one client at a time, without jit.

Like FedJAX's ``for_each_client_backend('debug')``: the clients of a round
run one by one in a Python loop under ``jax.disable_jit()``, so ``print``,
``breakpoint()`` and ``jax.debug`` calls inside ``client_update`` see
concrete values, once per client. It calls the SAME stage functions as the
jitted round (:mod:`fedjax_lite.engine.stages`: sample, gather, client work,
aggregator add with each client as a block of one, merge, finalize, server
update), so its result equals :meth:`Engine.round` up to float summation
order. An exception raised inside a stage is re-raised naming the client
and the stage, e.g. ``client 3, stage 'client_work': ...``. A Python loop
over clients is the point here; it is slow.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lite.data.batching import DeviceData
from fedjax_lite.engine import stages
from fedjax_lite.engine.state import EngineState


class StageError(RuntimeError):
  """An error inside a debug round's stage whose own type cannot carry the
  message naming the client and the stage (see :func:`labelled`)."""


def labelled(client_id: int | None = None):
  """A stage ``call`` that re-raises an error as ``client <id>, stage
  '<stage>': <error>`` (``stage '<stage>': ...`` for round-level stages),
  with the same exception type when it takes a message."""

  def call(stage: str, fn, *args):
    try:
      return fn(*args)
    except Exception as e:  # pylint: disable=broad-except
      where = f"stage {stage!r}"
      if client_id is not None:
        where = f"client {client_id}, {where}"
      message = f"{where}: {e}"
      try:
        err = type(e)(message)
      except Exception:  # pylint: disable=broad-except
        err = StageError(message)
      if str(err) != message:
        err = StageError(message)
      raise err from e

  return call


def _first(tree):
  return jax.tree.map(lambda a: a[0], tree)


def _one_block(tree):
  return jax.tree.map(lambda a: jnp.asarray(a)[None], tree)


def debug_round(
  engine: Any, state: EngineState, data: DeviceData
) -> tuple[EngineState, dict]:
  """One round of ``engine``, client by client in Python (no jit).

  Args:
    engine: the :class:`~fedjax_lite.engine.Engine` (its algorithm,
      aggregator and round config).
    state: ONE run's EngineState.
    data: the device data.

  Returns:
    ``(new_state, metrics)`` as :meth:`Engine.round_body` returns them
    (before :meth:`Engine.check_metrics`).
  """
  engine.check_inputs(state, data)
  config = engine.config
  m = config.clients_per_round
  runs = engine.runs_for(data)
  round_call = labelled()
  states = _one_block(state)  # one run: leading run axis 1
  with jax.disable_jit():
    k_sample, k_clients, k_agg, broadcast = stages.begin_round(
      runs, states, round_call
    )
    ids = np.asarray(
      round_call("sample", stages.sample, config, k_sample[0], data)
    )
    buckets = np.asarray(data.bucket)
    bcast = _first(broadcast)
    clients = states.clients
    run = jnp.zeros((1,), jnp.int32)

    def output(slot, cid):
      cstate = stages.client_states_of(clients, run, jnp.asarray([cid]))
      return stages.client_output(
        config,
        runs.probe,
        bcast,
        None if cstate is None else _first(cstate),
        data,
        jnp.int32(cid),
        k_clients[0],
        jnp.int32(slot),
        data.bucket_sizes[int(buckets[cid])],
        call=labelled(int(cid)),
      )

    # The first client's output gives the shapes (the jitted round traces
    # them with eval_shape; client code here may need concrete values).
    first = output(0, ids[0])
    spec = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.asarray(a).dtype), first
    )
    agg_states, stateful = stages.aggregator_states(
      runs, states.aggregator, spec.update
    )
    active = stages.active_slots(runs, agg_states)
    # Slots >= K do not take part (Aggregator.active_slots), as in the round.
    num_active = m if active is None else int(active[0])
    sums = stages.init_sums(
      runs, agg_states, spec, m, report_ids=config.nonfinite == "raise"
    )
    for slot, cid in enumerate(ids[:num_active]):
      out = first if slot == 0 else output(slot, cid)
      block = _one_block(out)
      cids = jnp.asarray([cid], jnp.int32)
      sums, finite = labelled(int(cid))(
        "aggregator_add",
        stages.add_block,
        runs,
        agg_states,
        sums,
        block,
        jnp.ones((1,), bool),
        cids,
        jnp.asarray([slot], jnp.int32),
        run,
      )
      clients = stages.store_client_states(
        clients, run, cids, block.state, finite
      )
    new_states, metrics = stages.finish_round(
      runs,
      states,
      _one_block(sums),  # one device
      agg_states,
      k_agg,
      stateful,
      clients,
      call=round_call,
    )
  return _first(new_states), _first(metrics)
