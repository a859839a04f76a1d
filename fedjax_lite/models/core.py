"""The model interface the engine trains: init, apply, per-example loss, metrics.

A :class:`Model` works on ONE batch of examples (leading example axis); the
engine vmaps it over clients. Build one from any flax linen module with
:func:`from_flax`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lite import checks
from fedjax_lite.models.conv import fast_conv_interceptor

Params = Any
Batch = Mapping[str, jax.Array]


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example ``-log softmax(logits)[label]``; ``labels`` int ``[b]``.

  Written with a one-hot product rather than an indexed gather so that the
  backward pass is a dense elementwise op (no scatter) inside vmapped rounds.
  """
  onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
  return jax.nn.logsumexp(logits, axis=-1) - jnp.sum(onehot * logits, axis=-1)


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example 0/1 correctness of ``argmax(logits)``."""
  return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Model:
  """A supervised model for federated training.

  Attributes:
    init: ``rng -> params``.
    apply: ``(params, batch, rng, train) -> predictions`` for one batch; ``rng``
      may be None (no dropout).
    loss: ``(predictions, labels) -> [b]`` per-example loss.
    metrics: name -> ``(predictions, labels) -> [b]`` per-example values.
    input_key, label_key: the batch features holding inputs and labels.
    num_classes: number of classes for classification labels (used to
      validate data), or None.
    name: a short description.
    multi_label: labels are multi-hot rows ``[..., num_classes]`` with
      values in {0, 1} (several classes per example, e.g. tags), not
      integer class indices.
  """

  init: Callable[[jax.Array], Params]
  apply: Callable[..., jax.Array]
  loss: Callable[[jax.Array, jax.Array], jax.Array] = softmax_cross_entropy
  metrics: Mapping[str, Callable[[jax.Array, jax.Array], jax.Array]] = (
    dataclasses.field(default_factory=lambda: {"accuracy": accuracy})
  )
  input_key: str = "x"
  label_key: str = "y"
  num_classes: int | None = None
  name: str = "model"
  multi_label: bool = False

  def batch_loss(
    self,
    params: Params,
    batch: Batch,
    mask: jax.Array,
    rng: jax.Array | None = None,
    train: bool = True,
  ) -> tuple[jax.Array, dict]:
    """Masked mean loss over a batch, plus ``(sum, count)`` metric pairs.

    Args:
      params: model parameters.
      batch: features with leading example axis ``[b, ...]``.
      mask: bool ``[b]``; padded examples are excluded.
      rng: optional randomness (dropout) for training.
      train: training mode flag passed to ``apply``.

    Returns:
      ``(mean_loss, stats)`` where ``stats[name] = (sum over valid, count)``.
      An all-padding batch has loss 0 and zero gradient.
    """
    preds = self.apply(params, batch, rng, train)
    labels = batch[self.label_key]
    m = mask.astype(preds.dtype)
    count = jnp.sum(m)
    per_example = self.loss(preds, labels)
    loss_sum = jnp.sum(per_example * m)
    mean = loss_sum / jnp.maximum(count, 1.0)
    stats = {"loss": (loss_sum, count)}
    for name, fn in self.metrics.items():
      stats[name] = (jnp.sum(fn(preds, labels) * m), count)
    return mean, jax.tree.map(jax.lax.stop_gradient, stats)

  def evaluate_batch(
    self, params: Params, batch: Batch, mask: jax.Array
  ) -> dict:
    """``(sum, count)`` of the loss and every metric over a masked batch."""
    _, stats = self.batch_loss(params, batch, mask, None, train=False)
    return stats

  def check_inputs(self, features: Mapping[str, Any], where: str = "data"):
    """Raises :class:`~fedjax_lite.checks.DataError` if the model cannot run
    on a batch of these features (e.g. 5 input features for a model built
    for 4): traced with ``jax.eval_shape`` on two examples, no compute."""
    x = features.get(self.input_key)
    if x is None:
      return
    shapes = {
      k: jax.ShapeDtypeStruct(
        (2,) + tuple(np.shape(v)[1:]), np.asarray(v).dtype
      )
      for k, v in features.items()
      if hasattr(v, "shape") and np.ndim(v) >= 1
    }
    try:
      params = jax.eval_shape(self.init, jax.random.PRNGKey(0))
      jax.eval_shape(lambda p, b: self.apply(p, b, None, False), params, shapes)
    except Exception as e:  # flax, lax and numpy shape errors differ in type
      first = str(e).strip().splitlines()[0] if str(e).strip() else ""
      raise checks.DataError(
        f"{where}: the model {self.name!r} cannot run on inputs "
        f"{self.input_key!r} of shape {tuple(np.shape(x)[1:])} per example "
        f"({type(e).__name__}: {first[:300]}); was the model built for "
        "another input size?"
      ) from e

  def load_params(
    self, path: str | os.PathLike, rng: jax.Array | None = None
  ) -> Params:
    """Parameters of this model read from ``path``, checked against its init.

    Args:
      path: a msgpack file written by
        :func:`fedjax_lite.experiment.export_params` (or flax
        ``msgpack_serialize`` of params), or an orbax folder
        (``format="orbax"``).
      rng: the key ``init`` is traced with (``jax.eval_shape``: nothing is
        computed); default ``PRNGKey(0)``.

    Returns:
      The params in the structure of ``self.init(rng)``, numpy leaves.

    Raises:
      ValueError: naming the first leaf whose path, shape or dtype differs
        from the model's (e.g. a model built for other sizes).
    """
    from fedjax_lite.models import params_io  # pylint: disable=g-import-not-at-top

    key = jax.random.PRNGKey(0) if rng is None else rng
    target = jax.eval_shape(self.init, key)
    return params_io.read_params(path, target, what=f"model {self.name!r}")

  def validate_labels(self, labels: np.ndarray, where: str = "data") -> None:
    """Raises a clear error if ``labels`` are not valid class indices (or,
    for a ``multi_label`` model, multi-hot rows of width ``num_classes``)."""
    labels = np.asarray(labels)
    if self.multi_label:
      self._validate_multi_hot(labels, where)
      return
    if not np.issubdtype(labels.dtype, np.integer):
      sample = labels.reshape(-1)[:3]
      raise checks.DataError(
        f"{where}: labels {self.label_key!r} have dtype "
        f"{labels.dtype} (e.g. {sample.tolist()}); expected "
        "integer class indices. Convert with "
        "y.astype(np.int32) if they are whole numbers."
      )
    if (
      self.num_classes is not None
      and labels.size
      and (labels.min() < 0 or labels.max() >= self.num_classes)
    ):
      raise checks.DataError(
        f"{where}: labels {self.label_key!r} range over "
        f"[{labels.min()}, {labels.max()}]; expected values in "
        f"[0, {self.num_classes})."
      )

  def _validate_multi_hot(self, labels: np.ndarray, where: str) -> None:
    width = labels.shape[-1] if labels.ndim else None
    if labels.ndim < 2 or (
      self.num_classes is not None and width != self.num_classes
    ):
      raise checks.DataError(
        f"{where}: labels {self.label_key!r} have shape {labels.shape}; "
        f"expected multi-hot rows [n, {self.num_classes}] (one column per "
        "class)."
      )
    if not (np.issubdtype(labels.dtype, np.number) or labels.dtype == np.bool_):
      raise checks.DataError(
        f"{where}: labels {self.label_key!r} have dtype {labels.dtype}; "
        "expected multi-hot float32 rows of 0s and 1s."
      )
    bad = (labels != 0) & (labels != 1)
    if bad.any():
      sample = np.unique(labels[bad])[:3]
      raise checks.DataError(
        f"{where}: multi-hot labels {self.label_key!r} hold values other "
        f"than 0 and 1 (e.g. {sample.tolist()}); expected 1 where a class "
        "applies and 0 elsewhere (np.minimum(y, 1) caps repeated classes)."
      )


def from_flax(
  module: nn.Module,
  sample_input: Any,
  *,
  num_classes: int | None = None,
  loss: Callable = softmax_cross_entropy,
  metrics: Mapping[str, Callable] | None = None,
  input_key: str = "x",
  label_key: str = "y",
  rng_collections: tuple[str, ...] = (),
  name: str | None = None,
  fast_layers: bool = True,
) -> Model:
  """Wraps a flax linen module as a :class:`Model`.

  With ``fast_layers`` (default) every plain ``flax.linen.Conv`` of the
  module (2-D, NHWC, no dilation or groups) runs as GEMMs with its own VJP
  (:func:`fedjax_lite.models.conv_general_dilated`; same parameters, same
  function), which is many times faster on CPU than XLA's convolution. For
  pooling use :func:`fedjax_lite.models.max_pool` in place of
  ``nn.max_pool``. Pass ``fast_layers=False`` for forward-mode
  differentiation (``jax.jvp``, Hessians) through the model.

  Args:
    module: maps a batch of inputs ``[b, ...]`` to predictions; may take a
      ``train`` keyword if it uses dropout.
    sample_input: an example input batch (only its shape/dtype are used).
    num_classes: for label validation.
    loss: per-example loss ``(predictions, labels) -> [b]``.
    metrics: per-example metrics (default: accuracy).
    input_key, label_key: batch feature names.
    rng_collections: flax rng collections used in training (e.g. "dropout").
    name: a short description.
    fast_layers: run ``nn.Conv`` layers on the GEMM path (see above).
  """
  sample_input = jnp.asarray(sample_input)
  intercept = (
    (lambda: nn.intercept_methods(fast_conv_interceptor))
    if fast_layers
    else contextlib.nullcontext
  )
  try:
    takes_train = "train" in inspect.signature(module.__call__).parameters
  except (TypeError, ValueError):  # pragma: no cover
    takes_train = False

  def init(rng):
    kwargs = {"train": False} if takes_train else {}
    with intercept():
      return module.init(rng, sample_input, **kwargs)["params"]

  def apply(params, batch, rng=None, train=False):
    kwargs = {"train": train} if takes_train else {}
    rngs = None
    if rng is not None and rng_collections:
      rngs = {
        c: jax.random.fold_in(rng, i) for i, c in enumerate(rng_collections)
      }
    with intercept():
      return module.apply(
        {"params": params}, batch[input_key], rngs=rngs, **kwargs
      )

  return Model(
    init=init,
    apply=apply,
    loss=loss,
    metrics=dict(metrics) if metrics is not None else {"accuracy": accuracy},
    input_key=input_key,
    label_key=label_key,
    num_classes=num_classes,
    name=name or type(module).__name__,
  )


def num_params(params: Params) -> int:
  return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))
