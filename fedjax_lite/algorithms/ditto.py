r"""Ditto: personalization through global regularization (Li et al. 2021,
"Ditto: Fair and Robust Federated Learning Through Personalization",
arXiv:2012.04221), Algorithm 1.

Every client ``k`` of the population keeps a personal model ``v_k`` across
rounds (engine client state, ``v_k = w_0`` initially). A sampled client

1. trains the global model exactly as FedAvg does (``w^k`` from ``w_t``,
   sends ``w_t - w^k``, weighted by ``n_k``);
2. trains its personal model on the FedProx objective centred at ``w_t``:

.. math:: v_k \leftarrow v_k - \eta_p\,(\nabla F_k(v_k) + \lambda (v_k - w_t))

for the round's local steps. ``lambda`` interpolates between local training
(``lambda = 0``) and the global model (``lambda -> inf``). Clients not sampled
keep ``v_k``. The global model follows FedAvg/FedOpt exactly.

Ditto composes from existing pieces: its global half is ``fed_avg``'s client
update and its personal half is FedProx's proximal objective, with the
engine's per-client state holding ``v_k``. The extra cost (a second local
training per client) is the method's own.
"""

from __future__ import annotations

import jax
import optax

from fedjax_lite.algorithms.base import FederatedAlgorithm
from fedjax_lite.algorithms.fed_avg import fed_avg
from fedjax_lite.algorithms.fed_prox import prox_objective
from fedjax_lite.algorithms.local import local_train, objective_grad_fn
from fedjax_lite.models.core import Model


def ditto(
  model: Model,
  client_optimizer: optax.GradientTransformation,
  server_optimizer: optax.GradientTransformation | None = None,
  *,
  lam: float,
  personal_optimizer: optax.GradientTransformation | None = None,
  name: str = "ditto",
  aggregator=None,
) -> FederatedAlgorithm:
  """Ditto over FedAvg/FedOpt.

  Args:
    model: the model.
    client_optimizer: local optimizer of the global model's update.
    server_optimizer: FedOpt server optimizer (default ``optax.sgd(1.0)``).
    lam: the personal models' regularization ``lambda >= 0``.
    personal_optimizer: optimizer of the personal models (default
      ``client_optimizer``; the paper uses SGD).
    name: for reports.
    aggregator: the round's aggregator of the global updates (None:
      example-weighted mean).

  The engine's ``state.clients`` holds the personal models (leading axis
  ``num_clients``); :func:`personal_params` picks one client's.
  """
  base = fed_avg(
    model, client_optimizer, server_optimizer, aggregator=aggregator
  )
  personal = personal_optimizer or client_optimizer
  objective = prox_objective(model, lam)

  def client_init(params):
    return params

  def client_update(server_params, personal_params, data, rng):
    k_global, k_personal = jax.random.split(rng)
    out = base.client_update(server_params, None, data, k_global)
    result = local_train(
      objective_grad_fn(objective, server_params),
      personal,
      personal_params,
      data,
      k_personal,
    )
    metrics = dict(out.metrics)
    metrics.update({f"personal_{k}": v for k, v in result.metrics.items()})
    return out._replace(state=result.params, metrics=metrics)

  return base._replace(
    client_init=client_init, client_update=client_update, name=name
  )


def personal_params(engine_state, client: int):
  """Client ``client``'s personal model (engine state of :func:`ditto`)."""
  return jax.tree.map(lambda a: a[client], engine_state.clients)
