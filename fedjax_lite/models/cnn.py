r"""Convolutional networks: the FedAvg paper's CNN and pfl-research's CIFAR-10
CNN.

:func:`cnn`: McMahan et al. 2017 (arXiv:1602.05629, Sec. 3): two 5x5
convolutions (32 then 64 channels, ``SAME`` padding, ReLU), each followed by
2x2 max pooling (stride 2), a 512-unit ReLU dense layer and a ``num_classes``
softmax layer. For 28x28x1 inputs and 10 classes it has 1,663,370 parameters,
as in the paper. Shapes are parameters so tests and the 8x8 digits data can
use small versions.

:func:`simple_cnn`: the CNN of pfl-research's CIFAR-10 benchmark (conv3x3
VALID 3->32, ReLU, conv3x3 VALID 32->64, ReLU, 2x2 max pooling, dropout 0.25,
dense ->128, ReLU, dropout 0.5, dense ->classes; Xavier-uniform kernels;
dropout masks from :func:`fedjax_lite.models.conv.dropout_mask`):
1,626,442 parameters for 32x32x3 inputs and 10 classes.

Both keep activations channel-major and batch-last (``[C, H, W, N]``)
between layers and run their convolutions, pooling and first dense layer as
GEMMs with their own VJPs (:mod:`fedjax_lite.models.conv`); ``fast=False``
builds the same function from ``lax.conv_general_dilated``,
``lax.reduce_window`` and autodiff (same parameters, for comparisons).

Shapes: inputs ``[b, H, W, C]`` (or ``[b, H, W]`` / ``[b, H*W*C]``, reshaped to
``input_shape``) -> logits ``[b, num_classes]``.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from fedjax_lite import checks
from fedjax_lite.models.conv import (
  ConvCM,
  DenseCM,
  Dropout,
  image_shape,
  images_cm,
)
from fedjax_lite.models.core import Model, from_flax
from fedjax_lite.models.layers import Dense


class FedAvgCNN(nn.Module):
  """conv5x5(c1)-pool-conv5x5(c2)-pool-dense(hidden)-dense(num_classes).

  The first dense layer reads the pooled map flattened as ``[H', W', C]``
  per example (the order :mod:`fedjax_lite.hetero.layers` expects).
  """

  input_shape: tuple
  num_classes: int
  channels: tuple = (32, 64)
  hidden: int = 512
  kernel_size: int = 5
  fast_grad: bool = True
  fast: bool = True

  @nn.compact
  def __call__(self, x):
    n = x.shape[0]
    h = images_cm(x, self.input_shape)  # [C, H, W, N]
    k = (self.kernel_size, self.kernel_size)
    for i, c in enumerate(self.channels):
      # relu(maxpool(conv) + b) = maxpool(relu(conv + b)) (ConvCM's pool)
      pool = ((2, 2), (2, 2), "SAME")
      conv = ConvCM(
        c, k, padding="SAME", fast=self.fast, pool=pool, name=f"Conv_{i}"
      )
      h = nn.relu(conv(h))
    h = jnp.transpose(h, (1, 2, 0, 3)).reshape(-1, n)  # [H' W' C, N]
    h = DenseCM(self.hidden, fast=self.fast_grad, name="Dense_0")(h)
    h = nn.relu(h)
    return Dense(self.num_classes, fast_grad=self.fast_grad, name="Dense_1")(h)


def conv_pool_dropout(h, *, kernel_init, fast: bool, train: bool):
  """The convolutions of :class:`SimpleCNN` and FedJAX's EMNIST CNN.

  conv3x3 ``VALID`` ->32 (``Conv_0``), ReLU, conv3x3 ``VALID`` ->64
  (``Conv_1``) with 2x2 max pooling (stride 2), ReLU, dropout 0.25 (active
  when ``train``). Call it inside a ``nn.compact`` method: the layers
  become the caller's submodules. ``h``: ``[C, H, W, N]`` -> ``[64, H', W',
  N]``.
  """
  conv = lambda c, i, pool=None: ConvCM(
    c,
    (3, 3),
    padding="VALID",
    kernel_init=kernel_init,
    fast=fast,
    pool=pool,
    name=f"Conv_{i}",
  )
  h = nn.relu(conv(32, 0)(h))
  # relu(maxpool(conv) + b) = maxpool(relu(conv + b)): the bias and the
  # ReLU act on the pooled map (ConvCM's pool).
  h = nn.relu(conv(64, 1, ((2, 2), (2, 2), "VALID"))(h))
  return Dropout(0.25, deterministic=not train)(h)


class SimpleCNN(nn.Module):
  """pfl-research's CIFAR-10 CNN (see the module docstring).

  The dense layer reads the pooled map flattened as ``[C, H', W']`` per
  example, as PyTorch flattens NCHW maps.
  """

  input_shape: tuple = (32, 32, 3)
  num_classes: int = 10
  fast: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    n = x.shape[0]
    h = images_cm(x, self.input_shape)  # [C, H, W, N]
    xavier = nn.initializers.xavier_uniform()
    h = conv_pool_dropout(h, kernel_init=xavier, fast=self.fast, train=train)
    dense = DenseCM(128, kernel_init=xavier, fast=self.fast, name="Dense_0")
    h = Dropout(0.5, deterministic=not train)(nn.relu(dense(h.reshape(-1, n))))
    return Dense(self.num_classes, kernel_init=xavier, name="Dense_1")(h)


def cnn(
  input_shape: Sequence[int] = (28, 28, 1),
  num_classes: int = 10,
  *,
  channels: Sequence[int] = (32, 64),
  hidden: int = 512,
  kernel_size: int = 5,
  fast_grad: bool = True,
  fast: bool = True,
) -> Model:
  """The FedAvg CNN as a :class:`Model` (inputs under ``"x"``, labels ``"y"``).

  Args:
    input_shape: one example's ``(H, W, C)``; a 2-tuple gets one channel.
    num_classes: output classes.
    channels: output channels of the two convolutions (paper: 32, 64).
    hidden: units of the dense layer (paper: 512).
    kernel_size: convolution window (paper: 5).
    fast_grad: dense layers use the fast weight-gradient layout.
    fast: convolutions and pooling as GEMMs with their own VJPs (False: the
      same function through ``lax.conv_general_dilated`` and autodiff).
  """
  shape = tuple(int(s) for s in input_shape)
  if len(shape) == 2:
    shape = shape + (1,)
  if len(shape) != 3 or min(shape) < 1:
    raise ValueError(
      f"input_shape must be (H, W) or (H, W, C) with positive "
      f"sizes, got {tuple(input_shape)!r}."
    )
  checks.positive_ints(
    num_classes=num_classes, hidden=hidden, kernel_size=kernel_size
  )
  chans = tuple(int(c) for c in channels)
  if not chans or min(chans) < 1:
    raise ValueError(f"channels must be positive ints, got {tuple(channels)}.")
  module = FedAvgCNN(
    shape, num_classes, chans, hidden, kernel_size, fast_grad, fast
  )
  dims = "x".join(str(s) for s in shape)
  return from_flax(
    module,
    jnp.zeros((1,) + shape, jnp.float32),
    num_classes=num_classes,
    name=f"cnn{dims}-c{'-'.join(map(str, chans))}-d{hidden}",
  )


def simple_cnn(
  input_shape: Sequence[int] = (32, 32, 3),
  num_classes: int = 10,
  *,
  fast: bool = True,
) -> Model:
  """pfl-research's CIFAR-10 CNN as a :class:`Model` (dropout in training:
  pass an rng to ``apply``; the engine does).

  Args:
    input_shape: one example's ``(H, W, C)`` (at least 6x6).
    num_classes: output classes.
    fast: convolutions, pooling and the first dense layer as GEMMs with
      their own VJPs (False: ``lax`` convolutions and autodiff).
  """
  shape = image_shape(input_shape, min_size=6)
  checks.positive_ints(num_classes=num_classes)
  return dropout_image_model(
    SimpleCNN(shape, num_classes, fast), "simple_cnn", shape, num_classes
  )


def dropout_image_model(
  module: nn.Module, prefix: str, shape: tuple, num_classes: int
) -> Model:
  """An image classifier with dropout (``module``'s ``apply`` takes
  ``train``) as a :class:`Model` named ``<prefix><H>x<W>x<C>-<classes>``,
  for inputs ``shape = (H, W, C)``."""
  return from_flax(
    module,
    jnp.zeros((1,) + shape, jnp.float32),
    num_classes=num_classes,
    rng_collections=("dropout",),
    name=f"{prefix}{'x'.join(map(str, shape))}-{num_classes}",
  )
