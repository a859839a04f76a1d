r"""Systems heterogeneity: stragglers as in FedProx (arXiv:1812.06127).

Li et al. 2020, Section 5.2: each round, of the ``m`` sampled clients exactly
``S = round(fraction * m)`` chosen uniformly at random are *stragglers* that
cannot finish the ``E`` local epochs. FedAvg *drops* them (they contribute
nothing; the round averages the others with weights ``n_k``); FedProx *keeps*
their partial work: a straggler runs ``e_k ~ uniform{1, ..., E-1}`` epochs and
is averaged with its usual weight ``n_k``. (The paper's code draws the
``m - S`` non-stragglers; for these counts both are the same.)

:func:`with_stragglers` wraps ANY algorithm, inside the one jitted round:

* the wrapper's server state keeps a round counter and a key; round ``t``'s key
  ``fold_in(key, t)`` is broadcast with the inner algorithm's broadcast;
* every client derives the same plan :func:`straggler_epochs` from that key and
  reads its own entry at ``data.slot`` (its position in the round's sample);
* a straggler's steps beyond epoch ``e_k`` are removed from ``data.mask``
  (steps are laid out epoch-major: epoch ``e`` covers steps
  ``[e * spe, (e+1) * spe)``, ``spe = steps // E``). ``local_train`` skips
  steps without examples exactly as it skips a ``step_mask``-ed step, so the
  inner algorithm needs no change and ``tau_k`` reflects the cut;
* with ``drop=True`` a straggler's weight is 0, its metrics are not counted
  and, for stateful algorithms, its persistent state is left unchanged.

Shapes never change between rounds: every client still runs ``steps`` masked
scan iterations.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from fedjax_lite import checks
from fedjax_lite.algorithms.base import ClientOutput, FederatedAlgorithm

PyTree = Any


@flax.struct.dataclass
class StragglerState:
  """The wrapped server state, plus the round counter and straggler key."""

  inner: PyTree
  round: jax.Array
  rng: jax.Array


def straggler_epochs(
  rng: jax.Array, clients_per_round: int, num_stragglers: int, num_epochs: int
) -> jax.Array:
  """Local epochs of each slot of a round, int32 ``[clients_per_round]``.

  ``num_stragglers`` slots (uniformly at random, without replacement) get
  ``uniform{1, ..., num_epochs - 1}`` epochs, the others ``num_epochs``.
  """
  k_pick, k_epochs = jax.random.split(rng)
  order = jax.random.permutation(k_pick, clients_per_round)
  is_straggler = (
    jnp.zeros((clients_per_round,), bool).at[order[:num_stragglers]].set(True)
  )
  short = jax.random.randint(k_epochs, (clients_per_round,), 1, num_epochs)
  return jnp.where(is_straggler, short, num_epochs).astype(jnp.int32)


def round_key(state: StragglerState) -> jax.Array:
  """The key of the round about to run (what clients receive)."""
  return jax.random.fold_in(state.rng, state.round)


def with_stragglers(
  algorithm: FederatedAlgorithm,
  *,
  fraction: float,
  num_epochs: int,
  clients_per_round: int,
  drop: bool,
  seed: int = 0,
) -> FederatedAlgorithm:
  """``algorithm`` with a fraction of stragglers per round.

  Args:
    algorithm: any algorithm (e.g. ``fed_avg`` or ``fed_prox``).
    fraction: share of each round's clients that straggle, in ``[0, 1]``.
    num_epochs: the ``LocalWork.num_epochs`` ``E`` of the round (``>= 2``).
    clients_per_round: the ``RoundConfig.clients_per_round`` ``m``.
    drop: True drops stragglers (FedAvg in the paper); False keeps their
      ``uniform{1..E-1}`` epochs of work (FedProx).
    seed: seed of the straggler draws (independent of client sampling, so two
      algorithms with the same seeds see the same stragglers).
  """
  if not 0 <= fraction <= 1:
    raise ValueError(f"fraction must be in [0, 1], got {fraction!r}.")
  checks.int_at_least(
    "num_epochs", num_epochs, 2, hint=" (a straggler runs 1..E-1 epochs)"
  )
  checks.positive_int("clients_per_round", clients_per_round)
  num_stragglers = int(round(fraction * clients_per_round))
  inner = algorithm

  def server_init(params):
    return StragglerState(
      inner=inner.server_init(params),
      round=jnp.zeros((), jnp.int32),
      rng=jax.random.PRNGKey(seed),
    )

  def broadcast(state):
    return inner.broadcast(state.inner), round_key(state)

  def client_update(shared, client_state, data, rng):
    inner_shared, key = shared
    steps = data.mask.shape[0]
    if steps % num_epochs:
      raise ValueError(
        f"the client data has {steps} steps, not a multiple of "
        f"num_epochs={num_epochs}; use LocalWork(num_epochs="
        f"{num_epochs}) (epoch layout) with with_stragglers."
      )
    epochs = straggler_epochs(
      key, clients_per_round, num_stragglers, num_epochs
    )[data.slot]
    straggler = epochs < num_epochs
    if not drop:
      keep = jnp.arange(steps) < epochs * (steps // num_epochs)
      data = data.replace(mask=jnp.logical_and(data.mask, keep[:, None]))
    out = inner.client_update(inner_shared, client_state, data, rng)
    metrics = dict(out.metrics)
    metrics["stragglers"] = (
      straggler.astype(jnp.float32),
      jnp.ones((), jnp.float32),
    )
    if not drop:
      return out._replace(metrics=metrics)
    kept = 1.0 - straggler.astype(jnp.float32)
    metrics = {
      k: jax.tree.map(lambda v: v * kept.astype(v.dtype), v)
      if k != "stragglers"
      else v
      for k, v in metrics.items()
    }
    state = out.state
    if client_state is not None and state is not None:
      state = jax.tree.map(
        lambda old, new: jnp.where(straggler, old, new), client_state, state
      )
    return ClientOutput(
      update=out.update,
      weight=jnp.where(straggler, 0.0, out.weight),
      state=state,
      metrics=metrics,
    )

  def server_update(state, aggregate):
    return state.replace(
      inner=inner.server_update(state.inner, aggregate), round=state.round + 1
    )

  def get_params(state):
    return inner.get_params(state.inner)

  suffix = "drop" if drop else "keep"
  return FederatedAlgorithm(
    server_init=server_init,
    client_update=client_update,
    server_update=server_update,
    broadcast=broadcast,
    client_init=inner.client_init,
    get_params=get_params,
    name=f"{inner.name}+stragglers({fraction:g},{suffix})",
    aggregator=inner.aggregator,
    model=inner.model,
  )
