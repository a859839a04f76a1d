r"""The models of the standard federated benchmarks, at their publishers'
parameter counts.

========================== ========== ==================================
:data:`STANDARD_MODELS`    parameters published source
========================== ========== ==================================
``emnist_cnn``             1,206,590  FedJAX ``fedjax/models/emnist.py``
``emnist_cnn_digits``      1,199,882  (``create_conv_model``)
``stackoverflow_nwp_lstm`` 4,050,748  FedJAX ``fedjax/models/
                                      stackoverflow.py``; TFF
                                      ``baselines/stackoverflow``
``stackoverflow_tag_lr``   5,000,500  TFF ``baselines/stackoverflow/
                                      tag_prediction_tasks.py``
``cifar100_resnet18_gn``   11,218,212 TFF ``baselines/cifar100/
                                      resnet_models.py``
``cifar10_simple_cnn``     1,626,442  pfl-research ``benchmarks/model/
                                      pytorch/cnn.py``
``shakespeare_lstm``       820,522    FedJAX ``fedjax/models/
                                      shakespeare.py``
========================== ========== ==================================

Each entry of :data:`STANDARD_MODELS` is ``name -> (builder, published
parameter count, source)``; ``builder()`` returns the :class:`Model` at the
published sizes.

Sequence models (:func:`stackoverflow_nwp_lstm`, :func:`shakespeare_lstm`)
read int ``x [T]`` and predict every position's next token, ``y [T]``
(logits ``[T, num_classes]`` per example). Per example, with ``v_t = [y_t
\ne \mathrm{PAD}]`` and ``\ell_t`` the softmax cross-entropy at ``t``, the
loss is ``\sum_t v_t \ell_t / \max(1, \sum_t v_t)`` (``token_loss="mean"``),
``\sum_t v_t \ell_t`` (``"sum"``: FedJAX's Stack Overflow ``train_loss``) or
``\sum_t v_t \ell_t / T`` (``"length"``: FedJAX's Shakespeare
``train_loss``). Their accuracies are per example: correct counted targets
over counted targets (0 for an example with none). The engine averages a
metric over examples, which weighs every sentence alike; the papers' token
accuracies weigh every token alike (FedJAX's ``SequenceTokenAccuracy`` and
TFF's Keras metrics sum over all tokens). That figure is the ratio of the
means of two count metrics, ``num_correct_no_oov_no_eos /
num_tokens_no_oov_no_eos``, both reported.

Embeddings are table lookups (``jnp.take``; the backward pass scatters
``[T, E]`` rows, cheap next to the LSTM); LSTM layers run as
:func:`fedjax_lite.models.lstm.lstm_layer` (one GEMM for all input
projections, a scan with its own VJP), dense layers as
:class:`fedjax_lite.models.Dense`, convolutions and pooling as GEMMs
(:class:`fedjax_lite.models.conv.ConvCM`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lite import checks
from fedjax_lite.models.cnn import (
  conv_pool_dropout,
  dropout_image_model,
  simple_cnn,
)
from fedjax_lite.models.conv import (
  ConvCM,
  DenseCM,
  Dropout,
  image_shape,
  images_cm,
  max_pool_chwn,
)
from fedjax_lite.models.core import Model, from_flax, softmax_cross_entropy
from fedjax_lite.models.layers import Dense
from fedjax_lite.models.lstm import FastLSTM


# ------------------------------------------------------------ EMNIST CNN
def _haiku_linear_init(key, shape, dtype=jnp.float32):
  """Haiku's ``Linear`` default: truncated normal (at 2 sigma) with
  standard deviation ``1 / sqrt(fan_in)`` before truncation."""
  std = 1.0 / jnp.sqrt(jnp.asarray(shape[0], jnp.float32))
  return nn.initializers.truncated_normal(1.0)(key, shape, dtype) * std


class EmnistCNN(nn.Module):
  """FedJAX's EMNIST CNN with dropout (see :func:`emnist_cnn`)."""

  num_classes: int = 62
  input_shape: tuple = (28, 28, 1)
  fast: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    n = x.shape[0]
    h = images_cm(x, self.input_shape)  # [C, H, W, N]
    # Haiku's Conv2D default: VarianceScaling(1.0), fan_in, truncated normal
    conv_init = nn.initializers.variance_scaling(
      1.0, "fan_in", "truncated_normal"
    )
    h = conv_pool_dropout(h, kernel_init=conv_init, fast=self.fast, train=train)
    h = jnp.transpose(h, (1, 2, 0, 3)).reshape(-1, n)  # [H' W' C, N]
    dense = DenseCM(
      128, kernel_init=_haiku_linear_init, fast=self.fast, name="Dense_0"
    )
    h = Dropout(0.5, deterministic=not train)(nn.relu(dense(h)))
    return Dense(
      self.num_classes, kernel_init=_haiku_linear_init, name="Dense_1"
    )(h)


def emnist_cnn(
  only_digits: bool = False,
  *,
  input_shape: Sequence[int] = (28, 28, 1),
  fast: bool = True,
) -> Model:
  """FedJAX's EMNIST CNN with dropout (``fedjax/models/emnist.py``,
  ``create_conv_model``) as a :class:`Model`.

  conv3x3 ``VALID`` 1->32, ReLU, conv3x3 ``VALID`` 32->64, ReLU, 2x2 max
  pooling (stride 2), dropout 0.25, flatten (``[H, W, C]`` order, as Haiku's
  ``Flatten`` of NHWC maps), dense 9216->128, ReLU, dropout 0.5, dense
  128->classes; softmax cross-entropy and accuracy. Parameters: 1,206,590
  for the 62 classes of EMNIST (``only_digits=False``), 1,199,882 for 10
  digits (``320 + 18,496 + 1,179,776 + 129 C``). Initializers as Haiku's
  defaults (variance-scaling truncated normal kernels, Linear kernels
  truncated normal ``1/sqrt(fan_in)``, zero biases). Inputs ``[28, 28, 1]``
  float32 per example, as FedJAX feeds them (``[28, 28]`` or ``[784]`` are
  reshaped). Dropout in training: pass an rng to ``apply`` (the engine
  does).

  Args:
    only_digits: 10 classes (True) or 62 (False), as FedJAX.
    input_shape: one example's ``(H, W, C)`` (at least 6x6).
    fast: convolutions, pooling and the first dense layer as GEMMs with
      their own VJPs (False: ``lax`` convolutions and autodiff).
  """
  if not isinstance(only_digits, bool):
    raise TypeError(f"only_digits must be True or False, got {only_digits!r}.")
  shape = image_shape(input_shape, min_size=6)
  num_classes = 10 if only_digits else 62
  return dropout_image_model(
    EmnistCNN(num_classes, shape, fast), "emnist_cnn", shape, num_classes
  )


# ---------------------------------------------------- sequence models
class SequenceLSTM(nn.Module):
  """Embedding -> LSTM layers (each optionally followed by ``tanh``) ->
  optional dense projection -> dense logits at every position.
  ``[b, T]`` int -> ``[b, T, num_classes]``."""

  num_classes: int
  embed_dim: int
  hidden: tuple
  projection: int | None = None
  tanh: bool = True

  @nn.compact
  def __call__(self, x):
    table = self.param(
      "embedding",
      nn.initializers.truncated_normal(1.0),  # Haiku Embed's default
      (self.num_classes, self.embed_dim),
      jnp.float32,
    )
    h = jnp.take(table, x.astype(jnp.int32), axis=0)  # [b, T, E]
    for i, units in enumerate(self.hidden):
      h = FastLSTM(units, name=f"lstm_{i}")(h)
      if self.tanh:
        h = jnp.tanh(h)
    if self.projection is not None:
      h = Dense(
        self.projection, kernel_init=_haiku_linear_init, name="projection"
      )(h)
    return Dense(
      self.num_classes, kernel_init=_haiku_linear_init, name="output"
    )(h)


TOKEN_LOSSES = ("mean", "sum", "length")


def _token_loss(pad: int, reduction: str) -> Callable:
  def loss(logits, labels):
    valid = (labels != pad).astype(logits.dtype)
    total = jnp.sum(softmax_cross_entropy(logits, labels) * valid, axis=-1)
    if reduction == "sum":
      return total
    if reduction == "length":
      return total / labels.shape[-1]
    return total / jnp.maximum(jnp.sum(valid, axis=-1), 1.0)

  return loss


def _counted(labels, excluded):
  keep = jnp.ones(labels.shape, bool)
  for t in excluded:
    keep &= labels != t
  return keep


def _token_accuracy(excluded, masked_logits=()) -> Callable:
  """Per example: correct / counted targets (0 if none are counted)."""

  def metric(logits, labels):
    if masked_logits:
      never = np.zeros((1,) * (logits.ndim - 1) + logits.shape[-1:], bool)
      never[..., list(masked_logits)] = True
      logits = jnp.where(never, -jnp.inf, logits)
    keep = _counted(labels, excluded).astype(jnp.float32)
    hit = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return jnp.sum(hit * keep, axis=-1) / jnp.maximum(
      jnp.sum(keep, axis=-1), 1.0
    )

  return metric


def _token_count(excluded, correct: bool = False) -> Callable:
  def metric(logits, labels):
    keep = _counted(labels, excluded).astype(jnp.float32)
    if correct:
      keep = keep * (jnp.argmax(logits, axis=-1) == labels)
    return jnp.sum(keep, axis=-1)

  return metric


def sequence_metrics(pad: int, bos: int, eos: int, oov: int) -> dict:
  """Per-example next-token metrics ``(logits [b, T, V], y [b, T]) -> [b]``.

  * ``accuracy_no_oov_no_eos``: targets other than PAD, OOV, EOS (TFF's
    ``accuracy_without_out_of_vocab_or_end_of_sentence``, the accuracy
    Reddi et al. 2021 report);
  * ``accuracy_no_oov``: targets other than PAD, OOV (EOS counted; TFF's
    ``accuracy_without_out_of_vocab``);
  * ``accuracy_in_vocab``: targets other than PAD, EOS, with the logits of
    PAD, BOS, EOS, OOV set to ``-inf`` so an OOV target is always a miss
    (FedJAX's ``accuracy_in_vocab``);
  * ``accuracy_no_eos``: targets other than PAD, EOS (FedJAX's
    ``accuracy_no_eos``);
  * ``num_tokens``: non-PAD targets; ``num_tokens_no_oov_no_eos`` and
    ``num_correct_no_oov_no_eos``: counted and correct targets of the first
    accuracy, whose mean ratio is the token-weighted accuracy.
  """
  no_oov_no_eos = (pad, oov, eos)
  return {
    "accuracy_no_oov_no_eos": _token_accuracy(no_oov_no_eos),
    "accuracy_no_oov": _token_accuracy((pad, oov)),
    "accuracy_in_vocab": _token_accuracy((pad, eos), (pad, bos, eos, oov)),
    "accuracy_no_eos": _token_accuracy((pad, eos)),
    "num_tokens": _token_count((pad,)),
    "num_tokens_no_oov_no_eos": _token_count(no_oov_no_eos),
    "num_correct_no_oov_no_eos": _token_count(no_oov_no_eos, correct=True),
  }


def _special_tokens(num_classes: int, **tokens) -> None:
  for name, value in tokens.items():
    checks.int_at_least(name, value, 0)
    if value >= num_classes:
      raise ValueError(
        f"{name}={value} is not a token id of this model; expected a value "
        f"in [0, {num_classes}) (vocab_size + 4 classes)."
      )
  seen: dict = {}
  for name, value in tokens.items():
    if value in seen:
      raise ValueError(
        f"{seen[value]} and {name} are both {value}; the special tokens "
        "need distinct ids."
      )
    seen[value] = name


def _sequence_model(
  module: SequenceLSTM,
  seq_len: int,
  tokens: dict,
  token_loss: str,
  forget_bias: float,
  name: str,
) -> Model:
  if token_loss not in TOKEN_LOSSES:
    raise ValueError(
      f"token_loss must be one of {TOKEN_LOSSES}, got {token_loss!r}."
    )
  model = from_flax(
    module,
    jnp.zeros((1, seq_len), jnp.int32),
    num_classes=module.num_classes,
    loss=_token_loss(tokens["pad"], token_loss),
    metrics=sequence_metrics(**tokens),
    name=name,
  )
  base_init = model.init

  def init(rng):
    params = dict(base_init(rng))
    for i in range(len(module.hidden)):
      cell = dict(params[f"lstm_{i}"])
      cell["hf"] = {**cell["hf"], "bias": cell["hf"]["bias"] + forget_bias}
      params[f"lstm_{i}"] = cell
    return params

  return dataclasses.replace(model, init=init)


def _units(hidden: Sequence[int]) -> tuple:
  units = tuple(int(h) for h in hidden)
  if not units or min(units) < 1:
    raise ValueError(
      f"hidden must be positive layer sizes, got {tuple(hidden)!r}."
    )
  return units


def stackoverflow_nwp_lstm(
  vocab_size: int = 10000,
  *,
  pad: int = 0,
  bos: int = 1,
  eos: int = 2,
  oov: int | None = None,
  embed_dim: int = 96,
  hidden: Sequence[int] = (670,),
  projection: int | None = 96,
  tanh: bool = True,
  token_loss: str = "mean",
  forget_bias: float = 1.0,
  seq_len: int = 20,
) -> Model:
  r"""The Stack Overflow next-word-prediction LSTM of Reddi et al. 2021
  ("Adaptive Federated Optimization", arXiv:2003.00295) as a :class:`Model`.

  FedJAX's ``fedjax/models/stackoverflow.py`` (``create_lstm_model``) and
  TFF's ``simulation/baselines/stackoverflow/word_prediction_models.py``
  (``create_recurrent_model``): over ``C = vocab_size + 4`` token ids (the
  words, PAD, BOS, EOS and one OOV bucket), an embedding ``[C, 96]``, one
  LSTM layer of 670 units, a dense projection 670->96 (with bias) and a
  dense output layer 96->C (with bias), applied at every position:

  .. math:: \mathrm{logits}_t = W_o (W_p\, g(h_t) + b_p) + b_o,

  with ``g = tanh`` (FedJAX applies ``jnp.tanh`` to the LSTM output;
  ``tanh=False`` gives TFF's Keras model, where it is the identity).
  Parameters at ``vocab_size=10000``: 960,384 + 2,055,560 + 64,416 +
  970,388 = 4,050,748, as published (no weight tying).

  Token ids: PAD 0, BOS 1, EOS 2, words ``3 .. V+2``, OOV ``V+3`` by
  default, FedJAX's ``StackoverflowTokenizer`` order (the default of
  :func:`fedjax_lite.datasets.stackoverflow_special_tokens`); for TFF's ids
  pass that function's ``"tff"`` ids as ``pad, bos, eos, oov``. Inputs int
  ``[T]`` per example, targets ``[T]``; the loss and metrics are described
  in the module docstring (the loss counts every non-PAD target, OOV and EOS
  included, as both publishers do). The LSTM's forget-gate bias starts at
  ``forget_bias`` (Haiku's LSTM adds 1 to it; Keras initializes it at 1).

  Args:
    vocab_size: the words (not counting the 4 special tokens).
    pad, bos, eos, oov: special token ids (``oov`` default ``vocab_size +
      3``), distinct, in ``[0, vocab_size + 4)``.
    embed_dim: embedding size (96).
    hidden: units of each LSTM layer ((670,)).
    projection: output size of the dense layer after the LSTM (96), or None
      for none.
    tanh: apply ``tanh`` to each LSTM layer's output (FedJAX: True).
    token_loss: ``"mean"``, ``"sum"`` or ``"length"`` (module docstring).
    forget_bias: initial forget-gate bias.
    seq_len: sequence length used to initialise (any length runs).
  """
  checks.positive_ints(vocab_size=vocab_size, embed_dim=embed_dim)
  checks.positive_int("seq_len", seq_len)
  if projection is not None:
    checks.positive_int("projection", projection)
  num_classes = vocab_size + 4
  tokens = dict(
    pad=pad, bos=bos, eos=eos, oov=vocab_size + 3 if oov is None else oov
  )
  _special_tokens(num_classes, **tokens)
  units = _units(hidden)
  module = SequenceLSTM(num_classes, embed_dim, units, projection, tanh)
  name = (
    f"stackoverflow_nwp_lstm{vocab_size}-e{embed_dim}-"
    f"{'x'.join(map(str, units))}-p{projection}"
  )
  return _sequence_model(module, seq_len, tokens, token_loss, forget_bias, name)


def shakespeare_lstm(
  vocab_size: int = 86,
  *,
  pad: int = 0,
  bos: int = 1,
  eos: int = 2,
  oov: int | None = None,
  embed_dim: int = 8,
  hidden: Sequence[int] = (256, 256),
  token_loss: str = "length",
  forget_bias: float = 1.0,
  seq_len: int = 80,
) -> Model:
  """FedJAX's Shakespeare character LSTM (``fedjax/models/shakespeare.py``,
  ``create_lstm_model``; TFF's ``baselines/shakespeare`` model has the same
  shapes) as a :class:`Model`.

  Over ``C = vocab_size + 4`` ids (by default FedJAX's preprocessing,
  ``fedjax/datasets/shakespeare.py``, and
  :func:`fedjax_lite.datasets.shakespeare.fedjax_char_sequences`: PAD 0,
  BOS 1, EOS 2, the 86 characters ``3 .. 88``, OOV 89; FedJAX's model file
  assumes BOS 87 and EOS 88 instead, which only changes which targets and
  logits the metrics leave out: pass ``bos``/``eos`` to follow it): an
  embedding
  ``[C, 8]``, two LSTM layers of 256 units each followed by ``tanh`` (as
  FedJAX's ``DeepRNN``), and a dense layer 256->C at every position.
  Parameters: 720 + 271,360 + 525,312 + 23,130 = 820,522. Unlike
  :func:`fedjax_lite.models.char_lstm` (LEAF: one prediction from the last
  position, 80 classes), every position predicts the next character. The
  loss defaults to FedJAX's (``token_loss="length"``: the masked token
  losses summed and divided by ``T``); metrics as
  :func:`stackoverflow_nwp_lstm` (:func:`sequence_metrics`; FedJAX reports
  ``accuracy_in_vocab``, TFF the accuracy without PAD, OOV and EOS targets,
  ``accuracy_no_oov_no_eos``).

  Args:
    vocab_size: characters (86), not counting the 4 special tokens.
    pad, bos, eos, oov: special ids (defaults 0, 1, 2, ``V+3``),
      distinct, in ``[0, vocab_size + 4)``.
    embed_dim: embedding size (8).
    hidden: units of each LSTM layer ((256, 256)).
    token_loss: ``"mean"``, ``"sum"`` or ``"length"`` (module docstring).
    forget_bias: initial forget-gate bias (Haiku's LSTM adds 1).
    seq_len: sequence length used to initialise (any length runs).
  """
  checks.positive_ints(vocab_size=vocab_size, embed_dim=embed_dim)
  checks.positive_int("seq_len", seq_len)
  v = vocab_size
  num_classes = v + 4
  tokens = dict(pad=pad, bos=bos, eos=eos, oov=v + 3 if oov is None else oov)
  _special_tokens(num_classes, **tokens)
  units = _units(hidden)
  module = SequenceLSTM(num_classes, embed_dim, units, None, True)
  name = f"shakespeare_lstm{v}-e{embed_dim}-{'x'.join(map(str, units))}"
  return _sequence_model(module, seq_len, tokens, token_loss, forget_bias, name)


# ------------------------------------------------ Stack Overflow tags
def sigmoid_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  r"""Per example, the mean over the ``K`` labels of
  ``-y log sigmoid(z) - (1 - y) log(1 - sigmoid(z))
  = softplus(z) - y z`` (Keras' ``BinaryCrossentropy`` averages over the
  last axis the same way)."""
  per_label = jax.nn.softplus(logits) - labels * logits
  return jnp.mean(per_label, axis=-1)


def _top_k_hits(logits, labels, k):
  _, idx = jax.lax.top_k(logits, k)
  return jnp.sum(jnp.take_along_axis(labels, idx, axis=-1), axis=-1)


def multi_label_metrics(top_k: int = 5) -> dict:
  """Per-example metrics ``(logits [b, K], y [b, K] multi-hot) -> [b]``.

  * ``recall_at_{k}``: labels among the ``k`` highest logits over the
    example's labels (0 for an example without labels);
  * ``precision_at_{k}``: labels among the ``k`` highest logits over ``k``;
  * ``precision``: labels among the logits above 0 (probability above 0.5)
    over those logits (0 if none), Keras' ``Precision()`` per example;
  * ``num_hits_at_{k}`` and ``num_labels``: their mean ratio is Keras'
    ``Recall(top_k=k)`` accumulated over all examples (TFF's
    ``recall_at_5``).
  """

  def recall(logits, labels):
    hits = _top_k_hits(logits, labels, top_k)
    return hits / jnp.maximum(jnp.sum(labels, axis=-1), 1.0)

  def precision_at(logits, labels):
    return _top_k_hits(logits, labels, top_k) / top_k

  def precision(logits, labels):
    pos = (logits > 0).astype(labels.dtype)
    return jnp.sum(pos * labels, axis=-1) / jnp.maximum(
      jnp.sum(pos, axis=-1), 1.0
    )

  return {
    f"recall_at_{top_k}": recall,
    f"precision_at_{top_k}": precision_at,
    "precision": precision,
    f"num_hits_at_{top_k}": lambda z, y: _top_k_hits(z, y, top_k),
    "num_labels": lambda z, y: jnp.sum(y, axis=-1),
  }


class _TagLR(nn.Module):
  num_tags: int

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1).astype(jnp.float32)
    # Keras Dense's default initializers: Glorot uniform kernel, zero bias
    return Dense(self.num_tags, kernel_init=nn.initializers.xavier_uniform())(x)


def stackoverflow_tag_lr(
  vocab_size: int = 10000, num_tags: int = 500, *, top_k: int = 5
) -> Model:
  """The Stack Overflow tag-prediction logistic regression (TFF's
  ``simulation/baselines/stackoverflow/tag_prediction_tasks.py``,
  ``_build_logistic_regression_model``; Reddi et al. 2021) as a
  :class:`Model`.

  One dense layer from the bag of words ``x [vocab_size]`` (float32 word
  frequencies, :func:`fedjax_lite.datasets.stackoverflow` with
  ``task="tag"``) to ``num_tags`` logits, an independent sigmoid per tag:
  ``p = sigmoid(x W + b)``. Parameters: ``10,000 x 500 + 500 = 5,000,500``.
  Labels ``y`` are float32 multi-hot ``[num_tags]`` (``multi_label``
  model). Loss per example: :func:`sigmoid_cross_entropy` (TFF: Keras
  ``BinaryCrossentropy``, mean over tags, summed over a batch; here the
  engine averages over examples, so learning rates differ by the batch
  size; Keras also clips probabilities to ``[1e-7, 1 - 1e-7]``).
  Metrics: :func:`multi_label_metrics` (TFF reports ``recall_at_5`` and
  ``precision``).

  Args:
    vocab_size: bag-of-words width (10,000).
    num_tags: tags (500).
    top_k: the ``k`` of ``recall_at_k`` / ``precision_at_k`` (5), at most
      ``num_tags``.
  """
  checks.positive_ints(vocab_size=vocab_size, num_tags=num_tags, top_k=top_k)
  if top_k > num_tags:
    raise ValueError(f"top_k={top_k} exceeds num_tags={num_tags}.")
  model = from_flax(
    _TagLR(num_tags),
    jnp.zeros((1, vocab_size), jnp.float32),
    num_classes=num_tags,
    loss=sigmoid_cross_entropy,
    metrics=multi_label_metrics(top_k),
    name=f"stackoverflow_tag_lr{vocab_size}x{num_tags}",
  )
  return dataclasses.replace(model, multi_label=True)


# ------------------------------------------------ TFF's CIFAR-100 ResNet
def group_norm_cm(x: jax.Array, num_groups: int = 2, epsilon: float = 1e-3):
  r"""Group normalization without scale or offset of ``[C, H, W, N]`` maps:
  each example's group of ``C / G`` channels is normalized over its channels
  and positions, ``(x - \mu) / \sqrt{\sigma^2 + \epsilon}`` (TFF's
  ``simulation/models/group_norm.py`` ``GroupNormalization``: 2 groups,
  epsilon 1e-3, no trainable parameters)."""
  c = x.shape[0]
  g = x.reshape((num_groups, c // num_groups) + x.shape[1:])
  mean = jnp.mean(g, axis=(1, 2, 3), keepdims=True)
  var = jnp.mean(jnp.square(g - mean), axis=(1, 2, 3), keepdims=True)
  return ((g - mean) * jax.lax.rsqrt(var + epsilon)).reshape(x.shape)


class _PreActBlock(nn.Module):
  """TFF's basic block: ``[GN, ReLU,] conv3x3, GN, ReLU, conv3x3`` plus a
  shortcut (identity, or conv1x1 + GN when the channels change)."""

  features: int
  normalize_first: bool
  epsilon: float
  fast: bool

  @nn.compact
  def __call__(self, x):
    gn = lambda h: group_norm_cm(h, 2, self.epsilon)
    conv = lambda f, k, name: ConvCM(
      f,
      (k, k),
      1,
      "SAME",
      use_bias=False,
      kernel_init=nn.initializers.he_normal(),
      fast=self.fast,
      name=name,
    )
    y = nn.relu(gn(x)) if self.normalize_first else x
    y = conv(self.features, 3, "conv1")(y)
    y = conv(self.features, 3, "conv2")(nn.relu(gn(y)))
    if x.shape[0] != self.features:
      x = gn(conv(self.features, 1, "conv_short")(x))
    return x + y


class TFFResNet18GN(nn.Module):
  """TFF's ResNet-18 (v2) with group norm (see :func:`resnet18_gn_tff`)."""

  num_classes: int = 100
  input_shape: tuple = (24, 24, 3)
  epsilon: float = 1e-3
  fast: bool = True

  @nn.compact
  def __call__(self, x):
    h = images_cm(x, self.input_shape)  # [C, H, W, N]
    h = ConvCM(
      64,
      (7, 7),
      2,
      "SAME",
      use_bias=False,
      kernel_init=nn.initializers.he_normal(),
      fast=self.fast,
      name="conv_stem",
    )(h)
    h = nn.relu(group_norm_cm(h, 2, self.epsilon))
    h = max_pool_chwn(h, (3, 3), (2, 2), "SAME", self.fast)
    for stage, features in enumerate((64, 128, 256, 512)):
      for b in range(2):
        h = _PreActBlock(
          features,
          not (stage == 0 and b == 0),
          self.epsilon,
          self.fast,
          name=f"stage{stage + 1}_block{b + 1}",
        )(h)
    h = nn.relu(group_norm_cm(h, 2, self.epsilon))
    h = jnp.mean(h, axis=(1, 2))  # [512, N]
    return DenseCM(
      self.num_classes,
      kernel_init=nn.initializers.normal(0.01),
      fast=self.fast,
      name="classifier",
    )(h)


def resnet18_gn_tff(
  input_shape: Sequence[int] = (24, 24, 3),
  num_classes: int = 100,
  *,
  epsilon: float = 1e-3,
  fast: bool = True,
) -> Model:
  """TFF's CIFAR-100 ResNet-18 with group norm
  (``simulation/baselines/cifar100/resnet_models.py``, ``create_resnet18``
  with ``NormLayer.group_norm``; Reddi et al. 2021) as a :class:`Model`.

  ResNet v2 (He et al. 2016, arXiv:1603.05027) as TFF builds it: conv7x7
  stride 2 (64, no bias), GN, ReLU, 3x3 max pooling stride 2 (``SAME``);
  four stages of two basic blocks with 64, 128, 256, 512 channels, where a
  block is ``x + conv3x3(relu(GN(conv3x3(relu(GN(x))))))`` (the very first
  block skips its first GN and ReLU) and the shortcut is a 1x1 convolution
  plus GN where the channels change; all blocks have stride 1 (TFF's
  ``_residual_block`` is called without strides, so a 24x24 crop stays 6x6
  after the stem); a final GN and ReLU, global average pooling and a dense
  layer (Keras' softmax output becomes logits here). Group norm over 2
  groups with epsilon 1e-3 and no scale or offset (:func:`group_norm_cm`,
  TFF's lightweight ``GroupNormalization``). Parameters for 24x24x3 inputs
  and 100 classes: 11,218,212 (convolutions 11,166,912, classifier 51,300).
  :func:`fedjax_lite.models.resnet18_gn` (torchvision's layout: strided
  stages, post-activation blocks, group norm with a scale and offset per
  channel) has as many convolution and classifier parameters plus 9,600 of
  group norm: 11,227,812, and computes another function.

  Args:
    input_shape: one example's ``(H, W, C)`` (CIFAR-100 crops: 24x24x3).
    num_classes: output classes.
    epsilon: group-norm epsilon.
    fast: convolutions and pooling as GEMMs with their own VJPs.
  """
  shape = image_shape(input_shape)
  checks.positive_ints(num_classes=num_classes)
  eps = checks.as_real(epsilon)
  if eps is None or not eps > 0:
    raise ValueError(f"epsilon must be a positive number, got {epsilon!r}.")
  return from_flax(
    TFFResNet18GN(num_classes, shape, eps, fast),
    jnp.zeros((1,) + shape, jnp.float32),
    num_classes=num_classes,
    name=f"resnet18_gn_tff{'x'.join(map(str, shape))}-{num_classes}",
  )


# --------------------------------------------------------------- listing
STANDARD_MODELS: dict[str, tuple[Callable[[], Model], int, str]] = {
  "emnist_cnn": (
    emnist_cnn,
    1_206_590,
    "fedjax/models/emnist.py create_conv_model(only_digits=False)",
  ),
  "emnist_cnn_digits": (
    lambda: emnist_cnn(only_digits=True),
    1_199_882,
    "fedjax/models/emnist.py create_conv_model(only_digits=True)",
  ),
  "stackoverflow_nwp_lstm": (
    stackoverflow_nwp_lstm,
    4_050_748,
    "fedjax/models/stackoverflow.py create_lstm_model; "
    "tensorflow_federated simulation/baselines/stackoverflow",
  ),
  "stackoverflow_tag_lr": (
    stackoverflow_tag_lr,
    5_000_500,
    "tensorflow_federated simulation/baselines/stackoverflow/"
    "tag_prediction_tasks.py",
  ),
  "cifar100_resnet18_gn": (
    resnet18_gn_tff,
    11_218_212,
    "tensorflow_federated simulation/baselines/cifar100/resnet_models.py "
    "create_resnet18((24, 24, 3), 100)",
  ),
  "cifar10_simple_cnn": (
    simple_cnn,
    1_626_442,
    "pfl-research benchmarks/model/pytorch/cnn.py simple_cnn((32, 32, 3), 10)",
  ),
  "shakespeare_lstm": (
    shakespeare_lstm,
    820_522,
    "fedjax/models/shakespeare.py create_lstm_model",
  ),
}
