r"""Mime and MimeLite (Karimireddy et al. 2020, "Mime: Mimicking Centralized
Stochastic Algorithms in Federated Learning", arXiv:2008.03606), Algorithm 1.

A base optimizer ``B`` (an optax optimizer, e.g. ``optax.sgd(lr, momentum=b)``)
is split into its update ``U(g, s)`` (the step for gradient ``g`` with state
``s``) and its state update ``V(g, s)``. The server broadcasts ``x`` and the
state ``s``; clients take local steps with ``s`` held FIXED and the server
updates ``s`` once per round with the mean full-batch gradient at ``x``:

.. math::
   y &\leftarrow y - U(g_i, s)\ \text{for } K \text{ local steps},\qquad
   y_0 = x \\
   g_i &= \nabla f_i(y;\zeta) &\text{(MimeLite)} \\
   g_i &= \nabla f_i(y;\zeta) - \nabla f_i(x;\zeta) + c,\quad
   c = \textstyle\sum_j p_j \nabla f_j(x) &\text{(Mime, SVRG correction)} \\
   s &\leftarrow V(\textstyle\sum_i p_i \nabla f_i(x), s),\qquad
   x \leftarrow x - \eta_g \textstyle\sum_i p_i (x - y_i)

with ``p_i = n_i / sum_j n_j`` over the round's clients (example-weighted, as
in FedAvg; the paper writes uniform ``1/|S|``). With optax, ``U(g, s)`` is
``optimizer.update(g, s, y)`` with the new state discarded (for
``optax.sgd(lr, momentum=b)``: ``-lr (g + b m)``, the paper's momentum) and
``V(g, s)`` is its state output.

MimeLite makes one pass over the clients per round. Mime needs ``c`` BEFORE
local training, which is a second pass; the engine makes one pass per round,
so one Mime round is two engine rounds of one algorithm, switched by a phase
in the server state: a *gradient* round (clients send ``grad f_i(x)``; the
server stores ``c``; ``x`` is unchanged) then a *training* round (corrected
local steps; the server applies ``V(c, s)`` and the ``x`` update). With
``RoundConfig(sampling="all")`` both rounds see the same clients and this is
exactly Algorithm 1; with client sampling the two rounds sample independently,
so ``c`` is an independent unbiased estimate of ``grad f(x)`` rather than the
mean over the training round's own clients. ``engine.run(state, data, 2 * T)``
runs ``T`` Mime rounds.

Full-batch gradients use :func:`~fedjax_lite.algorithms.full_batch.first_epoch`
(pass the round's ``num_epochs`` to make it one pass over the data).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from fedjax_lite.algorithms import base
from fedjax_lite.algorithms.base import FederatedAlgorithm
from fedjax_lite.algorithms.full_batch import full_batch_grad
from fedjax_lite.algorithms.local import local_train
from fedjax_lite.models.core import Model

PyTree = Any


@flax.struct.dataclass
class MimeState:
  """Server weights ``x``, base-optimizer state ``s``, Mime's ``c`` and phase
  (0: gradient round, 1: training round; MimeLite stays at 1)."""

  params: PyTree
  opt_state: PyTree
  control: PyTree
  phase: jax.Array


def frozen(
  optimizer: optax.GradientTransformation, state: PyTree
) -> optax.GradientTransformation:
  """``U(., s)``: ``optimizer``'s update with its state fixed at ``state``."""

  def init(params):
    del params
    return ()

  def update(grads, opt_state, params=None):
    return optimizer.update(grads, state, params)[0], opt_state

  return optax.GradientTransformation(init, update)


def mime(
  model: Model,
  base_optimizer: optax.GradientTransformation,
  server_learning_rate: float = 1.0,
  *,
  num_epochs: int = 1,
  corrected: bool = True,
  name: str | None = None,
  aggregator=None,
) -> FederatedAlgorithm:
  """Mime (``corrected=True``): MimeLite plus the SVRG correction, TWO engine
  rounds per Mime round (gradient, then training; see the module docstring).

  Args:
    model: the model.
    base_optimizer: the optimizer to mimic (its learning rate is the local
      step size).
    server_learning_rate: ``eta_g``.
    num_epochs: the round's ``LocalWork.num_epochs`` (full-batch gradient on
      one epoch; see :mod:`~fedjax_lite.algorithms.full_batch`).
    corrected: False is MimeLite (:func:`mime_lite`): one engine round per
      round, no correction.
    name: for reports (default ``"mime"``, or ``"mime_lite"``).
    aggregator: the round's aggregator of ``{"delta", "grad"}`` (None:
      example-weighted mean).
  """
  if name is None:
    name = "mime" if corrected else "mime_lite"
  eta_g = base.hyperparameter(server_learning_rate)

  def server_init(params):
    return MimeState(
      params=params,
      opt_state=base_optimizer.init(params),
      control=base.tree_zeros_like(params),
      phase=jnp.asarray(0 if corrected else 1, jnp.int32),
    )

  def broadcast(state):
    return state.params, state.opt_state, state.control, state.phase

  def client_update(shared, client_state, data, rng):
    del client_state
    x, s, c, phase = shared
    k_full, k_train = jax.random.split(rng)
    weight = data.num_examples.astype(jnp.float32)

    def gradient_round():
      grads, stats = full_batch_grad(model, x, data, k_full, num_epochs)
      return {"delta": base.tree_zeros_like(x), "grad": grads}, stats

    def training_round():
      def grad_fn(params, batch, mask, step_rng):
        g, stats = jax.grad(model.batch_loss, has_aux=True)(
          params, batch, mask, step_rng
        )
        if corrected:
          gx, _ = jax.grad(model.batch_loss, has_aux=True)(
            x, batch, mask, step_rng
          )
          g = jax.tree.map(lambda a, b, cc: a - b + cc, g, gx, c)
        return g, stats

      result = local_train(grad_fn, frozen(base_optimizer, s), x, data, k_train)
      if corrected:  # c was computed in the gradient round
        grads = base.tree_zeros_like(x)
      else:
        grads, _ = full_batch_grad(model, x, data, k_full, num_epochs)
      return {
        "delta": base.tree_sub(x, result.params),
        "grad": grads,
      }, result.metrics

    if corrected:
      update, metrics = jax.lax.cond(phase == 0, gradient_round, training_round)
    else:
      update, metrics = training_round()
    return base.ClientOutput(update=update, weight=weight, metrics=metrics)

  def server_update(state, aggregate: base.Aggregate):
    mean = aggregate.mean
    grad = state.control if corrected else mean["grad"]
    _, opt_state = base_optimizer.update(grad, state.opt_state, state.params)
    trained = MimeState(
      params=jax.tree.map(
        lambda p, d: p - eta_g * d, state.params, mean["delta"]
      ),
      opt_state=opt_state,
      control=state.control,
      phase=jnp.asarray(0 if corrected else 1, jnp.int32),
    )
    if not corrected:
      return trained
    gathered = state.replace(
      control=mean["grad"], phase=jnp.ones((), jnp.int32)
    )
    return base.tree_select(state.phase == 0, gathered, trained)

  return FederatedAlgorithm(
    server_init=server_init,
    client_update=client_update,
    server_update=server_update,
    broadcast=broadcast,
    name=name,
    aggregator=aggregator,
    model=model,
  )


def mime_lite(
  model: Model,
  base_optimizer: optax.GradientTransformation,
  server_learning_rate: float = 1.0,
  **options,
) -> FederatedAlgorithm:
  """MimeLite: local steps ``U(grad f_i(y), s)`` with the server state fixed;
  :func:`mime` with ``corrected=False`` (other keywords as :func:`mime`)."""
  return mime(
    model, base_optimizer, server_learning_rate, corrected=False, **options
  )
