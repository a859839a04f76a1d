r"""The layer chain of a width-adjustable network, and width masks over it.

FedMA and HeteroFL both treat a network as a chain of layers whose hidden
units (dense units, convolution channels) can be permuted, sliced or added.
The networks supported are the ones of :mod:`fedjax_lite.models` built from
``Conv_i`` / ``Dense_j`` flax layers with a kernel and a bias each, applied in
that order (convolutions first, then dense layers, with elementwise
activations and pooling in between):

* :func:`fedjax_lite.models.mlp` (``Dense_0 .. Dense_L``), and
* :func:`fedjax_lite.models.cnn`, the FedAvg CNN (``Conv_0, Conv_1, Dense_0,
  Dense_1``).

Every layer but the last has ``width`` units that can be matched or sliced;
the last layer's outputs are the classes. A network with any other parameter
(batch norm statistics, attention projections, recurrent cells) is rejected
with an error that names what is supported.

Width masks. A *unit mask* ``m_l`` (float ``[width_l]``, 1 for a unit the
network holds) per hidden layer ``l`` defines a sub-network of the padded
global shapes: layer ``l``'s kernel is masked by ``m_{l-1}`` on its input axis
and ``m_l`` on its output axis, its bias by ``m_l``. A masked unit has zero
incoming weights and bias (so ``relu`` gives exactly 0) and zero outgoing
weights, so the padded network computes exactly the smaller one.

The input axis of layer ``l`` indexes the units of layer ``l - 1``: a
convolution kernel ``[kh, kw, c_in, c_out]`` on axis 2; a dense kernel after a
dense layer ``[units_in, out]`` on axis 0; the first dense layer after a
convolution reads the flattened ``[H', W', C]`` map, row ``(h W' + w) C + c``,
i.e. ``[P, C, out]`` with the channel on axis 1 (``P = H' W'``).
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

SUPPORTED = (
  "chains of flax Conv_i then Dense_j layers with a kernel and a "
  "bias each, as built by fedjax_lite.models.mlp(...) and "
  "fedjax_lite.models.cnn(...) (the FedAvg CNN)"
)


class Layer(NamedTuple):
  """One layer of the chain.

  Attributes:
    name: the params key (``"Conv_0"``, ``"Dense_1"``, ...).
    kind: ``"conv"`` or ``"dense"``.
    width: output units (channels); the classes for the last layer.
    in_units: units of the previous layer (input features for the first).
    in_repeat: flattened inputs per previous unit (``P = H' W'`` for the first
      dense layer after a convolution, else 1).
  """

  name: str
  kind: str
  width: int
  in_units: int
  in_repeat: int = 1


def _shape(x) -> tuple:
  return tuple(np.shape(x)) if not hasattr(x, "shape") else tuple(x.shape)


def _kernel(what: str, name: str, layer, ndim: int, expected: str) -> tuple:
  """The kernel shape of ``layer`` (params or shapes), checked: ``ndim``
  axes, and a bias as long as the last (else ``expected`` in the error)."""
  k = _shape(layer["kernel"])
  if len(k) != ndim or _shape(layer["bias"]) != (k[-1],):
    raise ValueError(
      f"{what}: {name} has kernel {k}; expected {expected}. "
      f"Supported: {SUPPORTED}."
    )
  return k


def layer_chain(params: PyTree, what: str = "model") -> tuple[Layer, ...]:
  """The chain of a supported network's params (or their shapes).

  Raises:
    ValueError: for any other network (naming what is supported).
  """
  if not isinstance(params, dict) or not params:
    raise ValueError(
      f"{what}: expected flax params (a dict of layers), got "
      f"{type(params).__name__}. Supported: {SUPPORTED}."
    )
  convs, denses = {}, {}
  for key, sub in params.items():
    m = re.fullmatch(r"(Conv|Dense)_(\d+)", str(key))
    if m is None or not isinstance(sub, dict) or set(sub) != {"kernel", "bias"}:
      inner = sorted(sub) if isinstance(sub, dict) else type(sub).__name__
      raise ValueError(
        f"{what} has a layer {key!r} with parameters {inner}; only "
        f"{SUPPORTED} can be width-matched or sliced (no batch norm, "
        "attention, recurrent cells or layers without bias)."
      )
    (convs if m.group(1) == "Conv" else denses)[int(m.group(2))] = sub
  if (
    sorted(convs) != list(range(len(convs)))
    or sorted(denses) != list(range(len(denses)))
    or not denses
  ):
    raise ValueError(
      f"{what} has layers {sorted(params)}; expected Conv_0.."
      f"Conv_a then Dense_0..Dense_b (at least one dense "
      f"layer). Supported: {SUPPORTED}."
    )
  chain = []
  prev = None
  for i in range(len(convs)):
    k = _kernel(
      what, f"Conv_{i}", convs[i], 4, "a 2-D convolution [kh, kw, c_in, c_out]"
    )
    if prev is not None and k[2] != prev:
      raise ValueError(
        f"{what}: Conv_{i} reads {k[2]} channels but Conv_"
        f"{i - 1} writes {prev}; not a chain."
      )
    chain.append(Layer(f"Conv_{i}", "conv", k[3], k[2]))
    prev = k[3]
  for i in range(len(denses)):
    k = _kernel(what, f"Dense_{i}", denses[i], 2, "[in, out]")
    repeat = 1
    if prev is None:
      in_units = k[0]
    elif i == 0:  # first dense after the convolutions: flattened map
      if k[0] % prev:
        raise ValueError(
          f"{what}: Dense_0 reads {k[0]} inputs, not a "
          f"multiple of Conv_{len(convs) - 1}'s {prev} "
          "channels; not a chain."
        )
      in_units, repeat = prev, k[0] // prev
    else:
      if k[0] != prev:
        raise ValueError(
          f"{what}: Dense_{i} reads {k[0]} inputs but the "
          f"previous layer writes {prev}; not a chain."
        )
      in_units = prev
    chain.append(Layer(f"Dense_{i}", "dense", k[1], in_units, repeat))
    prev = k[1]
  if len(chain) < 2:
    raise ValueError(
      f"{what} has a single layer ({chain[0].name}); there are "
      "no hidden units to match or slice. Supported: "
      f"{SUPPORTED} with at least one hidden layer."
    )
  return tuple(chain)


def chain_of_model(model, what: str = "model") -> tuple[Layer, ...]:
  """:func:`layer_chain` of a :class:`~fedjax_lite.models.Model`'s params."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0))
  return layer_chain(shapes, what)


def hidden_widths(chain: Sequence[Layer]) -> tuple[int, ...]:
  """Widths of the hidden (matchable / sliceable) layers: all but the last."""
  return tuple(layer.width for layer in chain[:-1])


# ------------------------------------------------------------- unit axes
def unit_view(kernel: jax.Array, layer: Layer) -> tuple[jax.Array, int]:
  """``kernel`` reshaped so its input units are one axis; returns the axis."""
  if layer.kind == "conv":
    return kernel, 2
  if layer.in_repeat > 1:
    return kernel.reshape(layer.in_repeat, layer.in_units, -1), 1
  return kernel, 0


def in_unit_mask(layer: Layer, mask: jax.Array) -> jax.Array:
  """A kernel-shaped multiplier from the previous layer's unit mask."""
  if layer.kind == "conv":
    return mask[None, None, :, None]
  if layer.in_repeat > 1:
    return jnp.tile(mask, layer.in_repeat)[:, None]
  return mask[:, None]


def out_unit_mask(layer: Layer, mask: jax.Array) -> jax.Array:
  return mask[None, None, None, :] if layer.kind == "conv" else mask[None, :]


def param_masks(
  chain: Sequence[Layer], unit_masks: Sequence[jax.Array]
) -> PyTree:
  """Params-shaped multipliers for hidden unit masks ``[width_l]`` (l < L)."""
  if len(unit_masks) != len(chain) - 1:
    raise ValueError(
      f"expected {len(chain) - 1} unit masks (one per hidden "
      f"layer), got {len(unit_masks)}."
    )
  out = {}
  for i, layer in enumerate(chain):
    dtype = jnp.asarray(unit_masks[0]).dtype
    m_in = unit_masks[i - 1] if i > 0 else None
    m_out = unit_masks[i] if i < len(chain) - 1 else None
    k = jnp.ones((), dtype)
    b = jnp.ones((layer.width,), dtype)
    if m_in is not None:
      k = k * in_unit_mask(layer, m_in)
    if m_out is not None:
      k = k * out_unit_mask(layer, m_out)
      b = m_out
    out[layer.name] = {"kernel": k, "bias": b}
  return out


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
  """``params * masks`` leafwise (masks broadcast against the kernels)."""
  return jax.tree.map(lambda p, m: p * m.astype(p.dtype), params, masks)


def prefix_masks(
  widths: Sequence[int], units: Sequence, dtype=jnp.float32
) -> tuple[jax.Array, ...]:
  """Unit masks that keep the first ``units[l]`` of ``widths[l]`` units."""
  return tuple((jnp.arange(w) < u).astype(dtype) for w, u in zip(widths, units))
