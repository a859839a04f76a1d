r"""What a federated algorithm is: a small tuple of pure functions.

The engine calls them inside ONE jitted round::

    broadcast = algorithm.broadcast(server_state)
    for every sampled client k (vmapped in blocks, never a Python loop):
        out_k = algorithm.client_update(broadcast, client_state_k, data_k, rng_k)
    aggregate = (sum_k out_k.weight * out_k.update) / (sum_k out_k.weight)
    server_state = algorithm.server_update(server_state, Aggregate(...))

``client_update`` is written for ONE client: no client axis anywhere.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any


class ClientOutput(NamedTuple):
  """What one client sends back.

  Attributes:
    update: pytree averaged over clients with ``weight`` (e.g. ``w_t - w^k``).
    weight: scalar aggregation weight (e.g. ``n_k``).
    state: the client's new persistent state (stateful algorithms), else None.
    metrics: name -> ``(sum, count)``; the engine reports
      ``sum over clients of sums / sum of counts``.
  """

  update: PyTree
  weight: jax.Array
  state: PyTree = None
  metrics: dict = {}


class Aggregate(NamedTuple):
  """What the server receives after a round's clients are reduced.

  Attributes:
    mean: ``sum_k weight_k update_k / sum_k weight_k`` (zeros if no weight).
    total_weight: ``sum_k weight_k``.
    num_clients: number of clients that took part (float scalar).
    metrics: name -> ``(sum, count)`` summed over clients.
  """

  mean: PyTree
  total_weight: jax.Array
  num_clients: jax.Array
  metrics: dict


def hyperparameter(value) -> float | jax.Array:
  """A scalar hyperparameter: a Python float, or a traced float32 scalar.

  Algorithms built inside a vectorized sweep receive traced hyperparameters
  (one value per setting); ``float(value)`` would fail there.
  """
  if isinstance(value, jax.core.Tracer):
    return jnp.asarray(value, jnp.float32)
  return float(value)


def _params_of(server_state):
  return server_state.params


class FederatedAlgorithm(NamedTuple):
  """A federated algorithm as pure functions (see the module docstring).

  Attributes:
    server_init: ``params -> server_state`` (a pytree holding the params).
    client_update: ``(broadcast, client_state, client_data, rng) ->
      ClientOutput`` for ONE client.
    server_update: ``(server_state, Aggregate) -> server_state``.
    broadcast: ``server_state -> what clients receive`` (default the params).
    client_init: ``params -> one client's initial state`` for algorithms that
      keep state on every client across rounds (SCAFFOLD), else None.
    get_params: ``server_state -> params`` (default ``server_state.params``).
    name: for reports.
    aggregator: how the round reduces the clients' updates (a
      :class:`fedjax_lite.aggregators.Aggregator`); None is the weighted mean
      ``sum_k w_k u_k / sum_k w_k``.
    model: the :class:`fedjax_lite.models.Model` the clients train, when
      there is one; :meth:`fedjax_lite.Engine.put_data` checks the data's
      features and labels against it. None: unknown (nothing checked).
  """

  server_init: Callable[[PyTree], PyTree]
  client_update: Callable[..., ClientOutput]
  server_update: Callable[[PyTree, Aggregate], PyTree]
  broadcast: Callable[[PyTree], PyTree] = _params_of
  client_init: Callable[[PyTree], PyTree] | None = None
  get_params: Callable[[PyTree], PyTree] = _params_of
  name: str = "algorithm"
  aggregator: Any = None
  model: Any = None


def tree_sub(a: PyTree, b: PyTree) -> PyTree:
  return jax.tree.map(jnp.subtract, a, b)


def tree_zeros_like(a: PyTree) -> PyTree:
  return jax.tree.map(jnp.zeros_like, a)


def tree_select(pred: jax.Array, a: PyTree, b: PyTree) -> PyTree:
  """``a`` where the scalar ``pred`` holds, else ``b`` (leaf by leaf)."""
  return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)
