r"""SCAFFOLD (Karimireddy et al. 2020, arXiv:1910.06378), control variates
option II.

Server state: weights ``x`` and control variate ``c``; every client ``i`` of the
population keeps its control variate ``c_i`` across rounds (the engine stores
all ``N`` of them on device; a client that is not sampled keeps its ``c_i``).
A sampled client starts at ``y = x`` and takes ``K_i`` SGD steps

.. math:: y \leftarrow y - \eta_l\,(g_i(y) - c_i + c)

then ``c_i^+ = c_i - c + (x - y) / (K_i \eta_l)`` (option II) and sends
``Delta y_i = x - y`` and ``Delta c_i = c_i^+ - c_i``. The server, with the
sampled set ``S`` and population size ``N``:

.. math::
   x \leftarrow x - \eta_g \tfrac{1}{|S|}\textstyle\sum_{i\in S}\Delta y_i,
   \qquad c \leftarrow c + \tfrac{1}{N}\textstyle\sum_{i\in S}\Delta c_i

(the paper's uniform averages; ``x`` is updated by any server optimizer on the
mean ``Delta y``, ``optax.sgd(eta_g)`` by default). ``K_i`` counts the steps
actually taken (padding and straggler cuts excluded).

Shapes: ``c`` and each ``c_i`` are shaped like the params; the engine holds
``[num_clients, ...]`` client states.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from fedjax_lite import checks
from fedjax_lite.algorithms.base import (
  Aggregate,
  ClientOutput,
  hyperparameter,
  FederatedAlgorithm,
  tree_sub,
  tree_zeros_like,
)
from fedjax_lite.algorithms.fed_avg import server_opt_update
from fedjax_lite.algorithms.local import local_train
from fedjax_lite.models.core import Model

PyTree = Any


@flax.struct.dataclass
class ScaffoldState:
  """Server weights, server optimizer state and control variate ``c``."""

  params: PyTree
  opt_state: PyTree
  control: PyTree


def scaffold(
  model: Model,
  client_learning_rate: float,
  server_optimizer: optax.GradientTransformation | None = None,
  *,
  num_clients: int,
  name: str = "scaffold",
  aggregator=None,
) -> FederatedAlgorithm:
  """SCAFFOLD with option-II control variates and local SGD.

  Args:
    model: the model.
    client_learning_rate: local SGD step size ``eta_l``.
    server_optimizer: applied to the mean ``x - y``; default
      ``optax.sgd(1.0)`` (``eta_g = 1``).
    num_clients: population size ``N`` (the ``num_clients`` given to
      ``Engine.init``).
    name: for reports.
    aggregator: the round's aggregator of ``{"y": Delta y_i, "c": Delta c_i}``
      (None: the uniform mean, all weights are 1).
  """
  checks.positive_int("num_clients", num_clients, hint=" (the population size)")
  lr = hyperparameter(client_learning_rate)
  client_optimizer = optax.sgd(lr)
  server_optimizer = server_optimizer or optax.sgd(1.0)

  def server_init(params):
    return ScaffoldState(
      params=params,
      opt_state=server_optimizer.init(params),
      control=tree_zeros_like(params),
    )

  def broadcast(state):
    return state.params, state.control

  def client_init(params):
    return tree_zeros_like(params)

  def client_update(shared, client_control, data, rng):
    x, c = shared
    correction = tree_sub(c, client_control)

    def grad_fn(params, batch, mask, step_rng):
      grads, stats = jax.grad(model.batch_loss, has_aux=True)(
        params, batch, mask, step_rng
      )
      return jax.tree.map(jnp.add, grads, correction), stats

    result = local_train(grad_fn, client_optimizer, x, data, rng)
    delta_y = tree_sub(x, result.params)
    scale = 1.0 / (jnp.maximum(result.num_steps, 1).astype(jnp.float32) * lr)
    new_control = jax.tree.map(
      lambda ci, ci0, d: ci - ci0 + scale * d, client_control, c, delta_y
    )
    delta_c = tree_sub(new_control, client_control)
    return ClientOutput(
      update={"y": delta_y, "c": delta_c},
      weight=jnp.ones((), jnp.float32),
      state=new_control,
      metrics=result.metrics,
    )

  def server_update(state, aggregate: Aggregate):
    # Weights are 1, so total_weight = |S| (clients that reported).
    share = aggregate.total_weight / num_clients
    control = jax.tree.map(
      lambda c, d: c + share * d, state.control, aggregate.mean["c"]
    )
    state = server_opt_update(server_optimizer, state, aggregate.mean["y"])
    return state.replace(control=control)

  return FederatedAlgorithm(
    server_init=server_init,
    client_update=client_update,
    server_update=server_update,
    broadcast=broadcast,
    client_init=client_init,
    name=name,
    model=model,
    aggregator=aggregator,
  )
