r"""FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks",
arXiv:1812.06127).

FedAvg whose clients minimise a proximal local objective around the server
weights ``w_t``:

.. math:: h_k(w; w_t) = F_k(w) + \frac{\mu}{2} \lVert w - w_t \rVert^2

With SGD as the client optimizer a local step is
``w <- w - lr * (grad F_k(w; batch) + mu * (w - w_t))`` (the paper's
perturbed gradient descent). Only the local objective differs from
:func:`~fedjax_lite.algorithms.fed_avg`, so that is all this module defines.
The paper's systems heterogeneity (stragglers that run fewer local epochs) is
:func:`~fedjax_lite.algorithms.stragglers.with_stragglers`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_lite.algorithms.base import FederatedAlgorithm
from fedjax_lite.algorithms.fed_avg import (
  LocalObjective,
  fed_avg,
  model_objective,
)
from fedjax_lite.models.core import Model


def squared_distance(a, b) -> jax.Array:
  """``||a - b||^2`` summed over every leaf of two same-shaped pytrees."""
  return sum(
    jnp.sum(jnp.square(x - y))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def prox_objective(
  model: Model, mu: float, base: LocalObjective | None = None
) -> LocalObjective:
  """``base(w) + mu/2 ||w - w_t||^2`` as a local objective.

  Args:
    model: the model (its masked mean batch loss is the default ``base``).
    mu: proximal coefficient (``mu = 0`` is FedAvg's objective).
    base: the objective to regularise (default the model's loss).
  """
  if not mu >= 0:
    raise ValueError(f"mu must be >= 0, got {mu!r}.")
  base = base or model_objective(model)

  def objective(params, server_params, batch, mask, rng):
    loss, stats = base(params, server_params, batch, mask, rng)
    if mu == 0:
      return loss, stats
    return loss + 0.5 * mu * squared_distance(params, server_params), stats

  return objective


def fed_prox(
  model: Model,
  client_optimizer: optax.GradientTransformation,
  server_optimizer: optax.GradientTransformation | None = None,
  *,
  mu: float,
  name: str = "fed_prox",
  **fed_avg_options,
) -> FederatedAlgorithm:
  """FedProx: :func:`fed_avg` with the proximal local objective.

  Args:
    model: the model.
    client_optimizer: local optimizer (``optax.sgd(lr)`` is the paper's).
    server_optimizer: applied to the pseudo-gradient; default
      ``optax.sgd(1.0)`` (the paper's example-weighted average).
    mu: proximal coefficient ``mu >= 0``.
    name: for reports.
    **fed_avg_options: the other keywords of :func:`fed_avg`
      (``aggregator``).
  """
  return fed_avg(
    model,
    client_optimizer,
    server_optimizer,
    local_objective=prox_objective(model, mu),
    name=name,
    **fed_avg_options,
  )
