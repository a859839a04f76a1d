r"""The stages of a round, each a function named after what it does.

One round of ``R`` runs (``R = 1`` for an ordinary round)::

    plan             host side, once per data layout      (engine/plan.py)
    begin_round      round keys, every run's broadcast
    sample           sample(config, k_sample, data)        -> client ids
    gather           gather(config, data, cid, k_data, slot, bucket_size)
    client_work      client_work(algorithm, bcast, cstate, cdata, k_train)
    aggregator_add   add_block(runs, agg_states, sums, outputs, ...)
    merge            merge(runs, accumulators over devices)
    finalize         finalize(runs, acc, agg_states, k_agg)
    server_update    server_update(runs, server, aggregate)

Two backends run these SAME functions, so they cannot drift:

* the jitted backend (:mod:`fedjax_lite.engine.blocks`): ``gather`` and
  ``client_work`` vmapped over blocks of clients, ``add_block`` per device
  under ``shard_map``, blocks in ``lax.fori_loop``\ s, one jitted round;
* the debug backend (:mod:`fedjax_lite.engine.debug`): clients one by one
  in Python without jit, each stage called through a wrapper that names the
  client and the stage of an error.

Both pass every call that may fail in user code through ``call(stage, fn,
*args)`` (:func:`direct` in the jitted backend). Per-run values carry a
leading run axis ``[R, ...]``; the aggregator's functions are vmapped over
it (:class:`Runs`). Accumulated sums (``sums``: the aggregator's
accumulator, client counts, client-metric sums, dropped clients) are one
device's until :func:`finish_round`, which takes them with a leading device
axis ``[nd, R, ...]``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from fedjax_lite.aggregators.base import Aggregator, RunSpec, _no_state
from fedjax_lite.aggregators.mean import weighted_mean
from fedjax_lite.algorithms.base import (
  Aggregate,
  ClientOutput,
  FederatedAlgorithm,
)
from fedjax_lite.data.batching import (
  ClientData,
  DeviceData,
  gather_client,
  sample_clients,
)
from fedjax_lite.engine.state import EngineState, RoundConfig

PyTree = Any
# fold_in data of the round's aggregation key (the sampling and client keys
# stay split(fold_in(rng, round)) as before aggregators existed).
AGGREGATION_STREAM = 0x61676772
# Private metric of nonfinite="raise" rounds (popped by Engine.check_metrics).
NONFINITE_IDS = "_nonfinite_client_ids"
STAGES = (
  "broadcast",
  "sample",
  "gather",
  "client_work",
  "aggregator_add",
  "merge",
  "finalize",
  "server_update",
)


def direct(stage: str, fn: Callable, *args):
  """The jitted backend's ``call``: ``fn(*args)``."""
  del stage
  return fn(*args)


# ------------------------------------------------------------------- keys
def round_keys(rng: jax.Array, round_index: jax.Array):
  """``(k_sample, k_clients, k_aggregate)`` of round ``round_index``."""
  key = jax.random.fold_in(rng, round_index)
  k_sample, k_clients = jax.random.split(key)
  return k_sample, k_clients, jax.random.fold_in(key, AGGREGATION_STREAM)


def client_keys(k_clients: jax.Array, slot: jax.Array):
  """``(k_data, k_train)`` of the client at position ``slot`` of the sample."""
  return jax.random.split(jax.random.fold_in(k_clients, slot))


# ------------------------------------------------------------------- runs
def aggregator_of(
  algorithm: FederatedAlgorithm, run: RunSpec | None = None
) -> Aggregator:
  """The algorithm's aggregator (None: weighted mean), bound to ``run``
  (``Aggregator.bind``)."""
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


def keeps_no_state(aggregator: Aggregator) -> bool:
  """True when ``aggregator`` is known to keep no state (its ``init_state``
  is the stateless default), without tracing anything."""
  return aggregator.init_state is _no_state


class Runs:
  """The round's ``R`` runs: per-run algorithms and aggregators.

  ``map(fn, *args)`` calls ``fn(algorithm, aggregator, *args)`` for every run
  (vmapped over the leading run axis of ``args``; with per-run
  hyperparameters the algorithm is built from that run's traced values).

  Attributes:
    num_runs: ``R``.
    probe: an algorithm of the runs (shapes, names).
    aggregator: the aggregator of the runs (shapes, names, flags).
  """

  def __init__(
    self,
    algorithm: FederatedAlgorithm,
    algorithm_fn: Callable[[dict], FederatedAlgorithm] | None,
    hparams: dict | None,
    num_runs: int,
    run: RunSpec | None = None,
    aggregator: Aggregator | None = None,
  ):
    self.num_runs = int(num_runs)
    self.run = run
    self.algorithm_fn = algorithm_fn
    if algorithm_fn is not None:
      hparams = {k: jnp.asarray(v, jnp.float32) for k, v in hparams.items()}
      if any(v.shape != (num_runs,) for v in hparams.values()):
        raise ValueError(
          f"hparams must be [R={num_runs}] arrays, got "
          f"{ {k: v.shape for k, v in hparams.items()} }."
        )
      self.probe = algorithm_fn({k: v[0] for k, v in hparams.items()})
    else:
      self.probe = algorithm
    self.algorithm, self.hparams = algorithm, hparams
    self.aggregator = (
      aggregator
      if aggregator is not None and algorithm_fn is None
      else aggregator_of(self.probe, run)
    )

  def _of(self, h):
    if self.algorithm_fn is None:
      return self.algorithm, self.aggregator
    alg = self.algorithm_fn(h)
    return alg, aggregator_of(alg, self.run)

  def of_run(self, run: jax.Array) -> FederatedAlgorithm:
    """The algorithm of run index ``run`` (traced int)."""
    if self.algorithm_fn is None:
      return self.algorithm
    return self.algorithm_fn({n: v[run] for n, v in self.hparams.items()})

  def map(self, fn, *args):
    if self.algorithm_fn is not None:
      return jax.vmap(
        lambda h, *a: fn(*self._of(h), *a), axis_size=self.num_runs
      )(self.hparams, *args)
    alg, agg = self.algorithm, self.aggregator
    return jax.vmap(lambda *a: fn(alg, agg, *a), axis_size=self.num_runs)(*args)


# ------------------------------------------------------------ begin round
def begin_round(runs: Runs, states: EngineState, call=direct):
  """Every run's ``(k_sample, k_clients, k_aggregate)`` ``[R]`` and
  broadcast ``[R, ...]`` (stage ``"broadcast"``)."""
  k_sample, k_clients, k_agg = jax.vmap(round_keys)(states.rng, states.round)
  broadcast = call(
    "broadcast",
    lambda s: runs.map(lambda a, _, x: a.broadcast(x), s),
    states.server,
  )
  return k_sample, k_clients, k_agg, broadcast


# ------------------------------------------------------------------ sample
def sample(config: RoundConfig, k_sample: jax.Array, data: DeviceData):
  """Stage ``"sample"``: the round's ``clients_per_round`` client ids."""
  c = data.num_clients
  if config.sampling == "all":
    return jnp.arange(c, dtype=jnp.int32)
  weights = (
    data.counts.astype(jnp.float32) if config.sampling == "weighted" else None
  )
  return sample_clients(
    k_sample, c, config.clients_per_round, weights, config.replace
  )


# ------------------------------------------------------- gather, client work
def gather(
  config: RoundConfig,
  data: DeviceData,
  cid: jax.Array,
  k_data: jax.Array,
  slot: jax.Array,
  bucket_size: int,
) -> ClientData:
  """Stage ``"gather"``: ONE client's ``[steps, batch, ...]`` examples.

  With client-sharded data this reads the shard of the client's device (in
  the jitted round every device passes the view of its own shard)."""
  if data.sharded:
    data = data.shard_view(data.owner[cid])
  return gather_client(data, cid, k_data, config.local_work, bucket_size, slot)


def client_work(
  algorithm: FederatedAlgorithm,
  bcast: PyTree,
  cstate: PyTree,
  cdata: ClientData,
  k_train: jax.Array,
) -> ClientOutput:
  """Stage ``"client_work"``: ONE client's ``ClientOutput``."""
  return algorithm.client_update(bcast, cstate, cdata, k_train)


def client_output(
  config: RoundConfig,
  algorithm: FederatedAlgorithm,
  bcast: PyTree,
  cstate: PyTree,
  data: DeviceData,
  cid: jax.Array,
  k_clients: jax.Array,
  slot: jax.Array,
  bucket_size: int,
  call=direct,
) -> ClientOutput:
  """ONE client: its keys, :func:`gather`, then :func:`client_work`."""
  k_data, k_train = client_keys(k_clients, slot)
  cdata = call("gather", gather, config, data, cid, k_data, slot, bucket_size)
  return call(
    "client_work", client_work, algorithm, bcast, cstate, cdata, k_train
  )


def client_states_of(clients: PyTree, run: jax.Array, cid: jax.Array):
  """The persistent states ``[B, ...]`` of clients ``cid`` of runs ``run``
  (``clients`` leaves ``[R, num_clients, ...]``)."""
  if clients is None:
    return None
  return jax.tree.map(lambda a: a[run, cid], clients)


def store_client_states(clients, run, cid, new_states, keep):
  """``clients`` with the ``new_states`` ``[B, ...]`` of the clients whose
  ``keep`` is True (a dropped client keeps its previous state)."""
  if clients is None:
    return None
  n = jax.tree.leaves(clients)[0].shape[1]
  idx = jnp.where(keep, cid, n)
  return jax.tree.map(
    lambda a, s: a.at[run, idx].set(
      jnp.asarray(s).astype(a.dtype), mode="drop"
    ),
    clients,
    new_states,
  )


def tree_finite(tree: PyTree) -> jax.Array:
  """bool scalar: every element of every floating leaf is finite."""
  ok = jnp.ones((), bool)
  for x in jax.tree.leaves(tree):
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.inexact):
      ok = ok & jnp.all(jnp.isfinite(x))
  return ok


# ------------------------------------------------------------- aggregation
def aggregator_states(runs: Runs, current: PyTree, update_spec: PyTree):
  """``(per-run aggregator states [R, ...], stateful)``: ``current`` (the
  states' ``aggregator``), or fresh ones where it is None or the aggregator
  keeps no state."""
  agg = runs.aggregator
  fresh_spec = jax.eval_shape(lambda: agg.init_state(update_spec))
  if not jax.tree.leaves(fresh_spec):
    return runs.map(lambda alg, ag: ag.init_state(update_spec)), False
  if current is None:
    return runs.map(lambda alg, ag: ag.init_state(update_spec)), True
  want = jax.tree.structure(fresh_spec)
  got = jax.tree.structure(jax.tree.map(lambda a: a[0], current))
  if want != got:
    raise ValueError(
      f"EngineState.aggregator has structure {got}, but "
      f"aggregator {agg.name} keeps {want}; init the state "
      "with this engine (engine.init) or set "
      "state.replace(aggregator=None) to start it afresh."
    )
  return current, True


def active_slots(runs: Runs, agg_states: PyTree):
  """Every run's count ``K`` ``[R]`` of slots that take part
  (``Aggregator.active_slots``), or None: every slot."""
  if runs.aggregator.active_slots is None:
    return None
  return runs.map(lambda alg, ag, st: ag.active_slots(st), agg_states)


def _sum_dtype(dtype):
  return jnp.float32 if jnp.issubdtype(dtype, jnp.integer) else dtype


def init_sums(
  runs: Runs,
  agg_states: PyTree,
  output_spec: ClientOutput,
  num_slots: int,
  report_ids: bool,
) -> dict:
  """One device's zero sums for every run: the aggregator's accumulator
  (``Aggregator.init``), client count, client-metric sums, dropped
  (non-finite) clients and, with ``report_ids``, their ids per slot."""
  R = runs.num_runs
  spec = output_spec.update
  sums = {
    "acc": runs.map(lambda _, ag, st: ag.init(st, spec, num_slots), agg_states),
    "count": jnp.zeros((R,), jnp.float32),
    "metrics": jax.tree.map(
      lambda s: jnp.zeros((R,) + tuple(s.shape), _sum_dtype(s.dtype)),
      output_spec.metrics,
    ),
    "dropped": jnp.zeros((R,), jnp.float32),
  }
  if report_ids:  # client id per slot, -1: finite
    sums["bad_ids"] = jnp.full((R, num_slots), -1, jnp.int32)
  return sums


def per_run_sum(x, valid, run, num_runs):
  """``[B, ...]`` -> ``[R, ...]``: the sum per run of the valid clients."""
  v = valid.reshape(valid.shape + (1,) * (x.ndim - 1))
  x = jnp.where(v, x, jnp.zeros((), x.dtype))
  if jnp.issubdtype(x.dtype, jnp.integer):
    x = x.astype(jnp.float32)
  onehot = (run[:, None] == jnp.arange(num_runs)[None, :]).astype(x.dtype)
  return jnp.einsum(
    "br,b...->r...", onehot, x, precision=jax.lax.Precision.HIGHEST
  )


def add_block(
  runs: Runs,
  agg_states: PyTree,
  sums: dict,
  outputs: ClientOutput,
  valid: jax.Array,
  cid: jax.Array,
  slot: jax.Array,
  run: jax.Array,
):
  """Stage ``"aggregator_add"``: one device's block of ``B`` clients.

  Non-finite updates (or weights) leave the round here, before any
  aggregator sees them (``RoundConfig.nonfinite``); every run's aggregator
  adds its own finite clients (``Aggregator.add``), and the client counts
  and metric sums grow.

  Args:
    runs: the round's runs.
    agg_states: aggregator states ``[R, ...]``.
    sums: one device's sums (:func:`init_sums`).
    outputs: the block's client outputs, leaves ``[B, ...]``.
    valid: bool ``[B]``, False for padding.
    cid, slot, run: int32 ``[B]``: client id, slot in its run's sample, run.

  Returns:
    ``(sums, finite)``: the new sums and bool ``[B]``, which outputs were
    finite.
  """
  R = runs.num_runs
  weights = jnp.asarray(outputs.weight, jnp.float32).reshape(-1)
  finite = jax.vmap(tree_finite)(outputs.update) & jnp.isfinite(weights)
  bad = valid & ~finite
  valid = valid & finite
  new = dict(sums)
  new["dropped"] = sums["dropped"] + per_run_sum(
    bad.astype(jnp.float32), bad, run, R
  )
  if "bad_ids" in sums:
    num_slots = sums["bad_ids"].shape[-1]
    new["bad_ids"] = (
      sums["bad_ids"]
      .at[run, jnp.where(bad, slot, num_slots)]
      .set(cid, mode="drop")
    )

  def add(_, ag, st, acc, run_index):
    return ag.add(
      st, acc, outputs.update, weights, valid & (run == run_index), slot
    )

  new["acc"] = runs.map(
    add, agg_states, sums["acc"], jnp.arange(R, dtype=jnp.int32)
  )
  new["count"] = sums["count"] + per_run_sum(
    valid.astype(jnp.float32), valid, run, R
  )
  new["metrics"] = jax.tree.map(
    lambda a, v: a + per_run_sum(jnp.asarray(v), valid, run, R),
    sums["metrics"],
    outputs.metrics,
  )
  return new, finite


def merge(runs: Runs, acc: PyTree) -> PyTree:
  """Stage ``"merge"``: accumulators ``[nd, R, ...]`` -> ``[R, ...]``
  (``Aggregator.merge``, the round's one cross-device reduction)."""
  by_run = jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), acc)
  return runs.map(lambda _, ag, a: ag.merge(a), by_run)


def finalize(runs: Runs, acc: PyTree, agg_states: PyTree, k_agg: jax.Array):
  """Stage ``"finalize"``: ``(AggregatorOutput [R, ...], new aggregator
  states [R, ...])`` (``Aggregator.finalize``)."""
  return runs.map(
    lambda _, ag, a, st, k: ag.finalize(st, a, k), acc, agg_states, k_agg
  )


def server_update(runs: Runs, server: PyTree, aggregate: Aggregate) -> PyTree:
  """Stage ``"server_update"``: every run's new server state."""
  return runs.map(lambda a, _, s, g: a.server_update(s, g), server, aggregate)


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


def round_metrics(aggregate: Aggregate, output, sums: dict, name: str) -> dict:
  """The round's metrics: client metrics, totals, ``dropped_nonfinite`` and
  the aggregator's own (a name the round already reports is an error)."""
  metrics = finalize_metrics(aggregate)
  metrics["dropped_nonfinite"] = jnp.sum(sums["dropped"], axis=0)
  if "bad_ids" in sums:
    metrics[NONFINITE_IDS] = jnp.max(sums["bad_ids"], axis=0)
  for key, value in output.metrics.items():
    if key in metrics:
      raise ValueError(
        f"aggregator {name} reports a metric {key!r} that the round already "
        f"reports ({sorted(metrics)}); rename it."
      )
    metrics[key] = value
  return metrics


def finish_round(
  runs: Runs,
  states: EngineState,
  sums: dict,
  agg_states: PyTree,
  k_agg: jax.Array,
  stateful_aggregator: bool,
  clients: PyTree,
  call=direct,
) -> tuple[EngineState, dict]:
  """Merge, finalize and server update from every device's ``sums``
  (leading axes ``[nd, R]``): the new states and the round's metrics."""
  acc = call("merge", merge, runs, sums["acc"])
  output, new_agg_states = call(
    "finalize", finalize, runs, acc, agg_states, k_agg
  )
  aggregate = Aggregate(
    mean=output.mean,
    total_weight=output.total_weight,
    num_clients=jnp.sum(sums["count"], axis=0),
    metrics=jax.tree.map(lambda a: jnp.sum(a, axis=0), sums["metrics"]),
  )
  server = call("server_update", server_update, runs, states.server, aggregate)
  new_states = EngineState(
    server=server,
    clients=clients,
    round=states.round + 1,
    rng=states.rng,
    aggregator=new_agg_states if stateful_aggregator else None,
  )
  metrics = round_metrics(aggregate, output, sums, runs.aggregator.name)
  return new_states, metrics
