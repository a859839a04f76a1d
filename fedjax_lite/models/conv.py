r"""Convolution and max pooling whose passes are large matrix products.

XLA's CPU convolutions are slow for the shapes of client training (a kernel
gradient of a 3x3 convolution ran at 0.1-3 GFLOP/s where a GEMM of the same
size runs at ~90 GFLOP/s on one core), and vmapping clients turns them into
grouped convolutions. Here a 2-D convolution is im2col plus GEMMs in a
channel-major, batch-last layout ``[C, H, W, N]``, with its own VJP:

.. math::
   P = \mathrm{im2col}(x) \in \mathbb{R}^{k_h k_w C \times H_o W_o N},\quad
   y = W^\top P,\quad
   \frac{\partial L}{\partial W} = P\, g^\top,\quad
   \frac{\partial L}{\partial x} = \mathrm{col2im}(W g),

with ``W`` the kernel as a ``[k_h k_w C, O]`` matrix and ``g = dL/dy`` of
shape ``[O, H_o W_o N]``. The three products are GEMMs whose long dimension
is the pixel axis ``H_o W_o N``; im2col stacks the ``k_h k_w`` shifted
(strided) views of the padded input, and col2im adds the gradient's views
back with (interior) padding. Tests compare values and gradients with
``jax.lax.conv_general_dilated`` and ``jax.lax.reduce_window``.

Layouts: :func:`conv2d_cm` and :func:`max_pool_cm` take ``[C, H, W, N]``
activations (the built-in CNNs keep that layout between layers: no
transposes, and a following dense layer reads ``[C H W, N]`` directly, see
:func:`dense_cm`). :func:`conv2d` takes ``[N, H, W, C]`` like flax and
transposes at its boundary; :func:`max_pool` pools ``[..., H, W, C]`` in
place. :func:`conv_general_dilated` is a drop-in for
``lax.conv_general_dilated`` (``flax.linen.Conv(...,
conv_general_dilated=fl.models.conv_general_dilated)``, which is
:class:`Conv`) that takes this path for 2-D NHWC/HWIO convolutions without
dilation or groups and falls back to XLA's otherwise.

Forward-mode differentiation (``jax.jvp``, Hessians) does not go through the
custom VJPs; use ``lax.conv_general_dilated`` / ``nn.max_pool`` for that.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_H, _W = 1, 2  # spatial axes of [C, H, W, N]


def _pair(name: str, value: Any) -> tuple[int, int]:
  if isinstance(value, int) and not isinstance(value, bool):
    value = (value, value)
  value = tuple(value)
  if len(value) != 2 or not all(
    isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value
  ):
    raise ValueError(f"{name} must be 2 positive ints, got {value!r}.")
  return value


def _explicit_pads(padding, in_hw, window, strides) -> tuple:
  """``((lo_h, hi_h), (lo_w, hi_w))`` for "SAME"/"VALID" or explicit pads."""
  if isinstance(padding, str):
    name = padding.upper()
    if name not in ("SAME", "VALID"):
      raise ValueError(
        f"padding must be 'SAME', 'VALID' or ((lo, hi), (lo, hi)), got "
        f"{padding!r}."
      )
    return tuple(
      (int(lo), int(hi))
      for lo, hi in lax.padtype_to_pads(in_hw, window, strides, name)
    )
  try:
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  except (TypeError, ValueError):
    pads = ()
  if len(pads) != 2 or min(min(p) for p in pads) < 0:
    raise ValueError(
      f"padding must be 'SAME', 'VALID' or ((lo, hi), (lo, hi)) with pads "
      f">= 0, got {padding!r}."
    )
  return pads


def _out_hw(in_hw, pads, window, strides) -> tuple[int, int]:
  out = tuple(
    (s + p[0] + p[1] - k) // st + 1
    for s, p, k, st in zip(in_hw, pads, window, strides)
  )
  if min(out) < 1:
    raise ValueError(
      f"a {window[0]}x{window[1]} window with padding {pads} does not fit "
      f"inputs of spatial size {tuple(in_hw)}."
    )
  return out


def materialize(x):
  """``x``, computed once into a buffer that later ops read.

  XLA on CPU fuses elementwise producers into every consumer, recomputing
  them (e.g. a bias, ReLU, dropout and pooling mask once per window offset
  of an im2col, or once more for a transposed copy), and expands
  ``optimization_barrier`` before fusion; a conditional's operand is always
  a buffer. The predicate depends on ``x`` so the conditional is not folded
  away (both branches return ``x``). Under ``vmap`` the conditional becomes
  a select of two equal values (still ``x``, without the barrier).
  """
  flat = x.reshape(-1)
  same = jnp.logical_not if x.dtype == jnp.bool_ else jnp.negative
  return lax.cond(flat[0] == flat[0], lambda a: a, lambda a: same(same(a)), x)


def _pad(x, pads, axes, value=0.0):
  cfg = [(0, 0, 0)] * x.ndim
  for a, (lo, hi) in zip(axes, pads):
    cfg[a] = (lo, hi, 0)
  return lax.pad(x, jnp.asarray(value, x.dtype), cfg)


def _views(xp, window, strides, out_hw, axes):
  """The ``k_h k_w`` strided views of ``xp`` (window offsets row-major)
  with spatial size ``out_hw`` on ``axes``."""
  views = []
  for i in range(window[0]):
    for j in range(window[1]):
      start, limit, step = [0] * xp.ndim, list(xp.shape), [1] * xp.ndim
      for a, off, st, n in zip(axes, (i, j), strides, out_hw):
        start[a], limit[a], step[a] = off, off + st * (n - 1) + 1, st
      views.append(lax.slice(xp, start, limit, step))
  return views


def _unviews(parts, window, strides, padded_hw, axes):
  """Adjoint of :func:`_views`: adds every view's gradient (``parts[q]``)
  back into a zero array of the padded input's spatial size."""
  zero = jnp.zeros((), parts[0].dtype)
  total = None
  for q, part in enumerate(parts):
    cfg = [(0, 0, 0)] * part.ndim
    for a, off, st, n in zip(axes, divmod(q, window[1]), strides, padded_hw):
      span = st * (part.shape[a] - 1) + 1
      cfg[a] = (off, n - off - span, st - 1)
    piece = lax.pad(part, zero, cfg)
    total = piece if total is None else total + piece
  return total


def _crop(x, pads, hw, axes):
  start, limit = [0] * x.ndim, list(x.shape)
  for a, (lo, _), n in zip(axes, pads, hw):
    start[a], limit[a] = lo, lo + n
  return lax.slice(x, start, limit)


# ------------------------------------------------------------- convolution
def _patches(x, window, strides, pads):
  """im2col of ``x [C, H, W, N]``: ``[k_h k_w C, H_o W_o N]``."""
  out_hw = _out_hw(x.shape[_H : _W + 1], pads, window, strides)
  xp = materialize(_pad(x, pads, (_H, _W)))
  views = _views(xp, window, strides, out_hw, (_H, _W))
  # One concatenation of the views (each a strided copy of the input): its
  # operands are contiguous blocks of the result.
  return jnp.stack(views).reshape(len(views) * x.shape[0], -1), out_hw


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_cm(x, kernel, strides, pads):
  return _conv_cm_fwd(x, kernel, strides, pads)[0]


def _conv_cm_fwd(x, kernel, strides, pads):
  o = kernel.shape[-1]
  p, out_hw = _patches(x, kernel.shape[:2], strides, pads)
  y = (kernel.reshape(-1, o).T @ p).reshape((o,) + out_hw + x.shape[-1:])
  return y, (x, kernel)


def _conv_cm_bwd(strides, pads, res, g):
  x, kernel = res
  kh, kw, c, o = kernel.shape
  p, _ = _patches(x, (kh, kw), strides, pads)
  g2 = materialize(g).reshape(o, -1)  # [O, Ho*Wo*N]
  # [O, K] = g p^T reads g and p where they are (no transposed copy of g,
  # whose producer XLA would recompute into the copy).
  dkernel = (g2 @ p.T).T.reshape(kernel.shape)
  dp = (kernel.reshape(-1, o) @ g2).reshape((kh * kw, c) + g.shape[1:])
  padded = tuple(s + lo + hi for s, (lo, hi) in zip(x.shape[_H : _W + 1], pads))
  dxp = _unviews(list(dp), (kh, kw), strides, padded, (_H, _W))
  return _crop(dxp, pads, x.shape[_H : _W + 1], (_H, _W)), dkernel


_conv_cm.defvjp(_conv_cm_fwd, _conv_cm_bwd)


def conv2d_cm(
  x: jax.Array,
  kernel: jax.Array,
  strides: int | Sequence[int] = 1,
  padding: str | Sequence[tuple[int, int]] = "VALID",
) -> jax.Array:
  """2-D convolution (cross-correlation, as ``lax.conv_general_dilated``)
  of channel-major, batch-last ``x [C, H, W, N]``.

  Args:
    x: inputs ``[C, H, W, N]``.
    kernel: ``[k_h, k_w, C, O]`` (flax's HWIO layout).
    strides: window strides (an int or 2 ints).
    padding: ``"SAME"``, ``"VALID"`` or ``((lo_h, hi_h), (lo_w, hi_w))``.

  Returns:
    ``[O, H_o, W_o, N]``.
  """
  if x.ndim != 4 or kernel.ndim != 4:
    raise ValueError(
      f"conv2d_cm expects x [C, H, W, N] and kernel [kh, kw, C, O], got "
      f"shapes {x.shape} and {kernel.shape}."
    )
  if kernel.shape[2] != x.shape[0]:
    raise ValueError(
      f"kernel [kh, kw, C, O] has C={kernel.shape[2]} but x [C, H, W, N] "
      f"has C={x.shape[0]}."
    )
  strides = _pair("strides", strides)
  window = kernel.shape[:2]
  pads = _explicit_pads(padding, x.shape[_H : _W + 1], window, strides)
  _out_hw(x.shape[_H : _W + 1], pads, window, strides)
  return _conv_cm(x, kernel, strides, pads)


def to_channel_major(x: jax.Array) -> jax.Array:
  """``[N, H, W, C] -> [C, H, W, N]``."""
  return jnp.transpose(x, (3, 1, 2, 0))


def images_cm(x: jax.Array, input_shape: Sequence[int]) -> jax.Array:
  """A batch of images (``[N, ...]``, reshaped to ``[N, *input_shape]``)
  as float32 ``[C, H, W, N]``."""
  x = x.reshape((x.shape[0],) + tuple(input_shape)).astype(jnp.float32)
  return to_channel_major(x)


def image_shape(input_shape: Sequence[int], min_size: int = 1) -> tuple:
  """``(H, W, C)`` as ints, checked: H, W >= ``min_size`` and C >= 1."""
  shape = tuple(int(s) for s in input_shape)
  if len(shape) != 3 or min(shape[:2]) < min_size or shape[2] < 1:
    raise ValueError(
      f"input_shape must be (H, W, C) with H, W >= {min_size} and C >= 1, "
      f"got {tuple(input_shape)!r}."
    )
  return shape


def to_channel_last(x: jax.Array) -> jax.Array:
  """``[C, H, W, N] -> [N, H, W, C]``."""
  return jnp.transpose(x, (3, 1, 2, 0))


def conv2d(x, kernel, strides=1, padding="VALID") -> jax.Array:
  """:func:`conv2d_cm` for ``x [N, H, W, C]``: returns ``[N, H_o, W_o, O]``
  (two transposes around the channel-major convolution)."""
  if x.ndim != 4:
    raise ValueError(f"conv2d expects x [N, H, W, C], got shape {x.shape}.")
  y = conv2d_cm(to_channel_major(x), kernel, strides, padding)
  return to_channel_last(y)


# ------------------------------------------------------------------ dense
@jax.custom_vjp
def dense_cm(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """``x^T @ kernel`` for feature-major ``x [in, N]`` (e.g. a reshaped
  ``[C, H, W, N]`` activation) and ``kernel [in, out]``: returns
  ``[N, out]``. Its kernel gradient ``x g`` is one GEMM in the kernel's
  layout (no transposes of the activation)."""
  return x.T @ kernel


def _dense_cm_fwd(x, kernel):
  return x.T @ kernel, (x, kernel)


def _dense_cm_bwd(res, g):
  x, kernel = res
  return kernel @ g.T, x @ g


dense_cm.defvjp(_dense_cm_fwd, _dense_cm_bwd)


# ----------------------------------------------------------------- pooling
def _pool_geometry(shape, window_shape, strides, padding, axes):
  window = _pair("window_shape", window_shape)
  strides = window if strides is None else _pair("strides", strides)
  in_hw = tuple(shape[a] for a in axes)
  pads = _explicit_pads(padding, in_hw, window, strides)
  _out_hw(in_hw, pads, window, strides)
  return window, strides, pads


def _tiles(window, strides, pads, in_hw) -> bool:
  """Non-overlapping windows that tile the unpadded input exactly."""
  return (
    window == strides
    and all(p == (0, 0) for p in pads)
    and all(n % k == 0 for n, k in zip(in_hw, window))
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _max_pool(x, window, strides, pads, axes):
  return _max_pool_fwd(x, window, strides, pads, axes)[0]


def _window_axes(axes):
  """Positions of the window-offset axes when each spatial axis ``a`` of
  ``axes`` is split into ``(n / k, k)``."""
  return tuple(a + 1 + i for i, a in enumerate(axes))


def _first_max_index(views, y):
  """int8 of ``y``'s shape: the window offset (row-major) of each window's
  first maximum, as XLA's select-and-scatter picks for reduce_window's
  max (``views[q]`` is offset ``q`` of every window)."""
  index = jnp.full(y.shape, len(views) - 1, jnp.int8)
  for q in reversed(range(len(views) - 1)):
    index = jnp.where(views[q] == y, jnp.int8(q), index)
  return index


def _window_offsets(window, wa, ndim):
  """int8 ``[1, .., k_h, .., k_w, ..]``: each split position's offset."""
  shape = [1] * ndim
  shape[wa[0]], shape[wa[1]] = window
  rows = lax.broadcasted_iota(jnp.int8, tuple(shape), wa[0])
  return rows * jnp.int8(window[1]) + lax.broadcasted_iota(
    jnp.int8, tuple(shape), wa[1]
  )


def _max_pool_fwd(x, window, strides, pads, axes):
  in_hw = tuple(x.shape[a] for a in axes)
  if _tiles(window, strides, pads, in_hw) and window[0] * window[1] < 128:
    # Non-overlapping windows: the backward pass needs only the offset of
    # each window's (first) maximum, kept as an int8 per window.
    views = _views(
      x, window, strides, _out_hw(in_hw, pads, window, strides), axes
    )
    y = functools.reduce(jnp.maximum, views)
    return y, (materialize(_first_max_index(views, y)), None)
  out_hw = _out_hw(in_hw, pads, window, strides)
  xp = _pad(x, pads, axes, -jnp.inf)
  y = functools.reduce(jnp.maximum, _views(xp, window, strides, out_hw, axes))
  return y, (x, y)


def _max_pool_bwd(window, strides, pads, axes, res, g):
  x, y = res
  zero = jnp.zeros((), g.dtype)
  if y is None:  # tiling windows: x holds each window's argmax offset
    ndim = g.ndim + 2
    wa = _window_axes(axes)
    hit = jnp.expand_dims(x, wa) == _window_offsets(window, wa, ndim)
    dxs = jnp.where(hit, jnp.expand_dims(g, wa), zero)
    shape = list(g.shape)
    for a, k in zip(axes, window):
      shape[a] *= k
    return (dxs.reshape(shape),)
  in_hw = tuple(x.shape[a] for a in axes)
  out_hw = y.shape[axes[0]], y.shape[axes[1]]
  xp = _pad(x, pads, axes, -jnp.inf)
  taken = jnp.zeros(y.shape, bool)
  parts = []
  for v in _views(xp, window, strides, out_hw, axes):
    hit = (v == y) & ~taken
    taken = taken | hit
    parts.append(jnp.where(hit, g, zero))
  padded = tuple(xp.shape[a] for a in axes)
  dx = _unviews(parts, window, strides, padded, axes)
  return (_crop(dx, pads, in_hw, axes),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool_cm(x, window_shape=(2, 2), strides=None, padding="VALID"):
  """Max pooling of ``x [C, H, W, N]`` over ``H, W``; ``strides`` default
  to the window (non-overlapping pooling)."""
  if x.ndim != 4:
    raise ValueError(f"max_pool_cm expects [C, H, W, N], got {x.shape}.")
  geo = _pool_geometry(x.shape, window_shape, strides, padding, (_H, _W))
  return _max_pool(x, *geo, (_H, _W))


def max_pool(x, window_shape=(2, 2), strides=None, padding="VALID"):
  """Drop-in for ``flax.linen.max_pool`` on ``[..., H, W, C]``.

  As in flax, ``strides`` default to 1 (pass ``strides=window_shape`` for
  the usual non-overlapping pooling).
  """
  if x.ndim < 3:
    raise ValueError(f"max_pool expects [..., H, W, C], got {x.shape}.")
  axes = (x.ndim - 3, x.ndim - 2)
  strides = (1, 1) if strides is None else strides
  geo = _pool_geometry(x.shape, window_shape, strides, padding, axes)
  return _max_pool(x, *geo, axes)


# ----------------------------------------------------- lax / flax drop-ins
_NHWC = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def _fast_path(lhs, rhs, dimension_numbers, dilations, groups) -> bool:
  if lhs.ndim != 4 or rhs.ndim != 4 or groups != (1, 1):
    return False
  if any(d is not None and tuple(d) != (1, 1) for d in dilations):
    return False
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  return dn == _NHWC and jnp.issubdtype(lhs.dtype, jnp.floating)


def conv_general_dilated(
  lhs,
  rhs,
  window_strides,
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count=1,
  batch_group_count=1,
  precision=None,
  preferred_element_type=None,
) -> jax.Array:
  """``lax.conv_general_dilated`` with the GEMM path for 2-D NHWC/HWIO
  convolutions without dilation or groups (everything else goes to lax)."""
  if _fast_path(
    lhs,
    rhs,
    dimension_numbers,
    (lhs_dilation, rhs_dilation),
    (feature_group_count, batch_group_count),
  ):
    y = conv2d(lhs, rhs, tuple(window_strides), padding)
    if preferred_element_type is not None:
      y = y.astype(preferred_element_type)
    return y
  return lax.conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=lhs_dilation,
    rhs_dilation=rhs_dilation,
    dimension_numbers=dimension_numbers,
    feature_group_count=feature_group_count,
    batch_group_count=batch_group_count,
    precision=precision,
    preferred_element_type=preferred_element_type,
  )


class Conv(nn.Conv):
  """``flax.linen.Conv`` on the GEMM path (same fields and parameters)."""

  conv_general_dilated: Callable | None = conv_general_dilated


def fast_conv_interceptor(next_fun, args, kwargs, context):
  """A ``flax.linen.intercept_methods`` interceptor that runs every plain
  ``nn.Conv`` (no ``conv_general_dilated`` of its own) on the GEMM path.

  :func:`fedjax_lite.models.from_flax` applies it (``fast_layers=True``),
  so models written with ``nn.Conv`` get the fast path unchanged.
  """
  module = context.module
  if (
    context.method_name == "__call__"
    and type(module) is nn.Conv
    and module.conv_general_dilated is None
    and module.conv_general_dilated_cls is None
  ):
    object.__setattr__(module, "conv_general_dilated", conv_general_dilated)
    try:
      return next_fun(*args, **kwargs)
    finally:
      object.__setattr__(module, "conv_general_dilated", None)
  return next_fun(*args, **kwargs)


# ------------------------------------------- channel-major flax modules
class ConvCM(nn.Module):
  """A convolution layer on ``[C, H, W, N]`` activations (parameters as
  ``flax.linen.Conv``'s: ``kernel [k_h, k_w, C, O]``, ``bias [O]``).

  ``fast=False`` computes the same function with
  ``lax.conv_general_dilated`` (the reference the tests compare with).

  ``pool`` (``(window, strides, padding)``) max-pools the convolution's
  output before the bias is added: ``maxpool(W * x) + b``, which equals
  ``maxpool(W * x + b)`` (a per-channel constant commutes with the max) and
  keeps the bias, and whatever elementwise op follows (a ReLU commutes with
  the max too), on the pooled map.
  """

  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: int | Sequence[int] = 1
  padding: Any = "SAME"
  use_bias: bool = True
  fast: bool = True
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()
  pool: tuple | None = None

  @nn.compact
  def __call__(self, x):
    kh, kw = _pair("kernel_size", self.kernel_size)
    kernel = self.param(
      "kernel", self.kernel_init, (kh, kw, x.shape[0], self.features)
    )
    if self.fast:
      y = conv2d_cm(x, kernel, self.strides, self.padding)
    else:
      strides = _pair("strides", self.strides)
      pads = _explicit_pads(self.padding, x.shape[1:3], (kh, kw), strides)
      y = lax.conv_general_dilated(
        x, kernel, strides, pads, dimension_numbers=("CHWN", "HWIO", "CHWN")
      )
    if self.pool is not None:
      y = max_pool_chwn(y, *self.pool, fast=self.fast)
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,))
      y = y + bias[:, None, None, None]
    return y


class DenseCM(nn.Module):
  """A dense layer reading feature-major ``x [in, N]``: returns
  ``[N, features]`` (parameters as ``flax.linen.Dense``'s)."""

  features: int
  use_bias: bool = True
  fast: bool = True
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, (x.shape[0], self.features))
    y = dense_cm(x, kernel) if self.fast else x.T @ kernel
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,))[None]
    return y


def max_pool_chwn(x, window_shape, strides=None, padding="VALID", fast=True):
  """:func:`max_pool_cm`, or with ``fast=False`` ``lax.reduce_window``."""
  if fast:
    return max_pool_cm(x, window_shape, strides, padding)
  window = _pair("window_shape", window_shape)
  strides = window if strides is None else _pair("strides", strides)
  pads = _explicit_pads(padding, x.shape[1:3], window, strides)
  return lax.reduce_window(
    x,
    -jnp.inf,
    lax.max,
    (1,) + window + (1,),
    (1,) + strides + (1,),
    ((0, 0),) + pads + ((0, 0),),
  )


# ----------------------------------------------------------------- dropout
def dropout_mask(rng: jax.Array, keep: float, shape: Sequence[int]):
  """Bool mask with ``P(True) = keep`` for every entry, independently.

  When ``keep`` is a multiple of ``2^-8`` (or ``2^-16``) each entry compares
  8 (16) random bits with ``keep * 2^8`` (``2^16``): the probability is
  exactly ``keep``, from 4 (2) entries per 32-bit word of threefry output,
  several times cheaper on CPU than ``jax.random.bernoulli``'s 32 bits and
  float conversion per entry. Other rates use ``jax.random.bernoulli``.
  """
  n = int(np.prod(shape))
  for bits, dtype in ((8, jnp.uint8), (16, jnp.uint16)):
    threshold = keep * 2**bits
    if threshold == int(threshold) and 0 < threshold < 2**bits:
      words = -(-n * bits // 32)
      raw = jax.random.bits(rng, (words,), jnp.uint32)
      small = lax.bitcast_convert_type(raw, dtype).reshape(-1)[:n]
      return (small < int(threshold)).reshape(shape)
  return jax.random.bernoulli(rng, keep, tuple(shape))


class Dropout(nn.Module):
  """``flax.linen.Dropout`` (inverted dropout: kept units scaled by
  ``1 / (1 - rate)``) with masks from :func:`dropout_mask`."""

  rate: float
  deterministic: bool = False
  rng_collection: str = "dropout"

  @nn.compact
  def __call__(self, x):
    if self.deterministic or self.rate == 0.0:
      return x
    if not 0.0 <= self.rate < 1.0:
      raise ValueError(f"Dropout rate must be in [0, 1), got {self.rate!r}.")
    keep = 1.0 - self.rate
    mask = dropout_mask(self.make_rng(self.rng_collection), keep, x.shape)
    return jnp.where(mask, x / keep, jnp.zeros((), x.dtype))
