r"""q-FFL via q-FedAvg (Li et al. 2020, "Fair Resource Allocation in Federated
Learning", arXiv:1905.10497), Algorithm 3.

q-FFL minimises ``f_q(w) = sum_k p_k F_k(w)^{q+1} / (q+1)``: larger ``q`` gives
more weight to clients with high loss (``q = 0`` is FedAvg's objective). Each
sampled client ``k`` computes its loss at the server weights ``F_k(w_t)``, runs
local SGD from ``w_t`` (step size ``eta``, ``L = 1/eta``) to ``w^k`` and sends

.. math::
   \Delta w_k = L (w_t - w^k),\qquad
   \Delta_k = F_k^q(w_t)\,\Delta w_k,\qquad
   h_k = q F_k^{q-1}(w_t) \lVert \Delta w_k\rVert^2 + L F_k^q(w_t)

and the server steps ``w_{t+1} = w_t - sum_k Delta_k / sum_k h_k``. As in the
paper's code, ``F_k`` is offset by ``1e-10`` before the powers. The paper
samples clients with probability ``p_k`` (``RoundConfig(sampling="weighted")``)
and sums uniformly over them; ``q = 0`` is then the uniform average of the
client models.
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
from fedjax_lite.algorithms.fed_avg import fed_avg, server_opt_update
from fedjax_lite.algorithms.full_batch import full_batch_loss
from fedjax_lite.models.core import Model

LOSS_OFFSET = 1e-10


def q_fed_avg(
  model: Model,
  client_learning_rate: float,
  *,
  q: float,
  num_epochs: int = 1,
  name: str = "q_fed_avg",
) -> FederatedAlgorithm:
  """q-FedAvg: FedAvg's local SGD with the q-FFL aggregation.

  Args:
    model: the model.
    client_learning_rate: local SGD step size ``eta`` (``L = 1/eta``).
    q: fairness parameter ``q >= 0``.
    num_epochs: the round's ``LocalWork.num_epochs`` (``F_k(w_t)`` on one
      epoch; see :mod:`~fedjax_lite.algorithms.full_batch`).
    name: for reports.
  """
  if not q >= 0:
    raise ValueError(f"q must be >= 0, got {q!r}.")
  lipschitz = 1.0 / hyperparameter(client_learning_rate)
  server_optimizer = optax.sgd(1.0)
  base = fed_avg(model, optax.sgd(client_learning_rate), server_optimizer)

  def client_update(server_params, client_state, data, rng):
    loss, _ = full_batch_loss(model, server_params, data, num_epochs)
    loss = loss + LOSS_OFFSET
    out = base.client_update(server_params, client_state, data, rng)
    dw = jax.tree.map(lambda d: lipschitz * d, out.update)
    fq = loss**q
    h = q * loss ** (q - 1) * optax.tree.norm(dw, squared=True) + lipschitz * fq
    metrics = dict(
      out.metrics, loss_at_server=(loss, jnp.ones((), jnp.float32))
    )
    return out._replace(
      update={"delta": jax.tree.map(lambda d: fq * d, dw), "h": h},
      weight=jnp.ones((), jnp.float32),
      metrics=metrics,
    )

  def server_update(state, aggregate: Aggregate):
    mean = aggregate.mean
    step = jax.tree.map(lambda d: d / mean["h"], mean["delta"])
    return server_opt_update(server_optimizer, state, step)

  return base._replace(
    client_update=client_update, server_update=server_update, name=name
  )
