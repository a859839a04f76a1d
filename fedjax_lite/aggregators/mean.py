r"""Streaming means (memory ``O(update)`` per device and run).

:func:`weighted_mean` is the engine's default (FedAvg's
:math:`\sum_k n_k \Delta_k / \sum_k n_k`, McMahan et al. 2017,
arXiv:1602.05629); :func:`unweighted_mean` gives every client the same say.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_lite.aggregators.base import (
  Aggregator,
  AggregatorOutput,
  _no_state,
  accumulator_dtype,
  expand,
  sum_over_devices,
  taking_part,
)


def _zeros_acc(update_spec):
  return {
    "sum": jax.tree.map(
      lambda s: jnp.zeros(s.shape, accumulator_dtype(s.dtype)), update_spec
    ),
    "weight": jnp.zeros((), jnp.float32),
  }


def _weighted_sum(acc_sum, updates, scale, valid):
  """``acc + sum_b [valid_b] scale_b u_b`` per leaf (padding never counts)."""

  def one(a, u):
    x = jnp.where(expand(valid, u.ndim), u, jnp.zeros((), u.dtype))
    if not jnp.issubdtype(x.dtype, jnp.floating):
      x = x.astype(a.dtype)
    x = x * expand(scale, x.ndim).astype(x.dtype)
    return a + jnp.sum(x, axis=0)

  return jax.tree.map(one, acc_sum, updates)


def _mean(sums, divisor):
  """``sums / divisor`` (zeros if ``divisor == 0``), computed as ``sums *
  (1 / divisor)`` (one division per leaf). Equal to a float64 mean to float32
  rounding; different compiled computations of it are not promised equal
  bits."""
  inv = 1.0 / jnp.where(divisor > 0, divisor, 1.0)
  return jax.tree.map(
    lambda a: jnp.where(divisor > 0, a * inv, jnp.zeros((), a.dtype)), sums
  )


def _streaming_mean(name: str, init, add, divisor: str) -> Aggregator:
  """A stateless streaming Aggregator whose accumulator (made by ``init``,
  grown by ``add``) holds ``"sum"``, ``"weight"`` and ``divisor``; the mean
  is ``sum / acc[divisor]``, the total weight ``acc["weight"]``."""

  def finalize(state, acc, rng):
    del rng
    return AggregatorOutput(
      mean=_mean(acc["sum"], acc[divisor]),
      total_weight=acc["weight"],
      metrics={},
    ), state

  return Aggregator(
    init_state=_no_state,
    init=init,
    add=add,
    merge=sum_over_devices,
    finalize=finalize,
    name=name,
  )


def weighted_mean() -> Aggregator:
  r"""The weighted mean of the clients' updates (the engine's default).

  .. math:: \bar u = \frac{\sum_{k} w_k u_k}{\sum_k w_k}

  (zeros when no weight arrived). Streaming: one device keeps
  :math:`\sum_k w_k u_k` and :math:`\sum_k w_k` (memory one update).
  Integer update leaves are summed in float32.
  """

  def init(state, update_spec, num_slots):
    del state, num_slots
    return _zeros_acc(update_spec)

  def add(state, acc, updates, weights, valid, slots):
    del state, slots
    w = jnp.where(valid, weights.astype(jnp.float32), 0.0)
    return {
      "sum": _weighted_sum(acc["sum"], updates, w, valid),
      "weight": acc["weight"] + jnp.sum(jnp.where(valid, w, 0.0)),
    }

  return _streaming_mean("weighted_mean", init, add, divisor="weight")


def unweighted_mean() -> Aggregator:
  r"""The plain mean over the clients that took part.

  .. math:: \bar u = \frac{1}{|S|} \sum_{k \in S} u_k,
            \quad S = \{k : w_k > 0\}

  ``total_weight`` still reports :math:`\sum_k w_k`. Streaming (memory one
  update per device and run).
  """

  def init(state, update_spec, num_slots):
    del state, num_slots
    acc = _zeros_acc(update_spec)
    acc["count"] = jnp.zeros((), jnp.float32)
    return acc

  def add(state, acc, updates, weights, valid, slots):
    del state, slots
    part = taking_part(weights, valid)
    one = part.astype(jnp.float32)
    return {
      "sum": _weighted_sum(acc["sum"], updates, one, part),
      "weight": acc["weight"] + jnp.sum(jnp.where(part, weights, 0.0)),
      "count": acc["count"] + jnp.sum(one),
    }

  return _streaming_mean("unweighted_mean", init, add, divisor="count")
