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

from fedjax_lite.algorithms.base import (
  Aggregate,
  FederatedAlgorithm,
  hyperparameter,
)
from fedjax_lite.algorithms.fed_avg import fed_avg
from fedjax_lite.algorithms.fed_prox import prox_objective
from fedjax_lite.models.core import Model


def _is_zero(x) -> bool:
  return not isinstance(x, jax.core.Tracer) and float(x) == 0.0


def a_norm(tau: jax.Array, learning_rate, momentum=0.0, mu=0.0) -> jax.Array:
  """``||a||_1`` after ``tau`` local steps (see the module docstring).

  Closed forms when ``momentum`` or ``mu`` is a Python zero; otherwise the
  linear recursion (any argument may be a traced scalar, e.g. in sweeps).
  """
  tau = jnp.asarray(tau, jnp.float32)
  no_momentum, no_prox = _is_zero(momentum), _is_zero(mu)
  if no_momentum and no_prox:
    return tau
  rho = jnp.asarray(momentum, jnp.float32)
  if no_prox:
    return (tau - rho * (1 - rho**tau) / (1 - rho)) / (1 - rho)
  alpha = jnp.asarray(learning_rate, jnp.float32) * jnp.asarray(mu, jnp.float32)
  if no_momentum:
    return (1 - (1 - alpha) ** tau) / alpha

  def step(_, carry):
    e, m = carry
    m = 1.0 + mu * e + rho * m
    return e - learning_rate * m, m

  zero = jnp.zeros((), jnp.float32)
  e, _ = jax.lax.fori_loop(0, tau.astype(jnp.int32), step, (zero, zero))
  return -e / learning_rate


def fed_nova(
  model: Model,
  client_learning_rate: float,
  server_optimizer: optax.GradientTransformation | None = None,
  *,
  momentum: float = 0.0,
  mu: float = 0.0,
  name: str = "fed_nova",
  aggregator=None,
) -> FederatedAlgorithm:
  """FedNova with a local SGD / momentum / proximal solver.

  FedAvg (with FedProx's objective when ``mu > 0``) whose clients send
  ``{"d": d_i, "a": ||a_i||_1}`` and whose server steps on
  ``tau_eff sum_i p_i d_i``; ``tau_i`` is FedAvg's ``local_steps`` metric.

  Args:
    model: the model.
    client_learning_rate: local step size ``eta`` (may be traced: sweepable).
    server_optimizer: applied to ``tau_eff sum_i p_i d_i``; default
      ``optax.sgd(1.0)`` (the paper's FedNova).
    momentum: local heavy-ball momentum ``rho`` in ``[0, 1)`` (a Python float:
      it chooses the client optimizer).
    mu: FedProx proximal coefficient of the local objective.
    name: for reports.
    aggregator: the round's aggregator (None: example-weighted mean).
  """
  if not 0 <= momentum < 1:
    raise ValueError(f"momentum must be in [0, 1), got {momentum!r}.")
  lr = hyperparameter(client_learning_rate)
  base = fed_avg(
    model,
    optax.sgd(lr, momentum=momentum or None),
    server_optimizer,
    local_objective=prox_objective(model, mu),
    aggregator=aggregator,
  )

  def client_update(server_params, client_state, data, rng):
    out = base.client_update(server_params, client_state, data, rng)
    norm = a_norm(out.metrics["local_steps"][0], lr, momentum, mu)
    inv = 1.0 / jnp.maximum(norm, 1e-12)
    delta = jax.tree.map(lambda d: d * inv, out.update)
    metrics = dict(out.metrics, a_norm=(norm, jnp.ones((), jnp.float32)))
    return out._replace(update={"d": delta, "a": norm}, metrics=metrics)

  def server_update(state, aggregate: Aggregate):
    tau_eff = aggregate.mean["a"]
    pseudo_gradient = jax.tree.map(lambda d: tau_eff * d, aggregate.mean["d"])
    return base.server_update(state, aggregate._replace(mean=pseudo_gradient))

  return base._replace(
    client_update=client_update, server_update=server_update, name=name
  )
