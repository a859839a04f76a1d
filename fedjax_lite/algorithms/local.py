r"""Local training for ONE client: ``lax.scan`` over its masked batches.

Steps whose batch holds no real example (padding of small clients, or steps cut
off by ``step_mask`` for stragglers) leave the parameters and optimizer state
unchanged, so a padded client trains exactly as it would unpadded.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lite.algorithms.base import tree_select
from fedjax_lite.data.batching import ClientData

PyTree = Any
# (params, batch, mask, rng) -> (grads, stats) with stats name -> (sum, count)
GradFn = Callable[[PyTree, dict, jax.Array, jax.Array], tuple[PyTree, dict]]


class LocalResult(NamedTuple):
  """Outcome of local training.

  Attributes:
    params: the client's final parameters ``w^k``.
    opt_state: the client optimizer's final state.
    num_steps: int32, steps actually taken (``tau_k``).
    metrics: name -> ``(sum, count)`` accumulated over the steps, each
      evaluated at the parameters before that step's update.
  """

  params: PyTree
  opt_state: PyTree
  num_steps: jax.Array
  metrics: dict


def local_train(
  grad_fn: GradFn,
  optimizer: optax.GradientTransformation,
  params: PyTree,
  data: ClientData,
  rng: jax.Array,
  *,
  step_mask: jax.Array | None = None,
  opt_state: PyTree | None = None,
) -> LocalResult:
  """Runs ``optimizer`` on ``grad_fn`` over the client's batches.

  Args:
    grad_fn: ``(params, batch, mask, rng) -> (grads, stats)``.
    optimizer: the client optimizer (fresh state each round unless
      ``opt_state`` is given).
    params: starting parameters (usually the server's).
    data: the client's batches ``[steps, batch, ...]`` and mask.
    rng: the client's randomness for this round.
    step_mask: optional bool ``[steps]``; False skips a step (e.g. a straggler
      that runs fewer local epochs).
    opt_state: optional initial optimizer state.

  Returns:
    A :class:`LocalResult`.
  """
  steps = data.num_steps
  if opt_state is None:
    opt_state = optimizer.init(params)
  if step_mask is None:
    step_mask = jnp.ones((steps,), bool)

  def step(carry, inputs):
    params, opt_state, taken, sums = carry
    batch, mask, allowed, i = inputs
    active = jnp.logical_and(jnp.any(mask), allowed)
    grads, stats = grad_fn(params, batch, mask, jax.random.fold_in(rng, i))
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    params = tree_select(active, new_params, params)
    opt_state = tree_select(active, new_opt_state, opt_state)
    act = active.astype(jnp.float32)
    sums = jax.tree.map(lambda s, v: s + act * v, sums, stats)
    return (params, opt_state, taken + active.astype(jnp.int32), sums), None

  # Trace the stats structure once to build zero accumulators.
  first = jax.tree.map(lambda v: v[0], data.batches)
  _, stats_shape = jax.eval_shape(grad_fn, params, first, data.mask[0], rng)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), stats_shape)
  init = (params, opt_state, jnp.zeros((), jnp.int32), zeros)
  xs = (data.batches, data.mask, step_mask, jnp.arange(steps))
  (params, opt_state, taken, sums), _ = jax.lax.scan(step, init, xs)
  return LocalResult(params, opt_state, taken, sums)


def objective_grad_fn(
  objective: Callable[..., tuple[jax.Array, dict]], server_params: PyTree
) -> GradFn:
  """The :data:`GradFn` of a local objective around the server weights.

  ``objective(params, server_params, batch, mask, rng) -> (loss, stats)`` (a
  :data:`~fedjax_lite.algorithms.fed_avg.LocalObjective`) becomes
  ``(params, batch, mask, rng) -> (grad_params objective, stats)`` with
  ``server_params`` fixed: what :func:`local_train` steps on.
  """
  grad = jax.grad(objective, has_aux=True)

  def fn(params, batch, mask, rng):
    return grad(params, server_params, batch, mask, rng)

  return fn
