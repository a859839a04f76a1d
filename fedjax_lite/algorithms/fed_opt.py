r"""FedOpt: adaptive and momentum server optimizers on the pseudo-gradient.

Reddi et al. 2021, "Adaptive Federated Optimization" (arXiv:2003.00295),
Algorithm 2. With the round's pseudo-gradient
``Delta_t = sum_k p_k (w_t - w^k)`` (the sign convention of
:func:`~fedjax_lite.algorithms.fed_avg`, the negative of the paper's
``Delta``):

.. math::
   m_t &= \beta_1 m_{t-1} + (1-\beta_1)\Delta_t \\
   v_t &= v_{t-1} + \Delta_t^2 &\text{(FedAdagrad)} \\
   v_t &= v_{t-1} - (1-\beta_2)\Delta_t^2\,\mathrm{sign}(v_{t-1}-\Delta_t^2)
        &\text{(FedYogi)} \\
   v_t &= \beta_2 v_{t-1} + (1-\beta_2)\Delta_t^2 &\text{(FedAdam)} \\
   w_{t+1} &= w_t - \eta\, m_t / (\sqrt{v_t} + \tau)

with ``v_{-1} = tau^2`` (the paper requires ``v_{-1} >= tau^2``) and no bias
correction (the paper's rule; optax's ``adam``/``yogi``/``adagrad`` add bias
correction or other accumulator defaults: pass those to ``fed_avg`` directly if
you want them). ``tau`` is the *adaptivity*: large ``tau`` makes the step
``eta m_t / tau`` (server momentum SGD), small ``tau`` makes it sign-like.

Defaults follow the paper's experiments: ``b1 = 0.9``, ``b2 = 0.99``. The
paper tunes the server learning rate ``eta`` and ``tau`` per task on
logarithmic grids, so ``server_learning_rate`` has no default and ``tau``
defaults to ``1e-3`` (tune it with ``eta``). Algorithm 2 uses the first moment
for all three variants; ``b1 = 0`` gives momentum-free Adagrad.

FedAvgM (Hsu et al. 2019, arXiv:1909.06335) is server SGD with heavy-ball
momentum ``beta`` (``optax.sgd(eta, momentum=beta)``): ``v_t = beta v_{t-1} +
Delta_t``, ``w_{t+1} = w_t - eta v_t``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lite.algorithms.base import FederatedAlgorithm
from fedjax_lite.algorithms.fed_avg import fed_avg
from fedjax_lite.models.core import Model

_RULES = ("adagrad", "adam", "yogi")


class FedOptState(NamedTuple):
  m: optax.Updates
  v: optax.Updates


def scale_by_fedopt(
  rule: str, b1: float = 0.9, b2: float = 0.99, tau: float = 1e-3
) -> optax.GradientTransformation:
  """``Delta -> m_t / (sqrt(v_t) + tau)`` for Reddi et al.'s ``rule``.

  Args:
    rule: ``"adagrad"``, ``"adam"`` or ``"yogi"``.
    b1: first-moment decay.
    b2: second-moment decay (unused by adagrad).
    tau: adaptivity; also ``sqrt(v_{-1})``.
  """
  if rule not in _RULES:
    raise ValueError(f"rule must be one of {_RULES}, got {rule!r}.")
  if not (0 <= b1 < 1 and 0 <= b2 < 1 and tau > 0):
    raise ValueError(
      f"need 0 <= b1, b2 < 1 and tau > 0; got b1={b1}, b2={b2}, tau={tau}."
    )

  def init(params):
    return FedOptState(
      m=jax.tree.map(jnp.zeros_like, params),
      v=jax.tree.map(lambda p: jnp.full_like(p, tau**2), params),
    )

  def second_moment(v, d):
    d2 = d * d
    if rule == "adagrad":
      return v + d2
    if rule == "adam":
      return b2 * v + (1 - b2) * d2
    return v - (1 - b2) * d2 * jnp.sign(v - d2)

  def update(updates, state, params=None):
    del params
    m = jax.tree.map(lambda m, d: b1 * m + (1 - b1) * d, state.m, updates)
    v = jax.tree.map(second_moment, state.v, updates)
    out = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + tau), m, v)
    return out, FedOptState(m=m, v=v)

  return optax.GradientTransformation(init, update)


def fedopt_server_optimizer(
  rule: str,
  learning_rate: float,
  *,
  b1: float = 0.9,
  b2: float = 0.99,
  tau: float = 1e-3,
) -> optax.GradientTransformation:
  """The server optimizer of FedAdagrad / FedAdam / FedYogi."""
  return optax.chain(
    scale_by_fedopt(rule, b1, b2, tau), optax.scale(-learning_rate)
  )


def _fed_opt(rule):
  def factory(
    model: Model,
    client_optimizer: optax.GradientTransformation,
    server_learning_rate: float,
    *,
    b1: float = 0.9,
    b2: float = 0.99,
    tau: float = 1e-3,
    aggregator=None,
  ) -> FederatedAlgorithm:
    server = fedopt_server_optimizer(
      rule, server_learning_rate, b1=b1, b2=b2, tau=tau
    )
    return fed_avg(
      model, client_optimizer, server, name=f"fed_{rule}", aggregator=aggregator
    )

  factory.__name__ = f"fed_{rule}"
  factory.__doc__ = (
    f"Fed{rule.capitalize()} (Reddi et al. 2021, "
    "arXiv:2003.00295): FedAvg with the server rule "
    f"``{rule}`` (see the module docstring)."
  )
  return factory


fed_adagrad = _fed_opt("adagrad")
fed_adam = _fed_opt("adam")
fed_yogi = _fed_opt("yogi")


def fed_avg_m(
  model: Model,
  client_optimizer: optax.GradientTransformation,
  server_learning_rate: float = 1.0,
  *,
  momentum: float = 0.9,
  aggregator=None,
) -> FederatedAlgorithm:
  """FedAvgM: FedAvg with server heavy-ball momentum (arXiv:1909.06335)."""
  return fed_avg(
    model,
    client_optimizer,
    optax.sgd(server_learning_rate, momentum=momentum),
    name="fed_avg_m",
    aggregator=aggregator,
  )
