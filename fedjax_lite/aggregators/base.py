r"""What an aggregator is: a small tuple of pure functions the round calls.

The engine reduces a round's client updates in three stages, all inside the
one jitted round (``nd`` devices, blocks of ``B`` clients per device)::

    state = aggregator.init_state(update_spec)           # once, kept across rounds
    acc = aggregator.init(state, update_spec, num_slots) # per device, per run
    for every block:                                     # inside lax.fori_loop
      acc = aggregator.add(state, acc, updates[B, ...], weights[B], valid[B],
                           slots[B])                     # vmapped over devices
    acc = aggregator.merge(accs[nd, ...])                # one cross-device reduction
    output, state = aggregator.finalize(state, acc, rng) # noise, medians, ...

``updates`` hold one device's block (``valid == False`` marks padding slots,
which never count); ``slots`` is each client's position in the round's
sample (``[0, num_slots)``, unique per run), so materialized aggregators can
write every client's update into its own row of a ``[num_slots, ...]``
buffer. Aggregators compose like optax transformations (see
:func:`fedjax_lite.aggregators.clipped`).

This package sits beside ``algorithms/``: it imports only
``fedjax_lite.algorithms.base`` (and jax); ``engine/`` imports it.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lite import checks

PyTree = Any


class AggregatorOutput(NamedTuple):
  """The reduced round.

  Attributes:
    mean: what ``server_update`` receives as ``Aggregate.mean`` (same
      structure as one client's update).
    total_weight: float32 scalar, ``Aggregate.total_weight`` (the summed
      weights of the clients that took part).
    metrics: name -> float32 scalar, reported in the round's metrics.
  """

  mean: PyTree
  total_weight: jax.Array
  metrics: dict


class RunSpec(NamedTuple):
  """What a round actually does, as the engine knows it (host side, static).

  Aggregators whose output depends on the run's set-up (a privacy accountant
  needs the population, the sampling scheme and the clients per round) read
  it from here through :attr:`Aggregator.bind` instead of trusting values
  declared beside the engine.

  Attributes:
    population: number of clients in the round's data.
    clients_per_round: ``RoundConfig.clients_per_round`` (slots per round).
    sampling: ``RoundConfig.sampling`` (``"uniform"``, ``"weighted"`` or
      ``"all"``).
    replace: ``RoundConfig.replace`` (sampling with replacement).
  """

  population: int
  clients_per_round: int
  sampling: str
  replace: bool


def _no_state(update_spec):
  del update_spec
  return ()


class Aggregator(NamedTuple):
  """How a round reduces its clients' updates (see the module docstring).

  Attributes:
    init_state: ``update_spec -> state`` kept across rounds (a pytree of
      arrays, or ``()``); ``update_spec`` is a pytree of
      ``jax.ShapeDtypeStruct`` of ONE client's update.
    init: ``(state, update_spec, num_slots) -> acc``: one device's zero
      accumulator for one run (``num_slots = clients_per_round``).
    add: ``(state, acc, updates, weights, valid, slots) -> acc`` for one
      device's block: update leaves ``[B, ...]``, weights float32 ``[B]``,
      valid bool ``[B]`` (False: padding, must not count), slots int32
      ``[B]``.
    merge: accumulators with a leading device axis ``[nd, ...]`` -> one.
    finalize: ``(state, acc, rng) -> (AggregatorOutput, new_state)``.
    materialized: True if the accumulator keeps every client's update
      (``[num_slots, ...]``, memory ``num_slots x update`` per device and
      run); False for streaming aggregators (memory ``O(update)``).
    name: for reports and errors.
    active_slots: optional ``state -> int32 scalar K``: only the sampled
      clients in slots ``< K`` take part in the round (e.g. a Poisson sample
      drawn inside a fixed cap of slots); the engine trains only those, so
      a round costs ``min(K, num_slots)`` clients' work. None: every slot.
    bind: optional ``RunSpec -> Aggregator``: the engine calls it (on the
      host, when a round is traced) with the run's actual population and
      sampling, and rounds use the aggregator it returns. It may raise a
      ``ValueError`` for a set-up the aggregator cannot serve (e.g. an
      accountant refusing weighted sampling). Wrappers must re-wrap the bound
      inner aggregator. None: the aggregator does not depend on the run.
    check_output: optional ``metrics -> None`` called on the host with the
      round's metrics (numpy values; stacked over rounds for ``Engine.run``)
      after every jitted round; it raises the aggregator's own error for a
      round it refused (device code never raises, so no device is left
      waiting in a collective). None: nothing to check.
  """

  init_state: Callable[[PyTree], PyTree]
  init: Callable[[PyTree, PyTree, int], PyTree]
  add: Callable[..., PyTree]
  merge: Callable[[PyTree], PyTree]
  finalize: Callable[..., tuple[AggregatorOutput, PyTree]]
  materialized: bool = False
  name: str = "aggregator"
  active_slots: Callable[[PyTree], jax.Array] | None = None
  bind: Callable[[RunSpec], "Aggregator"] | None = None
  check_output: Callable[[dict], None] | None = None


# ----------------------------------------------------------------- helpers
def tree_norm(update: PyTree) -> jax.Array:
  r"""The L2 norm of a whole update, :math:`\sqrt{\sum_{leaves} \|u\|^2}`.

  Written for ONE update (no client axis); vmap it over clients. Computed in
  float32 (or the widest leaf dtype) so bfloat16 updates do not overflow.
  """
  leaves = jax.tree.leaves(update)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  dtype = jnp.result_type(jnp.float32, *[x.dtype for x in leaves])
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(dtype))) for x in leaves))


def clip_by_norm(update: PyTree, clip_norm) -> PyTree:
  r"""Scales ONE update to L2 norm at most ``clip_norm``.

  .. math:: u \cdot \min\left(1, \frac{C}{\|u\|_2}\right)

  (an all-zero update stays zero).
  """
  norm = tree_norm(update)
  scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norm, 1e-30))
  return jax.tree.map(lambda x: x * scale.astype(x.dtype), update)


def sum_over_devices(acc: PyTree) -> PyTree:
  """The usual ``merge``: a sum over the leading device axis."""
  return jax.tree.map(lambda a: jnp.sum(a, axis=0), acc)


def accumulator_dtype(dtype) -> np.dtype:
  """Floats keep their dtype; integer and bool leaves are summed in float32."""
  return (
    np.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating)
    else np.dtype(jnp.float32)
  )


def taking_part(weights: jax.Array, valid: jax.Array) -> jax.Array:
  """Clients that count: real (not padding) and with positive weight."""
  return valid & (weights > 0)


def expand(x: jax.Array, ndim: int) -> jax.Array:
  """``[B]`` -> ``[B, 1, ..., 1]`` with ``ndim`` dims (no rank promotion)."""
  return x.reshape(x.shape + (1,) * (ndim - x.ndim))


def wrapper(
  make: Callable[[Aggregator], Aggregator],
) -> Callable[[Aggregator], Aggregator]:
  """An aggregator wrapper ``wrap(inner)`` from ``make(inner)``, the
  wrapper's own functions around ``inner`` (a decorator).

  ``make(inner)`` returns an :class:`Aggregator` whose functions keep
  ``inner``'s state under ``state["inner"]``. ``wrap(inner)`` is that
  aggregator with ``inner``'s ``materialized`` and ``check_output``, and
  ``inner``'s ``active_slots`` read from ``state["inner"]``; a
  run-dependent ``inner`` (``Aggregator.bind``, e.g. DP accounting) binds to
  the run and the bound one is wrapped again.
  """

  def wrap(inner: Aggregator) -> Aggregator:
    active, bind = inner.active_slots, inner.bind
    return make(inner)._replace(
      materialized=inner.materialized,
      active_slots=None if active is None else lambda s: active(s["inner"]),
      bind=None if bind is None else lambda run: wrap(bind(run)),
      check_output=inner.check_output,
    )

  return wrap


def check_float_updates(update_spec: PyTree, name: str) -> None:
  """Raises if an update leaf is not floating point (trace-time check)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(update_spec)
  bad = [
    (jax.tree_util.keystr(p), np.dtype(s.dtype))
    for p, s in flat
    if not jnp.issubdtype(s.dtype, jnp.floating)
  ]
  if bad:
    path, dtype = bad[0]
    raise TypeError(
      f"aggregator {name} needs floating-point updates, but the client "
      f"update leaf {path or '<root>'} has dtype {dtype} ({len(bad)} "
      f"non-float leaves); expected float16/bfloat16/float32/float64. "
      "Cast the update in client_update, or use weighted_mean()."
    )


def update_bytes(update_spec: PyTree) -> int:
  """Bytes of one client's update."""
  return int(
    sum(
      int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize
      for s in jax.tree.leaves(update_spec)
    )
  )


def check_positive(value, arg: str, factory: str, allow_zero: bool = False):
  """A positive (or non-negative) finite real number, named ``factory: arg``
  (:func:`fedjax_lite.checks.positive_float`), or a traced scalar (a
  hyperparameter of a vectorized sweep, checked where it was concrete)."""
  if isinstance(value, jax.core.Tracer):
    return jnp.asarray(value, jnp.float32)
  return checks.positive_float(
    f"{factory}: {arg}", value, allow_zero=allow_zero
  )


def check_int(value, arg: str, factory: str, minimum: int) -> int:
  """An int ``>= minimum`` (bool refused), named ``factory: arg``."""
  return checks.int_at_least(f"{factory}: {arg}", value, minimum)
