r"""FedNova: normalized averaging (Wang et al. 2020, arXiv:2007.07481).

A client's local change is a combination of its ``tau_i`` stochastic gradients,
``w_t - w^i = eta sum_s a_{i,s} g_{i,s}``. Clients that take more steps (bigger
datasets, more epochs) or use momentum move further; FedAvg's average then
optimises a skewed objective. FedNova averages *normalized* updates and
rescales by an effective number of steps:

.. math::
   d_i = \frac{w_t - w^i}{\lVert a_i\rVert_1},\qquad
   \tau_{\mathrm{eff}} = \sum_i p_i \lVert a_i\rVert_1,\qquad
   w_{t+1} = w_t - \tau_{\mathrm{eff}} \sum_i p_i d_i

with ``p_i = n_i / sum_{j in S} n_j``. ``||a_i||_1`` for the local solvers of
the paper (``tau`` steps actually taken, learning rate ``eta``):

* SGD: ``tau``;
* heavy-ball momentum ``rho`` (``optax.sgd(eta, momentum=rho)``):
  ``(tau - rho (1 - rho^tau) / (1 - rho)) / (1 - rho)``;
* proximal SGD (FedProx, ``mu``), ``alpha = eta mu``:
  ``(1 - (1 - alpha)^tau) / alpha``;
* momentum and proximal together: the sum of the coefficients of the linear
  recursion ``m <- g + mu e + rho m``, ``e <- e - eta m`` driven by ``g = 1``,
  i.e. ``-e_tau / eta`` (the three closed forms are its special cases).

Stragglers (:mod:`~fedjax_lite.algorithms.stragglers`) change ``tau_i`` per
client; the normalization accounts for it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_lite.algorithms.base import (Aggregate, ClientOutput,
                                         FederatedAlgorithm, tree_sub)
from fedjax_lite.algorithms.fed_avg import ServerState, server_opt_update
from fedjax_lite.algorithms.fed_prox import prox_objective
from fedjax_lite.algorithms.local import local_train
from fedjax_lite.models.core import Model


def a_norm(tau: jax.Array, learning_rate: float, momentum: float = 0.0,
           mu: float = 0.0) -> jax.Array:
  """``||a||_1`` after ``tau`` local steps (see the module docstring)."""
  tau = jnp.asarray(tau, jnp.float32)
  rho, alpha = float(momentum), float(learning_rate) * float(mu)
  if rho == 0 and alpha == 0:
    return tau
  if alpha == 0:
    return (tau - rho * (1 - rho**tau) / (1 - rho)) / (1 - rho)
  if rho == 0:
    return (1 - (1 - alpha)**tau) / alpha

  def step(_, carry):
    e, m = carry
    m = 1.0 + mu * e + rho * m
    return e - learning_rate * m, m

  zero = jnp.zeros((), jnp.float32)
  e, _ = jax.lax.fori_loop(0, tau.astype(jnp.int32), step, (zero, zero))
  return -e / learning_rate


def fed_nova(model: Model, client_learning_rate: float,
             server_optimizer: optax.GradientTransformation | None = None, *,
             momentum: float = 0.0, mu: float = 0.0,
             name: str = "fed_nova") -> FederatedAlgorithm:
  """FedNova with a local SGD / momentum / proximal solver.

  Args:
    model: the model.
    client_learning_rate: local step size ``eta``.
    server_optimizer: applied to ``tau_eff sum_i p_i d_i``; default
      ``optax.sgd(1.0)`` (the paper's FedNova).
    momentum: local heavy-ball momentum ``rho`` in ``[0, 1)``.
    mu: FedProx proximal coefficient of the local objective.
    name: for reports.
  """
  if not 0 <= momentum < 1:
    raise ValueError(f"momentum must be in [0, 1), got {momentum!r}.")
  lr = float(client_learning_rate)
  client_optimizer = optax.sgd(lr, momentum=momentum or None)
  objective = prox_objective(model, mu)
  server_optimizer = server_optimizer or optax.sgd(1.0)

  def server_init(params):
    return ServerState(params=params, opt_state=server_optimizer.init(params))

  def client_update(server_params, client_state, data, rng):
    del client_state
    def grad_fn(params, batch, mask, step_rng):
      return jax.grad(objective, has_aux=True)(params, server_params, batch,
                                               mask, step_rng)
    result = local_train(grad_fn, client_optimizer, server_params, data, rng)
    norm = a_norm(result.num_steps, lr, momentum, mu)
    inv = 1.0 / jnp.maximum(norm, 1e-12)
    delta = jax.tree.map(lambda d: d * inv, tree_sub(server_params,
                                                      result.params))
    metrics = dict(result.metrics, a_norm=(norm, jnp.ones((), jnp.float32)))
    return ClientOutput(update={"d": delta, "a": norm},
                        weight=data.num_examples.astype(jnp.float32),
                        metrics=metrics)

  def server_update(state, aggregate: Aggregate):
    tau_eff = aggregate.mean["a"]
    pseudo_gradient = jax.tree.map(lambda d: tau_eff * d, aggregate.mean["d"])
    return server_opt_update(server_optimizer, state, pseudo_gradient)

  return FederatedAlgorithm(server_init=server_init,
                            client_update=client_update,
                            server_update=server_update, name=name)
