"""Logistic regression and multilayer perceptrons."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_lite import checks
from fedjax_lite.models.core import Model, from_flax
from fedjax_lite.models.layers import Dense


class _LogReg(nn.Module):
  num_classes: int
  fast_grad: bool = True

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    return Dense(
      self.num_classes,
      fast_grad=self.fast_grad,
      kernel_init=nn.initializers.zeros_init(),
    )(x)


class _MLP(nn.Module):
  hidden: Sequence[int]
  num_classes: int
  fast_grad: bool = True

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for h in self.hidden:
      x = nn.relu(Dense(h, fast_grad=self.fast_grad)(x))
    return Dense(self.num_classes, fast_grad=self.fast_grad)(x)


def logistic_regression(
  num_features: int, num_classes: int, *, fast_grad: bool = True
) -> Model:
  """Multinomial logistic regression ``softmax(x W + b)`` (zero init)."""
  checks.positive_ints(num_features=num_features, num_classes=num_classes)
  return from_flax(
    _LogReg(num_classes, fast_grad),
    jnp.zeros((1, num_features), jnp.float32),
    num_classes=num_classes,
    name=f"logreg{num_features}x{num_classes}",
  )


def mlp(
  num_features: int,
  num_classes: int,
  hidden: Sequence[int] = (200, 200),
  *,
  fast_grad: bool = True,
) -> Model:
  """ReLU MLP, e.g. the FedAvg paper's "2NN" ``784-200-200-C``."""
  checks.positive_ints(num_features=num_features, num_classes=num_classes)
  if any(int(h) < 1 for h in hidden):
    raise ValueError(f"hidden sizes must be positive, got {tuple(hidden)}.")
  dims = "-".join(str(d) for d in (num_features, *hidden, num_classes))
  return from_flax(
    _MLP(tuple(int(h) for h in hidden), num_classes, fast_grad),
    jnp.zeros((1, num_features), jnp.float32),
    num_classes=num_classes,
    name=f"mlp{dims}",
  )


def dense_flops_per_example(params) -> int:
  """Training FLOPs per example for a stack of dense layers (6 x MACs).

  Forward 2 x MACs, backward 4 x MACs (weight and input gradients): the usual
  convention, also used by the benchmark workloads' published numbers.
  """
  macs = 0
  for leaf in jax.tree.leaves(params):
    if leaf.ndim == 2:
      macs += leaf.shape[0] * leaf.shape[1]
  return 6 * macs
