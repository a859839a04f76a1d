"""TensorFlow Federated 0.87's ``tff.learning.algorithms`` names.

Reached as ``fedjax_lite.learning.algorithms``; each builder is a thin alias
over a :mod:`fedjax_lite.learning` builder, with TFF's argument names where
they map (TFF's ``tensorflow_federated/python/learning/algorithms/fed_avg.py``,
``fed_prox.py`` and ``fed_eval.py``)::

    process = fl.learning.algorithms.build_weighted_fed_avg(
        model_fn, client_optimizer_fn=lambda: optax.sgd(0.02),
        server_optimizer_fn=lambda: optax.sgd(1.0), batch_size=20,
        local_epochs=5)
    state = process.initialize()
    result = process.next(state, federated_train_data)
    state, metrics = result.state, result.metrics

What differs from TFF (see docs/migrating.md, section 1.9): optax in place
of Keras / ``tff.learning.optimizers`` optimizers; the local work is given by
``local_epochs``, ``batch_size`` or ``num_local_steps`` instead of a
``tf.data`` pipeline; ``model_fn`` builds a :class:`~fedjax_lite.models.Model`
(a ``Model`` value is taken as well); metrics are a flat dict; TFF's
``model_distributor``, ``metrics_aggregator``, ``loop_implementation`` and
``client_weighting`` do not exist here (weighted builders weight a client by
its number of examples ``n_k``, TFF by the examples it processed, ``E n_k``
for ``E`` epochs: the same normalised weights when every client runs the same
epochs).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import optax

from fedjax_lite import checks
from fedjax_lite.aggregators.base import Aggregator
from fedjax_lite.aggregators.mean import unweighted_mean
from fedjax_lite.data.batching import DeviceData
from fedjax_lite.engine.evaluation import evaluate
from fedjax_lite.learning import (
  IterativeProcess,
  LearningProcessOutput,
  _as_dataset,
  build_fed_prox_process,
  build_federated_averaging_process,
)
from fedjax_lite.models.core import Model

__all__ = [
  "FedEvalProcess",
  "FedEvalState",
  "build_fed_eval",
  "build_unweighted_fed_avg",
  "build_weighted_fed_avg",
  "build_weighted_fed_prox",
]


def _sgd_1():
  # TFF's DEFAULT_SERVER_OPTIMIZER_FN: SGD with learning rate 1.0.
  return optax.sgd(1.0)


def _model(model_fn: Any) -> Model:
  """The Model that ``model_fn`` builds (a Model value is taken as is)."""
  if isinstance(model_fn, Model):
    return model_fn
  if not callable(model_fn):
    raise TypeError(
      "model_fn must be a no-argument function returning a fedjax_lite "
      f"Model (or a Model), got {type(model_fn).__name__}."
    )
  model = model_fn()
  if not isinstance(model, Model):
    raise TypeError(
      "model_fn() must return a fedjax_lite Model (e.g. "
      "fl.models.from_flax(module, sample_input)), got "
      f"{type(model).__name__}."
    )
  return model


def _optimizer_fn(name: str, value: Any) -> Callable[[], Any]:
  """A no-argument optimizer factory from an optax optimizer or a factory."""
  if isinstance(value, optax.GradientTransformation):
    return lambda: value
  checks.optimizer_factories(**{name: value})
  return value


def _aggregator(value: Any, default: Aggregator | None) -> Aggregator | None:
  if value is None:
    return default
  checks.instance_of("model_aggregator", value, Aggregator)
  return value


def build_weighted_fed_avg(
  model_fn: Callable[[], Model] | Model,
  client_optimizer_fn: Any,
  server_optimizer_fn: Any = _sgd_1,
  *,
  model_aggregator: Aggregator | None = None,
  **local_work,
) -> IterativeProcess:
  r"""FedAvg (McMahan et al. 2017, arXiv:1602.05629), TFF's
  ``build_weighted_fed_avg``.

  .. math:: w_{t+1} = w_t - \mathrm{ServerOpt}\Big(\sum_k \frac{n_k}{n}
            (w_t - w^k_{t+1})\Big)

  Args:
    model_fn: no-argument function returning a
      :class:`~fedjax_lite.models.Model` (or the Model itself).
    client_optimizer_fn: an optax optimizer or a no-argument function
      returning one (TFF: a Keras optimizer factory or
      ``tff.learning.optimizers.build_sgdm(...)``).
    server_optimizer_fn: likewise for the server step on the mean update;
      default SGD with learning rate 1.0, as TFF.
    model_aggregator: a :class:`fedjax_lite.aggregators.Aggregator`
      (:func:`fedjax_lite.learning.robust_aggregator`, ...); None is the
      example-weighted mean (TFF's ``MeanFactory``).
    **local_work: ``local_epochs`` (default 1), ``batch_size`` (None: full
      batch), ``num_local_steps``, ``block_size``, ``mesh``, as
      :func:`fedjax_lite.learning.build_federated_averaging_process`.
  """
  return build_federated_averaging_process(
    _model(model_fn),
    _optimizer_fn("client_optimizer_fn", client_optimizer_fn),
    _optimizer_fn("server_optimizer_fn", server_optimizer_fn),
    model_aggregator=_aggregator(model_aggregator, None),
    **local_work,
  )


def build_unweighted_fed_avg(
  model_fn: Callable[[], Model] | Model,
  client_optimizer_fn: Any,
  server_optimizer_fn: Any = _sgd_1,
  *,
  model_aggregator: Aggregator | None = None,
  **local_work,
) -> IterativeProcess:
  r"""FedAvg with every client counting once, TFF's
  ``build_unweighted_fed_avg``:
  :math:`w_{t+1} = w_t - \mathrm{ServerOpt}(\frac{1}{|S_t|}\sum_k
  (w_t - w^k_{t+1}))`.

  Arguments as :func:`build_weighted_fed_avg`; the default
  ``model_aggregator`` is :func:`fedjax_lite.aggregators.unweighted_mean`
  (TFF's ``UnweightedMeanFactory``).
  """
  return build_federated_averaging_process(
    _model(model_fn),
    _optimizer_fn("client_optimizer_fn", client_optimizer_fn),
    _optimizer_fn("server_optimizer_fn", server_optimizer_fn),
    model_aggregator=_aggregator(model_aggregator, unweighted_mean()),
    **local_work,
  )


def build_weighted_fed_prox(
  model_fn: Callable[[], Model] | Model,
  proximal_strength: float,
  client_optimizer_fn: Any,
  server_optimizer_fn: Any = _sgd_1,
  *,
  model_aggregator: Aggregator | None = None,
  **local_work,
) -> IterativeProcess:
  r"""FedProx (Li et al. 2020, arXiv:1812.06127) under TFF's name
  ``build_weighted_fed_prox``, with the paper's sign.

  Clients minimise
  :math:`F_k(w) + \frac{\mu}{2}\|w - w_t\|^2`, ``mu = proximal_strength
  >= 0``, so every local step adds :math:`\mu (w - w_t)` to the gradient.
  TFF 0.87 adds :math:`\mu (w_t - w)` instead (docs/migrating.md, 4.2): the
  same ``proximal_strength`` gives different weights there. Other arguments
  as :func:`build_weighted_fed_avg`.
  """
  mu = checks.real("proximal_strength", proximal_strength)
  if not (0.0 <= mu < float("inf")):
    raise ValueError(
      "proximal_strength must be a finite number >= 0 (the FedProx paper's "
      f"mu), got {proximal_strength!r}."
    )
  return build_fed_prox_process(
    _model(model_fn),
    _optimizer_fn("client_optimizer_fn", client_optimizer_fn),
    _optimizer_fn("server_optimizer_fn", server_optimizer_fn),
    mu=mu,
    model_aggregator=_aggregator(model_aggregator, None),
    **local_work,
  )


@flax.struct.dataclass
class FedEvalState:
  """State of :func:`build_fed_eval`: the model weights to evaluate."""

  model_weights: Any


class FedEvalProcess:
  """TFF's evaluation process shape: ``initialize``,
  ``set_model_weights``, ``get_model_weights``, ``next``."""

  def __init__(self, model: Model, batch_size: int | None, mesh):
    self.model = model
    self.batch_size = batch_size
    self.mesh = mesh

  def initialize(self, seed: int = 0) -> FedEvalState:
    """The model's initial weights from ``seed``, the same as a training
    process's ``initialize(seed)`` for the same model."""
    k_init, _ = jax.random.split(jax.random.PRNGKey(seed))
    return FedEvalState(model_weights=self.model.init(k_init))

  def get_model_weights(self, state: FedEvalState) -> Any:
    checks.instance_of("state", state, FedEvalState)
    return state.model_weights

  def set_model_weights(
    self, state: FedEvalState, weights: Any
  ) -> FedEvalState:
    """``state`` evaluating ``weights`` (e.g. a training process's
    ``get_model_weights(train_state)``); structure and shapes must match."""
    checks.instance_of("state", state, FedEvalState)
    old = state.model_weights
    if jax.tree.structure(old) != jax.tree.structure(weights):
      raise ValueError(
        f"weights have the structure {jax.tree.structure(weights)}; the "
        f"model's params are {jax.tree.structure(old)}."
      )
    for w, p in zip(jax.tree.leaves(weights), jax.tree.leaves(old)):
      if jax.numpy.shape(w) != jax.numpy.shape(p):
        raise ValueError(
          f"weights have a leaf of shape {jax.numpy.shape(w)} where the "
          f"model's params have {jax.numpy.shape(p)}."
        )
    return state.replace(model_weights=weights)

  def next(self, state: FedEvalState, data: Any) -> LearningProcessOutput:
    """Evaluates the state's weights on every client of ``data``.

    ``metrics``: the model's metrics and ``loss`` as example-weighted means
    over all clients' examples (Python floats), ``num_examples`` and
    ``num_clients``; the state is returned unchanged.
    """
    checks.instance_of("state", state, FedEvalState)
    if not isinstance(data, DeviceData):
      data = _as_dataset(data)
    result = evaluate(
      self.model,
      state.model_weights,
      data,
      batch_size=self.batch_size,
      mesh=self.mesh,
    )
    metrics = {k: float(v) for k, v in result.mean.items()}
    metrics["num_examples"] = float(result.num_examples.sum())
    metrics["num_clients"] = float(len(result.num_examples))
    return LearningProcessOutput(state, metrics)


def build_fed_eval(
  model_fn: Callable[[], Model] | Model,
  *,
  batch_size: int | None = 256,
  mesh=None,
) -> FedEvalProcess:
  """Federated evaluation, TFF's ``build_fed_eval``: ``next`` evaluates the
  weights held in its state (set them with ``set_model_weights``) on the
  clients it is given (:func:`fedjax_lite.evaluate`).

  Args:
    model_fn: as :func:`build_weighted_fed_avg`.
    batch_size: evaluation batch size (None: each client at once); only
      speed and memory depend on it.
    mesh: device mesh (default all devices).
  """
  if batch_size is not None:
    checks.positive_int("batch_size", batch_size)
  return FedEvalProcess(_model(model_fn), batch_size, mesh)
