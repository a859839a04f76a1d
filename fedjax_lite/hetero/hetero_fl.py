r"""HeteroFL: clients of different capacities train nested slices of one model.

Diao, Ding and Tarokh, ICLR 2021, "HeteroFL: Computation and Communication
Efficient Federated Learning for Heterogeneous Clients" (arXiv:2010.01264).

Client ``k`` has a capacity level ``r_k`` (e.g. 1, 1/2, 1/4, 1/8) and trains
the leading slice of every hidden layer: ``u_l(r) = round(r W_l)`` of the
global ``W_l`` units (the inputs and the classes are never sliced). With unit
masks ``m_l^k = [i < u_l(r_k)]`` and the params-shaped mask ``M_k`` they
induce (:func:`fedjax_lite.hetero.layers.param_masks`), the client minimises
``F_k(M_k \odot w)`` from ``w_t``; units beyond its width have zero incoming
weights, bias and outgoing weights, so the padded forward pass is exactly the
sliced sub-network, and their gradients are exactly zero. The server averages
every parameter over the clients that hold it:

.. math:: \Delta_t = \frac{\sum_k n_k M_k \odot (w_t - w^k)}
                          {\sum_k n_k M_k}  \quad (0 \text{ where no client
                          holds the parameter})

and applies its optimizer to ``\Delta_t`` (``sgd(1)`` gives
``w_{t+1} = w_t - \Delta_t``, the paper's rule). Inside the engine's one
jitted round, every client sends ``{"d": M_k (w_t - w^k), "held": M_k}`` with
weight ``n_k``; the engine's weighted means give the ratio above as
``mean(d) / mean(held)``, so mixed-capacity rounds are one vmapped
computation over the padded global shapes. The denominator is the held
share ``sum_k n_k M_k / sum_k n_k`` averaged directly: an entry held only by
clients with a tiny share of the round's weight keeps float32's relative
precision (computing it as ``1 - mean(1 - M_k)`` would cancel
catastrophically: relative errors up to 1e-2 at a 3e-6 share). A parameter
leaf that every client of the population holds whole (every leaf at capacity
1; the output bias always) has the held share 1 everywhere: its average is
the weighted mean of ``d`` itself, used as is (no division by a rounded 1).
With every client at capacity 1 the round therefore computes FedAvg's update
and equals FedAvg's round to float32 rounding (different compiled
computations are not promised equal bits).

Not implemented: the paper's static batch norm ("sBN") and the scaler
module; the supported networks (:mod:`fedjax_lite.hetero.layers`) have no
normalisation. Shapes: one client's data ``[steps, batch, ...]``.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lite import checks
from fedjax_lite.algorithms.base import FederatedAlgorithm
from fedjax_lite.algorithms.fed_avg import fed_avg
from fedjax_lite.hetero import layers as L
from fedjax_lite.models.core import Model

LEVELS = (1.0, 0.5, 0.25, 0.125)


def level_units(widths: Sequence[int], levels: Sequence[float]) -> np.ndarray:
  """int ``[num_levels, num_hidden]``: units ``round(r W_l)`` per level
  (halves round up).

  Raises:
    ValueError: if a level is outside ``(0, 1]`` or leaves a layer with no
      unit.
  """
  out = np.zeros((len(levels), len(widths)), np.int32)
  for a, r in enumerate(levels):
    if not 0.0 < float(r) <= 1.0:
      raise ValueError(
        f"capacity levels must lie in (0, 1], got {r!r} in "
        f"levels={tuple(levels)}."
      )
    for l, w in enumerate(widths):
      u = int(np.floor(float(r) * w + 0.5))
      if u < 1:
        raise ValueError(
          f"capacity level {r} keeps round({r} * {w}) = 0 units of hidden "
          f"layer {l} (width {w}); every client needs at least one unit per "
          f"layer. Use levels >= {0.5 / w:.3g} for this model or widen the "
          "layer."
        )
      out[a, l] = u
  return out


def client_levels(
  client_rates: Sequence[float], levels: Sequence[float]
) -> np.ndarray:
  """int ``[num_clients]``: each client's index into ``levels``.

  Raises:
    ValueError: for a rate that is not one of ``levels``.
  """
  rates = np.asarray(client_rates, np.float64).reshape(-1)
  lv = np.asarray(levels, np.float64)
  idx = np.zeros(rates.shape, np.int32)
  for k, r in enumerate(rates):
    hit = np.flatnonzero(np.isclose(lv, r, rtol=0, atol=1e-9))
    if hit.size == 0:
      raise ValueError(
        f"client_rates[{k}] = {r} is not a supported capacity "
        f"level; supported levels are {tuple(levels)}. Pass "
        "levels=(...) to add it."
      )
    idx[k] = hit[0]
  return idx


def _held_whole(
  chain: Sequence[L.Layer], widths: Sequence[int], units: np.ndarray
) -> dict:
  """``{layer: {"kernel": bool, "bias": bool}}``: True for the parameter
  leaves that clients of every level in ``units`` (int ``[levels, hidden]``)
  hold whole, i.e. whose adjacent hidden layers they never slice."""
  full = np.all(np.asarray(units) == np.asarray(widths)[None, :], axis=0)
  out = {}
  for i, layer in enumerate(chain):
    out_whole = i == len(chain) - 1 or bool(full[i])
    in_whole = i == 0 or bool(full[i - 1])
    out[layer.name] = {"kernel": in_whole and out_whole, "bias": out_whole}
  return out


def hetero_fl(
  model: Model,
  client_optimizer: optax.GradientTransformation,
  server_optimizer: optax.GradientTransformation | None = None,
  *,
  client_rates: Sequence[float],
  levels: Sequence[float] = LEVELS,
  name: str = "hetero_fl",
) -> FederatedAlgorithm:
  """HeteroFL over FedAvg/FedOpt (see the module docstring).

  Args:
    model: the global model (its widths are capacity 1); one of the networks
      of :mod:`fedjax_lite.hetero.layers` (MLP or FedAvg CNN).
    client_optimizer: optax optimizer of the local steps.
    server_optimizer: applied to the per-parameter averaged update (default
      ``optax.sgd(1.0)``).
    client_rates: ``[num_clients]`` capacity of every client of the
      population (indexed by ``data.client_id``), each one of ``levels``;
      its length must be the population's (checked when the round is traced
      with the data: ``ValueError`` otherwise).
    levels: the supported capacity levels (fractions of every hidden width).
    name: for reports.

  Returns:
    A :class:`FederatedAlgorithm` with FedAvg's ``ServerState``.
  """
  chain = L.chain_of_model(model, "hetero_fl model")
  widths = L.hidden_widths(chain)
  for r in levels:
    if not 0.0 < float(r) <= 1.0:
      raise ValueError(
        f"capacity levels must lie in (0, 1], got {r!r} in "
        f"levels={tuple(levels)}."
      )
  idx = client_levels(client_rates, levels)
  used = sorted(set(idx.tolist()))
  table = np.ones((len(levels), len(widths)), np.int32)
  # Raises if a level in use leaves a layer with no unit.
  table[used] = level_units(widths, [levels[a] for a in used])
  units = jnp.asarray(table)
  whole = _held_whole(chain, widths, table[used])
  rate_idx = jnp.asarray(idx)
  base = fed_avg(model, client_optimizer, server_optimizer)

  def client_masks(client_id):
    u = units[rate_idx[client_id]]
    return L.param_masks(
      chain, L.prefix_masks(widths, [u[l] for l in range(len(widths))])
    )

  def client_update(server_params, client_state, data, rng):
    # Host side, at trace time: short rates would be clamped by the gather.
    checks.per_client(
      "client_rates",
      int(rate_idx.shape[0]),
      data.num_clients,
      "; pass one capacity level per client of the population",
    )
    masks = client_masks(data.client_id)

    def objective(params, server_params, batch, mask, step_rng):
      del server_params
      return model.batch_loss(
        L.apply_masks(params, masks), batch, mask, step_rng, train=True
      )

    # FedAvg's client update on the masked objective: masked entries get
    # exactly zero gradient, so they stay at w_t.
    out = fed_avg(
      model, client_optimizer, local_objective=objective
    ).client_update(server_params, client_state, data, rng)
    held = jax.tree.map(
      lambda p, m: jnp.broadcast_to(m, p.shape).astype(p.dtype),
      server_params,
      masks,
    )
    return out._replace(
      update={"d": L.apply_masks(out.update, masks), "held": held}
    )

  def server_update(state, aggregate):
    # mean(held) = sum_k n_k M_k / sum_k n_k, averaged directly (no
    # cancellation); d is exactly 0 where no client holds the parameter.
    # Leaves every client holds whole take the weighted mean of d as is
    # (FedAvg's float operations, see the module docstring).
    d, h = aggregate.mean["d"], aggregate.mean["held"]

    def one(held_whole, a, b):
      if held_whole:
        return a
      return jnp.where(b > 0, a / jnp.where(b > 0, b, 1.0), 0.0)

    delta = jax.tree.map(one, whole, d, h)
    return base.server_update(state, aggregate._replace(mean=delta))

  return base._replace(
    client_update=client_update, server_update=server_update, name=name
  )


def sub_model_params(
  params, model: Model, rate: float, levels: Sequence[float] = LEVELS
):
  """The capacity-``rate`` slice of ``params`` as a smaller network's params.

  Slices every hidden layer to its first ``round(rate W_l)`` units (inputs
  of the next layer accordingly): the parameters a HeteroFL client of that
  capacity receives, and the weights of a standalone model of those widths.
  """
  chain = L.chain_of_model(model, "sub_model_params model")
  widths = L.hidden_widths(chain)
  u = level_units(widths, [levels[client_levels([rate], levels)[0]]])[0]
  out = {}
  for i, layer in enumerate(chain):
    k, b = params[layer.name]["kernel"], params[layer.name]["bias"]
    if i > 0:
      view, axis = L.unit_view(k, layer)
      view = jax.lax.slice_in_dim(view, 0, int(u[i - 1]), axis=axis)
      k = view.reshape(-1, view.shape[-1]) if layer.in_repeat > 1 else view
    if i < len(chain) - 1:
      k = k[..., : int(u[i])]
      b = b[: int(u[i])]
    out[layer.name] = {"kernel": k, "bias": b}
  return out


def communication(
  model: Model, rate: float, levels: Sequence[float] = LEVELS
) -> int:
  """Parameters a capacity-``rate`` client receives (and sends) per round."""
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0))
  sub = jax.eval_shape(
    lambda p: sub_model_params(p, model, rate, levels), params
  )
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(sub)))
