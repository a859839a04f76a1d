r"""ResNet-18 with group normalization (He et al. 2016; Hsieh et al. 2020).

The ImageNet layout of ResNet-18 (a 7x7 stride-2 convolution to 64 channels,
3x3 stride-2 max pooling, four stages of two basic blocks with 64, 128, 256
and 512 channels and strides 1, 2, 2, 2, global average pooling and a dense
classifier) with every batch normalization replaced by group normalization
over 2 groups, as Reddi et al. 2021 ("Adaptive Federated Optimization",
arXiv:2003.00295) train it on federated CIFAR-100's 24x24 crops. A basic
block is

.. math::
   y = \mathrm{relu}\big(\mathrm{GN}(W_2 * \mathrm{relu}(\mathrm{GN}(W_1 * x)))
       + s(x)\big),

with ``s`` the identity, or a 1x1 strided convolution plus GN where the
shape changes. Convolutions have no bias (GN carries one). Group norm over
``G`` groups of a ``[C, H, W, N]`` map normalizes each example's group of
``C / G`` channels over the group's channels and all positions, then scales
and shifts per channel (epsilon ``1e-5``).

Activations stay channel-major and batch-last between layers; convolutions
and pooling run as GEMMs (:mod:`fedjax_lite.models.conv`).

Shapes: inputs ``[b, H, W, C]`` -> logits ``[b, num_classes]``.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from fedjax_lite import checks
from fedjax_lite.models.conv import (
  ConvCM,
  DenseCM,
  max_pool_chwn,
  image_shape,
  images_cm,
)
from fedjax_lite.models.core import Model, from_flax


class GroupNormCM(nn.Module):
  """Group normalization of ``[C, H, W, N]`` maps (parameters ``scale`` and
  ``bias`` ``[C]``, as ``flax.linen.GroupNorm``)."""

  num_groups: int = 2
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x):
    c = x.shape[0]
    if c % self.num_groups:
      raise ValueError(
        f"GroupNormCM: {c} channels do not split into {self.num_groups} groups."
      )
    g = x.reshape((self.num_groups, c // self.num_groups) + x.shape[1:])
    mean = jnp.mean(g, axis=(1, 2, 3), keepdims=True)
    var = jnp.mean(jnp.square(g - mean), axis=(1, 2, 3), keepdims=True)
    g = (g - mean) * jnp.reciprocal(jnp.sqrt(var + self.epsilon))
    scale = self.param("scale", nn.initializers.ones_init(), (c,))
    bias = self.param("bias", nn.initializers.zeros_init(), (c,))
    return (
      g.reshape(x.shape) * scale[:, None, None, None]
      + bias[:, None, None, None]
    )


class BasicBlock(nn.Module):
  features: int
  strides: int = 1
  fast: bool = True

  @nn.compact
  def __call__(self, x):
    conv = lambda f, k, s, name: ConvCM(
      f, (k, k), s, "SAME", use_bias=False, fast=self.fast, name=name
    )
    y = nn.relu(
      GroupNormCM(name="gn1")(conv(self.features, 3, self.strides, "conv1")(x))
    )
    y = GroupNormCM(name="gn2")(conv(self.features, 3, 1, "conv2")(y))
    if self.strides != 1 or x.shape[0] != self.features:
      x = GroupNormCM(name="gn_short")(
        conv(self.features, 1, self.strides, "conv_short")(x)
      )
    return nn.relu(y + x)


class ResNet18GN(nn.Module):
  """ResNet-18 with group norm (see the module docstring)."""

  num_classes: int = 100
  input_shape: tuple = (24, 24, 3)
  fast: bool = True

  @nn.compact
  def __call__(self, x):
    h = images_cm(x, self.input_shape)  # [C, H, W, N]
    h = ConvCM(
      64, (7, 7), 2, "SAME", use_bias=False, fast=self.fast, name="conv_stem"
    )(h)
    h = nn.relu(GroupNormCM(name="gn_stem")(h))
    h = max_pool_chwn(h, (3, 3), (2, 2), "SAME", self.fast)
    for stage, (features, strides) in enumerate(
      ((64, 1), (128, 2), (256, 2), (512, 2))
    ):
      for b in range(2):
        h = BasicBlock(
          features,
          strides if b == 0 else 1,
          self.fast,
          name=f"stage{stage + 1}_block{b + 1}",
        )(h)
    h = jnp.mean(h, axis=(1, 2))  # [512, N]
    return DenseCM(self.num_classes, fast=self.fast, name="classifier")(h)


def resnet18_gn(
  input_shape: Sequence[int] = (24, 24, 3),
  num_classes: int = 100,
  *,
  fast: bool = True,
) -> Model:
  """ResNet-18 with group norm as a :class:`Model`.

  Args:
    input_shape: one example's ``(H, W, C)`` (CIFAR-100 crops: 24x24x3).
    num_classes: output classes.
    fast: convolutions and pooling as GEMMs with their own VJPs (False:
      ``lax`` convolutions and autodiff).
  """
  shape = image_shape(input_shape)
  checks.positive_ints(num_classes=num_classes)
  return from_flax(
    ResNet18GN(num_classes, shape, fast),
    jnp.zeros((1,) + shape, jnp.float32),
    num_classes=num_classes,
    name=f"resnet18_gn{'x'.join(map(str, shape))}-{num_classes}",
  )
