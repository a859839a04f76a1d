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

Each layer runs as :func:`lstm_layer`, a scan with its own VJP: the input
projections of all time steps are one GEMM before the scan, the backward
scan only carries ``(dh, dc)``, and the weight gradients are one GEMM each
over all time steps (``dW_h = \sum_t h_{t-1}^\top dz_t``,
``dW_x = \sum_t x_t^\top dz_t``) instead of a read-modify-write of both
weight matrices at every step, as autodiff of a scan does. ``fast=False``
uses ``flax.linen.OptimizedLSTMCell`` under ``nn.RNN`` (same parameters).

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

from flax.linen.recurrent import DenseParams

from fedjax_lite import checks
from fedjax_lite.models.conv import materialize
from fedjax_lite.models.core import Model, from_flax
from fedjax_lite.models.layers import Dense


def _lstm_forward(x, w_x, w_h, b):
  """Time-major ``x [T, B, I]`` -> ``(h [T, B, H], c [T, B, H], gates
  [T, B, 4H])`` from zero state; gate order ``i, f, g, o``."""
  t_len, batch, _ = x.shape
  hidden = w_h.shape[0]
  xz = (x.reshape(t_len * batch, -1) @ w_x + b[None]).reshape(t_len, batch, -1)

  def step(carry, xz_t):
    c, h = carry
    z = xz_t + h @ w_h
    i, f, g, o = jnp.split(z, 4, axis=-1)
    i, f, o = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jax.nn.sigmoid(o)
    g = jnp.tanh(g)
    c = f * c + i * g
    h = o * jnp.tanh(c)
    return (c, h), (h, c, jnp.concatenate([i, f, g, o], axis=-1))

  zero = jnp.zeros((batch, hidden), x.dtype)
  _, (hs, cs, gates) = jax.lax.scan(step, (zero, zero), xz)
  return hs, cs, gates


@jax.custom_vjp
def lstm_layer(x, w_x, w_h, b):
  r"""One LSTM layer over a sequence, from zero state.

  .. math::
     z_t = x_t W_x + h_{t-1} W_h + b,\quad
     [i, f, g, o] = [\sigma, \sigma, \tanh, \sigma](z_t),\quad
     c_t = f c_{t-1} + i g,\quad h_t = o \tanh(c_t).

  Shapes: ``x [T, B, I]`` (time-major), ``w_x [I, 4H]``, ``w_h [H, 4H]``,
  ``b [4H]`` -> ``h [T, B, H]``.
  """
  return _lstm_forward(x, w_x, w_h, b)[0]


def _lstm_fwd(x, w_x, w_h, b):
  hs, cs, gates = _lstm_forward(x, w_x, w_h, b)
  return hs, (x, w_x, w_h, hs, cs, gates)


def _lstm_bwd(res, dhs):
  x, w_x, w_h, hs, cs, gates = res
  t_len, batch, _ = x.shape
  zero = jnp.zeros_like(hs[0])
  # W_h^T once, in the layout of the per-step product (a GEMM with the
  # transposed operand runs at half speed on CPU).
  w_h_t = materialize(w_h.T)
  c_prev = jnp.concatenate([zero[None], cs[:-1]])

  def step(carry, inp):
    dh_next, dc_next = carry
    dh_t, c_t, c_p, gate = inp
    i, f, g, o = jnp.split(gate, 4, axis=-1)
    tc = jnp.tanh(c_t)
    dh = dh_t + dh_next
    dc = dc_next + dh * o * (1 - tc * tc)
    dz = jnp.concatenate(
      [
        dc * g * i * (1 - i),
        dc * c_p * f * (1 - f),
        dc * i * (1 - g * g),
        dh * tc * o * (1 - o),
      ],
      axis=-1,
    )
    return (dz @ w_h_t, dc * f), dz

  _, dz = jax.lax.scan(
    step, (zero, zero), (dhs, cs, c_prev, gates), reverse=True
  )
  dz2 = dz.reshape(t_len * batch, -1)
  h_prev = jnp.concatenate([zero[None], hs[:-1]]).reshape(t_len * batch, -1)
  dw_h = h_prev.T @ dz2
  dw_x = x.reshape(t_len * batch, -1).T @ dz2
  dx = (dz2 @ w_x.T).reshape(x.shape)
  # the bias gradient as a GEMV (XLA's CPU reduction of [T B, 4H] over its
  # first axis is several times slower)
  db = (jnp.ones((1, t_len * batch), dz2.dtype) @ dz2)[0]
  return dx, dw_x, dw_h, db


lstm_layer.defvjp(_lstm_fwd, _lstm_bwd)


class FastLSTM(nn.Module):
  """An LSTM layer on :func:`lstm_layer` with the parameters of
  ``flax.linen.OptimizedLSTMCell`` (``ii .. io`` input kernels, ``hi .. ho``
  recurrent kernels and biases; same initializers). ``[B, T, I] -> [B, T,
  H]``."""

  features: int

  @nn.compact
  def __call__(self, x):
    kernels, biases, recurrent = [], [], []
    for gate in "ifgo":
      k, _ = DenseParams(
        self.features,
        use_bias=False,
        kernel_init=nn.initializers.lecun_normal(),
        name=f"i{gate}",
      )(x)
      r, b = DenseParams(
        self.features,
        kernel_init=nn.initializers.orthogonal(),
        name=f"h{gate}",
      )(jnp.zeros(x.shape[:1] + (self.features,), x.dtype))
      kernels.append(k)
      recurrent.append(r)
      biases.append(b)
    w_x = jnp.concatenate(kernels, axis=-1)
    w_h = jnp.concatenate(recurrent, axis=-1)
    b = jnp.concatenate(biases)
    hs = lstm_layer(jnp.swapaxes(x, 0, 1), w_x, w_h, b)
    return jnp.swapaxes(hs, 0, 1)


class CharLSTM(nn.Module):
  """Embedding -> stacked LSTMs -> dense on the last output."""

  vocab_size: int = 80
  embed_dim: int = 8
  hidden: tuple = (256, 256)
  fast_grad: bool = True
  fast: bool = True

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
    for i, units in enumerate(self.hidden):
      if self.fast:
        h = FastLSTM(units, name=f"OptimizedLSTMCell_{i}")(h)  # [b, T, H]
      else:
        h = nn.RNN(nn.OptimizedLSTMCell(units))(h)
    return Dense(self.vocab_size, fast_grad=self.fast_grad)(h[:, -1])


def char_lstm(
  vocab_size: int = 80,
  seq_len: int = 80,
  *,
  embed_dim: int = 8,
  hidden: Sequence[int] = (256, 256),
  forget_bias: float = 1.0,
  fast_grad: bool = True,
  fast: bool = True,
) -> Model:
  """The LEAF Shakespeare LSTM as a :class:`Model`.

  Args:
    vocab_size: characters (LEAF: 80); also the number of classes.
    seq_len: input length (LEAF: 80); only used to initialise.
    embed_dim: embedding size (LEAF: 8).
    hidden: units of each stacked LSTM layer (LEAF: 256, 256).
    forget_bias: initial forget-gate bias of every layer (LEAF: 1).
    fast_grad: the output layer uses the fast weight-gradient layout.
    fast: LSTM layers on :func:`lstm_layer` (False: flax's
      ``OptimizedLSTMCell`` under ``nn.RNN``, autodiff; same parameters).
  """
  checks.positive_ints(
    vocab_size=vocab_size, seq_len=seq_len, embed_dim=embed_dim
  )
  units = tuple(int(h) for h in hidden)
  if not units or min(units) < 1:
    raise ValueError(
      f"hidden must be positive layer sizes, got {tuple(hidden)!r}."
    )
  module = CharLSTM(vocab_size, embed_dim, units, fast_grad, fast)
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
