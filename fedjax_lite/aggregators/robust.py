r"""Byzantine-robust aggregators that need every update of the round.

They are *materialized*: the accumulator keeps a ``[num_slots, ...]`` buffer
of the round's updates (``num_slots = clients_per_round``), each client
written into the row of its position in the sample, plus ``[num_slots]``
weights and a 0/1 mask. Memory: ``clients_per_round x update bytes`` per
device and run (the devices' buffers are filled disjointly and summed once,
at the end of the round). Rows of padding slots, of clients that never came
(fewer sampled than ``num_slots``) and of clients with weight 0 stay masked
and never count.

Coordinate-wise rules (:func:`coordinate_median`, :func:`trimmed_mean`) sort
each coordinate over clients; whole-vector rules (:func:`krum`,
:func:`geometric_median`, :func:`centered_clipping`) use L2 distances
between whole updates (all leaves together). Median, trimmed mean, Krum and
centered clipping are unweighted as published; the geometric median is
weighted as in RFA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lite.aggregators.base import (
  Aggregator,
  AggregatorOutput,
  _no_state,
  check_float_updates,
  check_int,
  check_positive,
  expand,
  sum_over_devices,
  taking_part,
)

_HI = jax.lax.Precision.HIGHEST


# ------------------------------------------------------------------ buffer
def _buffer_init(update_spec, num_slots, name):
  check_float_updates(update_spec, name)
  return {
    "updates": jax.tree.map(
      lambda s: jnp.zeros((num_slots,) + tuple(s.shape), s.dtype), update_spec
    ),
    "weights": jnp.zeros((num_slots,), jnp.float32),
    "mask": jnp.zeros((num_slots,), jnp.float32),
  }


def _buffer_add(acc, updates, weights, valid, slots):
  num_slots = acc["mask"].shape[0]
  part = taking_part(weights, valid)
  idx = jnp.where(part, slots, num_slots)  # out of range: dropped
  return {
    "updates": jax.tree.map(
      lambda a, u: a.at[idx].set(u.astype(a.dtype), mode="drop"),
      acc["updates"],
      updates,
    ),
    "weights": acc["weights"].at[idx].set(weights, mode="drop"),
    "mask": acc["mask"].at[idx].set(1.0, mode="drop"),
  }


def _materialized(name, finalize, init_state=_no_state, check=None):
  def init(state, update_spec, num_slots):
    del state
    if check is not None:
      check(num_slots)
    return _buffer_init(update_spec, num_slots, name)

  def add(state, acc, updates, weights, valid, slots):
    del state
    return _buffer_add(acc, updates, weights, valid, slots)

  return Aggregator(
    init_state=init_state,
    init=init,
    add=add,
    merge=sum_over_devices,
    finalize=finalize,
    materialized=True,
    name=name,
  )


def _total_weight(acc):
  return jnp.sum(acc["weights"] * acc["mask"])


def _sq_distances_to(updates, point):
  """``[m]``: ``||u_i - point||^2`` over all leaves (point: one update)."""

  def one(u, p):
    d = (u - p[None]).astype(jnp.float32).reshape(u.shape[0], -1)
    return jnp.sum(d * d, axis=1)

  return sum(jax.tree.leaves(jax.tree.map(one, updates, point)))


def _pairwise_sq_distances(updates):
  """``[m, m]``: ``||u_i - u_j||^2`` via Gram matrices (clamped at 0)."""
  gram = 0.0
  for u in jax.tree.leaves(updates):
    f = u.astype(jnp.float32).reshape(u.shape[0], -1)
    gram = gram + jnp.matmul(f, f.T, precision=_HI)
  sq = jnp.diagonal(gram)
  return jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)


def _weighted_rows(updates, coef):
  """``sum_i coef_i u_i`` (coef ``[m]``)."""
  return jax.tree.map(
    lambda u: jnp.einsum("m,m...->...", coef.astype(u.dtype), u, precision=_HI),
    updates,
  )


def _zeros_if_empty(n, tree):
  return jax.tree.map(
    lambda a: jnp.where(n > 0, a, jnp.zeros((), a.dtype)), tree
  )


def _sorted_valid(a, mask):
  """Sorts each coordinate over clients, padding rows (+inf) last."""
  big = jnp.asarray(jnp.inf, a.dtype)
  return jnp.sort(jnp.where(expand(mask > 0, a.ndim), a, big), axis=0)


# ------------------------------------------------------- coordinate-wise
def coordinate_median() -> Aggregator:
  r"""The coordinate-wise median (Yin et al. 2018, "Byzantine-Robust
  Distributed Learning: Towards Optimal Statistical Rates",
  arXiv:1803.01498).

  .. math:: \bar u_j = \mathrm{median}\{u_{k,j} : k \in S\}

  for every coordinate ``j`` (the mean of the two middle values for an even
  number of clients). Unweighted. Materialized: ``clients_per_round x
  update`` per device and run.
  """

  def finalize(state, acc, rng):
    del rng
    mask = acc["mask"]
    n = jnp.sum(mask).astype(jnp.int32)
    lo, hi = jnp.maximum(n - 1, 0) // 2, n // 2

    def med(a):
      s = _sorted_valid(a, mask)
      return 0.5 * (jnp.take(s, lo, axis=0) + jnp.take(s, hi, axis=0))

    mean = _zeros_if_empty(n, jax.tree.map(med, acc["updates"]))
    return AggregatorOutput(
      mean=mean, total_weight=_total_weight(acc), metrics={}
    ), state

  return _materialized("coordinate_median", finalize)


def trimmed_mean(beta: float) -> Aggregator:
  r"""The coordinate-wise trimmed mean (Yin et al. 2018, arXiv:1803.01498).

  For every coordinate, the ``k = floor(beta * n)`` largest and ``k``
  smallest of the ``n`` clients' values are removed and the rest averaged:

  .. math:: \bar u_j = \frac{1}{n - 2k} \sum_{i=k}^{n-k-1} u_{(i),j}

  Unweighted. Materialized: ``clients_per_round x update`` per device and
  run.

  Args:
    beta: the fraction trimmed from each side, ``0 <= beta < 0.5``.
  """
  if isinstance(beta, bool) or not isinstance(
    beta, (int, float, np.floating, np.integer)
  ):
    raise TypeError(
      f"trimmed_mean: beta must be a float in [0, 0.5), got {beta!r}."
    )
  if not 0.0 <= float(beta) < 0.5:
    raise ValueError(
      f"trimmed_mean: beta must be in [0, 0.5) (the fraction "
      f"trimmed from EACH side), got {beta!r}; beta >= 0.5 "
      "would trim every client."
    )
  beta = float(beta)

  def finalize(state, acc, rng):
    del rng
    mask = acc["mask"]
    m = mask.shape[0]
    # k for every possible n, computed exactly (float64) on the host.
    table = jnp.asarray(
      [int(np.floor(beta * n)) for n in range(m + 1)], jnp.int32
    )
    n = jnp.sum(mask).astype(jnp.int32)
    k = table[n]
    pos = jnp.arange(m)
    keep = (pos >= k) & (pos < n - k)
    denom = jnp.maximum(n - 2 * k, 1).astype(jnp.float32)

    def tmean(a):
      s = _sorted_valid(a, mask)
      kept = jnp.where(expand(keep, a.ndim), s, jnp.zeros((), a.dtype))
      return (jnp.sum(kept, axis=0) / denom).astype(a.dtype)

    mean = _zeros_if_empty(n, jax.tree.map(tmean, acc["updates"]))
    return AggregatorOutput(
      mean=mean, total_weight=_total_weight(acc), metrics={}
    ), state

  return _materialized(f"trimmed_mean({beta})", finalize)


# ----------------------------------------------------------- whole-vector
def krum(num_byzantine: int, multi: int = 1) -> Aggregator:
  r"""Krum and Multi-Krum (Blanchard et al. 2017, "Machine Learning with
  Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS).

  Every client ``i`` of the ``n`` that took part is scored by the squared
  distances to its ``n - f - 2`` nearest other clients,
  :math:`s(i) = \sum_{i \to j} \|u_i - u_j\|^2`; Krum returns the update of
  the lowest score, Multi-Krum the unweighted mean of the ``multi`` lowest
  (ties: the earlier slot). If fewer clients came than the round was sized
  for, the neighbour count is clamped to ``[1, n - 1]``. Distances come from
  float32 Gram matrices. Materialized: ``clients_per_round x update`` per
  device and run, plus ``[clients_per_round]^2`` distances.

  Args:
    num_byzantine: ``f``, the number of Byzantine clients tolerated; the
      round needs ``clients_per_round > 2 f + 2``.
    multi: how many best-scored updates to average (1: Krum).
  """
  f = check_int(num_byzantine, "num_byzantine", "krum", 0)
  multi = check_int(multi, "multi", "krum", 1)

  def check(num_slots):
    if 2 * f + 2 >= num_slots:
      raise ValueError(
        f"krum: num_byzantine={f} needs clients_per_round > 2 * "
        f"num_byzantine + 2 = {2 * f + 2}, got clients_per_round="
        f"{num_slots}; sample more clients or lower num_byzantine."
      )
    if multi > num_slots - f:
      raise ValueError(
        f"krum: multi={multi} must be <= clients_per_round - "
        f"num_byzantine = {num_slots - f}."
      )

  def finalize(state, acc, rng):
    del rng
    mask = acc["mask"] > 0
    m = mask.shape[0]
    n = jnp.sum(mask.astype(jnp.int32))
    d = _pairwise_sq_distances(acc["updates"])
    others = mask[None, :] & ~jnp.eye(m, dtype=bool)
    d = jnp.where(others, d, jnp.inf)
    nearest = jnp.sort(d, axis=1)
    k = jnp.clip(n - f - 2, 1, jnp.maximum(n - 1, 1))
    scores = jnp.sum(
      jnp.where(jnp.arange(m)[None, :] < k, nearest, 0.0), axis=1
    )
    scores = jnp.where(mask, scores, jnp.inf)
    order = jnp.argsort(scores, stable=True)
    chosen = jnp.minimum(multi, n)
    coef = (
      jnp.zeros((m,), jnp.float32)
      .at[order]
      .set((jnp.arange(m) < chosen).astype(jnp.float32))
    )
    coef = coef / jnp.maximum(chosen, 1).astype(jnp.float32)
    mean = _zeros_if_empty(n, _weighted_rows(acc["updates"], coef))
    return AggregatorOutput(
      mean=mean, total_weight=_total_weight(acc), metrics={}
    ), state

  name = f"krum({f})" if multi == 1 else f"multi_krum({f}, {multi})"
  return _materialized(name, finalize, check=check)


def geometric_median(
  eps: float = 1e-6, iters: int = 10, nu: float = 1e-6
) -> Aggregator:
  r"""The weighted geometric median by smoothed Weiszfeld (RFA: Pillutla et
  al. 2019, "Robust Aggregation for Federated Learning", arXiv:1912.13445).

  Minimises :math:`\sum_k \alpha_k \max(\nu, \|z - u_k\|)` with
  :math:`\alpha_k = w_k / \sum_j w_j`, starting from the weighted mean:

  .. math:: \beta_k = \frac{\alpha_k}{\max(\nu, \|z_t - u_k\|_2)}, \quad
            z_{t+1} = \frac{\sum_k \beta_k u_k}{\sum_k \beta_k}

  for at most ``iters`` steps, stopping when the objective
  :math:`g(z) = \sum_k \alpha_k \|z - u_k\|` changes by at most
  ``eps * g``. The round's metrics report ``geometric_median_iters``.
  Materialized: ``clients_per_round x update`` per device and run.

  Args:
    eps: relative tolerance of the objective for stopping early (>= 0).
    iters: the most Weiszfeld steps (>= 1).
    nu: smoothing ``nu > 0`` (distances below it count as ``nu``).
  """
  eps = check_positive(eps, "eps", "geometric_median", allow_zero=True)
  iters = check_int(iters, "iters", "geometric_median", 1)
  nu = check_positive(nu, "nu", "geometric_median")

  def finalize(state, acc, rng):
    del rng
    u = acc["updates"]
    w = acc["weights"] * acc["mask"]
    total = jnp.sum(w)
    alpha = w / jnp.where(total > 0, total, 1.0)

    def objective(z):
      return jnp.sum(alpha * jnp.sqrt(_sq_distances_to(u, z)))

    z0 = _weighted_rows(u, alpha)

    def step(carry):
      t, z, g, _ = carry
      dist = jnp.sqrt(_sq_distances_to(u, z))
      beta = alpha / jnp.maximum(nu, dist)
      z_new = _weighted_rows(u, beta / jnp.sum(beta))
      g_new = objective(z_new)
      return t + 1, z_new, g_new, jnp.abs(g - g_new) <= eps * g_new

    def cond(carry):
      t, _, _, done = carry
      return (t < iters) & ~done

    t, z, _, _ = jax.lax.while_loop(
      cond, step, (jnp.int32(0), z0, objective(z0), total <= 0)
    )
    mean = _zeros_if_empty(total, z)
    return AggregatorOutput(
      mean=mean,
      total_weight=total,
      metrics={"geometric_median_iters": t.astype(jnp.float32)},
    ), state

  return _materialized("geometric_median", finalize)


def centered_clipping(tau: float, iters: int = 1) -> Aggregator:
  r"""Centered clipping (Karimireddy et al. 2021, "Learning from History for
  Byzantine Robust Optimization", arXiv:2012.10333).

  Starting from the center :math:`v_0` = the previous round's aggregate,

  .. math:: v_{l+1} = v_l + \frac{1}{n} \sum_{k \in S} (u_k - v_l)
            \min\left(1, \frac{\tau}{\|u_k - v_l\|_2}\right)

  for ``iters`` steps; the result is the round's aggregate and the next
  round's center. The center lives in the aggregator state (zeros before
  the first round; checkpointed with the engine state); a round without
  clients returns zeros and keeps it. Unweighted, as published.
  Materialized: ``clients_per_round x update`` per device and run, plus the
  center (one update) in the state.

  Args:
    tau: the clipping radius ``tau > 0``.
    iters: clipping iterations ``L >= 1``.
  """
  tau = check_positive(tau, "tau", "centered_clipping")
  iters = check_int(iters, "iters", "centered_clipping", 1)

  def init_state(update_spec):
    check_float_updates(update_spec, "centered_clipping")
    return {
      "center": jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), update_spec)
    }

  def finalize(state, acc, rng):
    del rng
    u = acc["updates"]
    mask = acc["mask"]
    n = jnp.sum(mask)

    def step(_, v):
      dist = jnp.sqrt(_sq_distances_to(u, v))
      scale = jnp.minimum(1.0, tau / jnp.maximum(dist, 1e-30))
      coef = mask * scale / jnp.where(n > 0, n, 1.0)
      moved = _weighted_rows(u, coef)
      # v + sum_k c_k (u_k - v) = v (1 - sum_k c_k) + sum_k c_k u_k
      s = jnp.sum(coef)
      return jax.tree.map(
        lambda vv, mv: vv * (1.0 - s).astype(vv.dtype) + mv, v, moved
      )

    v = jax.lax.fori_loop(0, iters, step, state["center"])
    center = jax.tree.map(
      lambda new, old: jnp.where(n > 0, new, old), v, state["center"]
    )
    mean = _zeros_if_empty(n, v)
    return AggregatorOutput(
      mean=mean, total_weight=_total_weight(acc), metrics={}
    ), {"center": center}

  return _materialized(
    f"centered_clipping({tau})", finalize, init_state=init_state
  )
