r"""L2-norm bounding of every client's whole update, fixed or adaptive.

Fixed: each update is scaled to :math:`u_k \min(1, C / \|u_k\|_2)` before it
reaches the inner aggregator (as TFF's ``clipping_factory``).

Adaptive (Andrew et al. 2021, "Differentially Private Learning with Adaptive
Clipping", arXiv:1905.03871, without the noise on the count here): after each
round the clip norm moves geometrically towards the ``target_quantile``
:math:`\gamma` of the update norms,

.. math:: C_{t+1} = C_t \exp\big(-\eta_C (\bar b_t - \gamma)\big),
          \quad \bar b_t = \frac{1}{|S_t|}\sum_{k \in S_t}
          \mathbb{1}[\|u_k\|_2 \le C_t]

so ``C`` grows while more than a fraction :math:`1 - \gamma` of the updates
are clipped. :math:`C_t` lives in the aggregator state (checkpointed with the
engine state). The round's metrics report ``clip_norm`` (the norm used this
round) and ``clipped_fraction`` (:math:`1 - \bar b_t`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_lite.aggregators.base import (
  Aggregator,
  check_positive,
  expand,
  taking_part,
  tree_norm,
  wrapper,
)


def clipped(
  inner: Aggregator,
  clip_norm,
  *,
  adaptive: bool = False,
  target_quantile: float = 0.5,
  learning_rate: float = 0.2,
) -> Aggregator:
  """Bounds each client's update to L2 norm ``clip_norm``, then ``inner``.

  Streaming itself (two counters); memory is ``inner``'s. An ``inner`` that
  depends on the run (``Aggregator.bind``, e.g. a DP aggregator's
  accounting) is bound to the run and the bound one is clipped in turn;
  ``inner.check_output`` checks the round's metrics as before.

  Args:
    inner: the aggregator that receives the clipped updates.
    clip_norm: ``C`` (the initial ``C_0`` if adaptive); > 0.
    adaptive: follow the target quantile of update norms (see the module
      docstring).
    target_quantile: ``gamma`` in [0, 1] (adaptive only).
    learning_rate: ``eta_C`` >= 0 of the geometric update (adaptive only).
  """
  if not isinstance(inner, Aggregator):
    raise TypeError(
      f"clipped: inner must be an Aggregator, got {type(inner).__name__}."
    )
  clip_norm = check_positive(clip_norm, "clip_norm", "clipped")
  if adaptive:
    gamma = check_positive(
      target_quantile, "target_quantile", "clipped", allow_zero=True
    )
    if not isinstance(gamma, jax.Array) and gamma > 1:
      raise ValueError(
        f"clipped: target_quantile must be in [0, 1], got {target_quantile!r}."
      )
    eta = check_positive(
      learning_rate, "learning_rate", "clipped", allow_zero=True
    )

  @wrapper
  def wrap(inner: Aggregator) -> Aggregator:
    def init_state(update_spec):
      state = {"inner": inner.init_state(update_spec)}
      if adaptive:
        state["clip_norm"] = jnp.asarray(clip_norm, jnp.float32)
      return state

    def current(state):
      return (
        state["clip_norm"] if adaptive else jnp.asarray(clip_norm, jnp.float32)
      )

    def init(state, update_spec, num_slots):
      return {
        "inner": inner.init(state["inner"], update_spec, num_slots),
        "clipped": jnp.zeros((), jnp.float32),
        "count": jnp.zeros((), jnp.float32),
      }

    def add(state, acc, updates, weights, valid, slots):
      c = current(state)
      norms = jax.vmap(tree_norm)(updates)  # [B]
      scale = jnp.minimum(1.0, c / jnp.maximum(norms, 1e-30))
      bounded = jax.tree.map(
        lambda u: u * expand(scale, u.ndim).astype(u.dtype), updates
      )
      part = taking_part(weights, valid)
      was_clipped = part & (norms > c)
      return {
        "inner": inner.add(
          state["inner"], acc["inner"], bounded, weights, valid, slots
        ),
        "clipped": acc["clipped"] + jnp.sum(was_clipped.astype(jnp.float32)),
        "count": acc["count"] + jnp.sum(part.astype(jnp.float32)),
      }

    def merge(accs):
      return {
        "inner": inner.merge(accs["inner"]),
        "clipped": jnp.sum(accs["clipped"], axis=0),
        "count": jnp.sum(accs["count"], axis=0),
      }

    def finalize(state, acc, rng):
      out, inner_state = inner.finalize(state["inner"], acc["inner"], rng)
      c = current(state)
      n = acc["count"]
      frac = jnp.where(n > 0, acc["clipped"] / jnp.where(n > 0, n, 1.0), 0.0)
      new_state = {"inner": inner_state}
      if adaptive:
        # b = unclipped fraction; no clients: C stays.
        b = 1.0 - frac
        new_state["clip_norm"] = jnp.where(
          n > 0, c * jnp.exp(-eta * (b - gamma)), c
        )
      metrics = dict(out.metrics)
      metrics["clip_norm"] = c
      metrics["clipped_fraction"] = frac
      return out._replace(metrics=metrics), new_state

    # Every function wraps the inner one's; ``wrapper`` keeps the inner's
    # ``materialized``, ``active_slots`` and ``check_output``, and binds a
    # run-dependent inner aggregator (e.g. DP accounting) to the run and
    # clips the bound one again.
    label = f"clipped({inner.name})"
    return Aggregator(init_state, init, add, merge, finalize, name=label)

  return wrap(inner)
