r"""The FedAvg paper's CNN (McMahan et al. 2017, arXiv:1602.05629, Sec. 3).

Two 5x5 convolutions (32 then 64 channels, ``SAME`` padding, ReLU), each
followed by 2x2 max pooling (stride 2), a 512-unit ReLU dense layer and a
``num_classes`` softmax layer. For 28x28x1 inputs and 10 classes it has
1,663,370 parameters, as in the paper. Shapes are parameters so tests and the
8x8 digits data can use small versions.

Shapes: inputs ``[b, H, W, C]`` (or ``[b, H, W]`` / ``[b, H*W*C]``, reshaped to
``input_shape``) -> logits ``[b, num_classes]``.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from fedjax_lite import checks
from fedjax_lite.models.core import Model, from_flax
from fedjax_lite.models.layers import Dense


class FedAvgCNN(nn.Module):
  """conv5x5(c1)-pool-conv5x5(c2)-pool-dense(hidden)-dense(num_classes)."""

  input_shape: tuple
  num_classes: int
  channels: tuple = (32, 64)
  hidden: int = 512
  kernel_size: int = 5
  fast_grad: bool = True

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0],) + tuple(self.input_shape)).astype(jnp.float32)
    for c in self.channels:
      x = nn.Conv(c, (self.kernel_size, self.kernel_size), padding="SAME")(x)
      x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2), padding="SAME")
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(Dense(self.hidden, fast_grad=self.fast_grad)(x))
    return Dense(self.num_classes, fast_grad=self.fast_grad)(x)


def cnn(
  input_shape: Sequence[int] = (28, 28, 1),
  num_classes: int = 10,
  *,
  channels: Sequence[int] = (32, 64),
  hidden: int = 512,
  kernel_size: int = 5,
  fast_grad: bool = True,
) -> Model:
  """The FedAvg CNN as a :class:`Model` (inputs under ``"x"``, labels ``"y"``).

  Args:
    input_shape: one example's ``(H, W, C)``; a 2-tuple gets one channel.
    num_classes: output classes.
    channels: output channels of the two convolutions (paper: 32, 64).
    hidden: units of the dense layer (paper: 512).
    kernel_size: convolution window (paper: 5).
    fast_grad: dense layers use the fast weight-gradient layout.
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
  module = FedAvgCNN(shape, num_classes, chans, hidden, kernel_size, fast_grad)
  dims = "x".join(str(s) for s in shape)
  return from_flax(
    module,
    jnp.zeros((1,) + shape, jnp.float32),
    num_classes=num_classes,
    name=f"cnn{dims}-c{'-'.join(map(str, chans))}-d{hidden}",
  )
