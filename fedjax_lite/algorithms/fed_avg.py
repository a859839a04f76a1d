r"""Federated averaging with client and server optax optimizers (FedAvg / FedOpt).

McMahan et al. 2017 (arXiv:1602.05629); server optimizers per Reddi et al.
2021, "Adaptive Federated Optimization" (arXiv:2003.00295).

Each sampled client ``k`` starts from the server weights ``w_t``, runs its
client optimizer on its local objective and returns ``Delta_k = w_t - w^k_{t+1}``
weighted by its example count ``n_k``. The server treats

.. math:: \Delta_t = \sum_k \frac{n_k}{n} (w_t - w^k_{t+1})
          = w_t - \sum_k \frac{n_k}{n} w^k_{t+1}

as a pseudo-gradient for its optimizer. ``server_optimizer=optax.sgd(1.0)``
gives plain FedAvg, ``w_{t+1} = \sum_k (n_k/n) w^k_{t+1}``.

Shapes: one client's data is ``[steps, batch, ...]`` (the engine vmaps clients).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from fedjax_lite.algorithms.base import (
  Aggregate,
  ClientOutput,
  FederatedAlgorithm,
  tree_sub,
)
from fedjax_lite.algorithms.local import local_train, objective_grad_fn
from fedjax_lite.models.core import Model

PyTree = Any
# (params, server_params, batch, mask, rng) -> (loss, stats)
LocalObjective = Callable[..., tuple[jax.Array, dict]]


@flax.struct.dataclass
class ServerState:
  """FedAvg/FedOpt server state: the global params and the server optimizer."""

  params: PyTree
  opt_state: PyTree


def model_objective(model: Model) -> LocalObjective:
  """The plain local objective: the model's masked mean batch loss."""

  def objective(params, server_params, batch, mask, rng):
    del server_params
    return model.batch_loss(params, batch, mask, rng, train=True)

  return objective


def server_opt_update(
  server_optimizer: optax.GradientTransformation,
  state: ServerState,
  pseudo_gradient: PyTree,
) -> ServerState:
  """Applies the server optimizer to a pseudo-gradient."""
  updates, opt_state = server_optimizer.update(
    pseudo_gradient, state.opt_state, state.params
  )
  return state.replace(
    params=optax.apply_updates(state.params, updates), opt_state=opt_state
  )


def fed_avg(
  model: Model,
  client_optimizer: optax.GradientTransformation,
  server_optimizer: optax.GradientTransformation | None = None,
  *,
  local_objective: LocalObjective | None = None,
  name: str = "fed_avg",
  aggregator=None,
) -> FederatedAlgorithm:
  """FedAvg/FedOpt.

  Args:
    model: the model (its masked batch loss is the default local objective).
    client_optimizer: optax optimizer for local steps (fresh state per round).
    server_optimizer: optax optimizer applied to the pseudo-gradient; default
      ``optax.sgd(1.0)`` (plain FedAvg).
    local_objective: ``(params, server_params, batch, mask, rng) -> (loss,
      stats)``; override to change only the local objective (FedProx).
    name: for reports.
    aggregator: how the round reduces the clients' ``Delta_k`` (a
      :class:`fedjax_lite.aggregators.Aggregator`, e.g. a robust or clipped
      one); None is the example-weighted mean above.

  Returns:
    A :class:`FederatedAlgorithm` with ``ServerState(params, opt_state)``.
    Client metrics include ``local_steps``, the steps ``tau_k`` a client
    actually took (FedNova normalises by it).
  """
  if server_optimizer is None:
    server_optimizer = optax.sgd(1.0)
  objective = local_objective or model_objective(model)

  def server_init(params):
    return ServerState(params=params, opt_state=server_optimizer.init(params))

  def client_update(server_params, client_state, data, rng):
    del client_state
    result = local_train(
      objective_grad_fn(objective, server_params),
      client_optimizer,
      server_params,
      data,
      rng,
    )
    delta = tree_sub(server_params, result.params)
    weight = data.num_examples.astype(jnp.float32)
    metrics = dict(
      result.metrics,
      local_steps=(
        result.num_steps.astype(jnp.float32),
        jnp.ones((), jnp.float32),
      ),
    )
    return ClientOutput(update=delta, weight=weight, metrics=metrics)

  def server_update(state: ServerState, aggregate: Aggregate) -> ServerState:
    return server_opt_update(server_optimizer, state, aggregate.mean)

  return FederatedAlgorithm(
    server_init=server_init,
    client_update=client_update,
    server_update=server_update,
    name=name,
    aggregator=aggregator,
    model=model,
  )
