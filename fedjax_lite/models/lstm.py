r"""The LEAF Shakespeare character LSTM (Caldas et al. 2018, arXiv:1812.01097).

An 8-dimensional character embedding, two stacked LSTM layers of 256 units
(``flax.linen.OptimizedLSTMCell`` run by ``flax.linen.RNN``, a ``lax.scan``
over time) and a dense layer from the last time step's output to the logits of
the next character (FedAvg's Shakespeare model, McMahan et al. 2017, has the
same shape). Per layer and time step ``t``:

.. math::
   [i, f, g, o] = [x_t, h_{t-1}] W + b,\quad
   c_t = \sigma(f) c_{t-1} + \sigma(i) \tanh(g),\quad
   h_t = \sigma(o) \tanh(c_t).

The forget-gate bias starts at ``forget_bias = 1`` (LEAF's TensorFlow
``BasicLSTMCell`` adds 1 to it; starting the trainable bias at 1 gives the same
function and gradients). The embedding is a one-hot matrix product (the same
numbers as a table lookup), so its gradient is a dense product rather than a
scatter inside vmapped rounds.

Shapes: inputs int ``[b, T]`` character indices (any integer dtype) -> logits
``[b, vocab_size]``.
"""

from __future__ import annotations

from typing import Sequence

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_lite import checks
from fedjax_lite.models.core import Model, from_flax
from fedjax_lite.models.layers import Dense


class CharLSTM(nn.Module):
  """Embedding -> stacked LSTMs -> dense on the last output."""

  vocab_size: int = 80
  embed_dim: int = 8
  hidden: tuple = (256, 256)
  fast_grad: bool = True

  @nn.compact
  def __call__(self, x):
    table = self.param(
      "embedding",
      nn.initializers.xavier_uniform(),
      (self.vocab_size, self.embed_dim),
      jnp.float32,
    )
    onehot = jax.nn.one_hot(
      x.astype(jnp.int32), self.vocab_size, dtype=jnp.float32
    )  # [b, T, V]
    h = onehot @ table  # [b, T, E]
    for units in self.hidden:
      h = nn.RNN(nn.OptimizedLSTMCell(units))(h)  # [b, T, H]
    return Dense(self.vocab_size, fast_grad=self.fast_grad)(h[:, -1])


def char_lstm(
  vocab_size: int = 80,
  seq_len: int = 80,
  *,
  embed_dim: int = 8,
  hidden: Sequence[int] = (256, 256),
  forget_bias: float = 1.0,
  fast_grad: bool = True,
) -> Model:
  """The LEAF Shakespeare LSTM as a :class:`Model`.

  Args:
    vocab_size: characters (LEAF: 80); also the number of classes.
    seq_len: input length (LEAF: 80); only used to initialise.
    embed_dim: embedding size (LEAF: 8).
    hidden: units of each stacked LSTM layer (LEAF: 256, 256).
    forget_bias: initial forget-gate bias of every layer (LEAF: 1).
    fast_grad: the output layer uses the fast weight-gradient layout.
  """
  checks.positive_ints(
    vocab_size=vocab_size, seq_len=seq_len, embed_dim=embed_dim
  )
  units = tuple(int(h) for h in hidden)
  if not units or min(units) < 1:
    raise ValueError(
      f"hidden must be positive layer sizes, got {tuple(hidden)!r}."
    )
  module = CharLSTM(vocab_size, embed_dim, units, fast_grad)
  model = from_flax(
    module,
    jnp.zeros((1, seq_len), jnp.int32),
    num_classes=vocab_size,
    name=f"char_lstm{vocab_size}-e{embed_dim}-{'x'.join(map(str, units))}",
  )
  base_init = model.init

  def init(rng):
    params = dict(base_init(rng))
    for i in range(len(units)):
      cell = dict(params[f"OptimizedLSTMCell_{i}"])
      cell["hf"] = {**cell["hf"], "bias": cell["hf"]["bias"] + forget_bias}
      params[f"OptimizedLSTMCell_{i}"] = cell
    return params

  return dataclasses.replace(model, init=init)
