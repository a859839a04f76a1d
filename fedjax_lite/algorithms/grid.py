r"""Grid points of one run as ONE federated algorithm (vectorized sweeps).

A hyperparameter grid over one algorithm (e.g. four client learning rates)
becomes a single :class:`FederatedAlgorithm` whose server and client states
carry a leading grid axis: each sampled client trains every point's model
(``jax.vmap`` over the points) on its data gathered once, so the points share
sampling, gathering and the data operand of their matmuls. Each point keeps
its own example weights: a client reports ``{"wu": w_g u_g, "w": w_g}`` with an
engine weight of 1 and the server divides,

.. math:: \bar u_g = \frac{\sum_k w_{kg} u_{kg}}{\sum_k w_{kg}}

which is the weighted mean each point would get on its own.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from fedjax_lite.algorithms.base import (
  Aggregate,
  ClientOutput,
  FederatedAlgorithm,
)

GRID_WEIGHT = "_grid_mean_weight"


def grid_algorithm(
  make_algorithm, h: Mapping[str, jax.Array], num_points: int
) -> FederatedAlgorithm:
  """``num_points`` grid points of one run as ONE federated algorithm.

  Server and client states carry a leading grid axis. Every client trains
  all grid points' models (``jax.vmap`` over the points) on its data
  gathered once, so the points share sampling and gathering, and matmuls of
  the points share their data operand. Each point is aggregated with its own
  weights: a client reports ``weight_g * update_g`` and ``weight_g`` with an
  engine weight of 1, and the server divides the sums.

  Args:
    make_algorithm: ``{name: scalar} -> FederatedAlgorithm``.
    h: ``{name: [num_points] values}`` (empty: identical points).
    num_points: the number of grid points.
  """
  h = dict(h)

  def over_points(fn, *args, in_axes=0):
    return jax.vmap(
      fn, in_axes=(0,) + (in_axes,) * len(args), axis_size=num_points
    )(h, *args)

  def each(method):  # (hg, *args) -> make_algorithm(hg).<method>(*args)
    return lambda hg, *a: getattr(make_algorithm(hg), method)(*a)

  def broadcast(server):
    return over_points(each("broadcast"), server)

  def client_update(bcast, cstate, data, rng):
    def one(hg, b, cs):
      out = make_algorithm(hg).client_update(b, cs, data, rng)
      w = jnp.asarray(out.weight, jnp.float32)
      wu = jax.tree.map(lambda u: u * w.astype(u.dtype), out.update)
      metrics = dict(out.metrics)
      metrics[GRID_WEIGHT] = (w, jnp.ones((), jnp.float32))
      return wu, w, out.state, metrics

    wu, w, state, metrics = jax.vmap(
      one, in_axes=(0, 0, None if cstate is None else 0), axis_size=num_points
    )(h, bcast, cstate)
    return ClientOutput(
      update={"wu": wu, "w": w},
      weight=jnp.ones((), jnp.float32),
      state=state,
      metrics=metrics,
    )

  def server_update(server, agg):
    # agg.mean = {"wu": mean_k w_kg u_kg, "w": mean_k w_kg} over clients.
    def one(hg, s, wu, w, metrics):
      safe = jnp.where(w > 0, w, 1.0)
      mean = jax.tree.map(
        lambda a: jnp.where(
          w > 0, a / safe.astype(a.dtype), jnp.zeros((), a.dtype)
        ),
        wu,
      )
      metrics = {k: v for k, v in metrics.items() if k != GRID_WEIGHT}
      g = Aggregate(
        mean=mean,
        total_weight=w * agg.total_weight,
        num_clients=agg.num_clients,
        metrics=metrics,
      )
      return make_algorithm(hg).server_update(s, g)

    return jax.vmap(one, axis_size=num_points)(
      h, server, agg.mean["wu"], agg.mean["w"], agg.metrics
    )

  probe = make_algorithm({n: v[0] for n, v in h.items()})
  if probe.aggregator is not None and num_points > 1:
    agg = getattr(probe.aggregator, "name", probe.aggregator)
    raise ValueError(
      f"{probe.name} uses the aggregator {agg!r}; several "
      "grid points of one run share the round's reduction, which is only "
      "exact for the default weighted mean. Sweep seeds only, or run each "
      "grid point separately and overlay them with `compare`."
    )
  client_init = (
    None
    if probe.client_init is None
    else (lambda p: over_points(each("client_init"), p, in_axes=None))
  )
  return FederatedAlgorithm(
    server_init=lambda p: over_points(each("server_init"), p, in_axes=None),
    client_update=client_update,
    server_update=server_update,
    broadcast=broadcast,
    client_init=client_init,
    get_params=lambda s: over_points(each("get_params"), s),
    name=f"{probe.name} x{num_points}",
    model=probe.model,
  )
