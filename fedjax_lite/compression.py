r"""Compressed uplinks: client-side update compressors, with error feedback.

Layer: sits beside ``algorithms/`` (imports ``algorithms/``; never
``engine/``).

A :class:`Compressor` turns one client's update ``Delta`` (any pytree) into
what the server decodes, ``C(Delta)``, and reports the bytes the encoded
message takes on the uplink. :func:`with_compression` wraps an algorithm's
``client_update`` (as Ditto wraps FedAvg's): the update is compressed after
local training, and compressors with memory keep it as per-client state
(``client_init``) that persists across rounds, like SCAFFOLD's control
variates, composed with the wrapped algorithm's own client state.

* :func:`top_k`: keep the ``k`` largest-magnitude coordinates of the whole
  (flattened) update; with error feedback (Stich et al. 2018,
  arXiv:1809.07599; Karimireddy et al. 2019) the client adds its residual
  ``e`` first and keeps what was not sent:
  ``p = Delta + e, C = top_k(p), e <- p - C``.
* :func:`qsgd`: stochastic uniform quantization to ``s`` levels (Alistarh et
  al. 2017, NeurIPS, arXiv:1610.02132), unbiased: ``E[Q(v)] = v``.
* :func:`sign_ef`: EF-SignSGD (Karimireddy et al. 2019, ICML,
  arXiv:1901.09847): ``p = Delta + e``, ``C = (||p||_1 / d) sign(p)``,
  ``e <- p - C``, scaled per tensor (the paper's layer-wise variant).
* :func:`no_compression`: the dense float32 update (a byte count baseline).

Uplink bytes. Every compressed round adds the client metric
``uplink_bytes`` (mean over the round's clients), counted at these bit
widths: values and norms/scales 32-bit floats; a top-k index
``ceil(log2 d)`` bits (``d`` the update's size); a QSGD coordinate one sign
bit plus ``ceil(log2(s + 1))`` bits for its level (fixed-width codes, not the
paper's Elias coding); a sign one bit. The total is rounded up to whole
bytes. Headers and the client's weight (one float) are not counted.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from fedjax_lite import checks
from fedjax_lite.algorithms.base import FederatedAlgorithm

PyTree = Any
_COMPRESSION_STREAM = 0x0C0D


class Compressor(NamedTuple):
  """An update compressor: a small tuple of pure functions.

  Attributes:
    init: ``update_template -> memory`` (one client's error-feedback state,
      shaped like the update), or None for memoryless compressors.
    compress: ``(update, memory, rng) -> (decoded, new_memory, uplink_bytes)``
      for ONE client: ``decoded`` is what the server receives (same structure
      as ``update``), ``uplink_bytes`` a float32 scalar.
    name: for reports.
  """

  init: Callable[[PyTree], PyTree] | None
  compress: Callable[
    [PyTree, PyTree, jax.Array], tuple[PyTree, PyTree, jax.Array]
  ]
  name: str = "compressor"


def _size(tree) -> int:
  return int(sum(math.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


def _bytes(bits: int) -> jax.Array:
  return jnp.asarray(math.ceil(bits / 8), jnp.float32)


def _index_bits(d: int) -> int:
  return max(1, math.ceil(math.log2(d))) if d > 1 else 1


def _zeros_f32(tree):
  return jax.tree.map(lambda x: jnp.zeros(np.shape(x), jnp.float32), tree)


# -------------------------------------------------------------- compressors
def no_compression() -> Compressor:
  """The dense update, ``32 d`` bits (baseline for the byte counts)."""

  def compress(update, memory, rng):
    del rng
    return update, memory, _bytes(32 * _size(update))

  return Compressor(init=None, compress=compress, name="dense")


def top_k(
  density: float | None = None,
  *,
  k: int | None = None,
  error_feedback: bool = True,
) -> Compressor:
  r"""Top-k sparsification of the flattened update, with error feedback.

  .. math:: p = \Delta + e,\quad C(p) = p \odot 1[|p_i| \text{ among the }
            k \text{ largest}],\quad e \leftarrow p - C(p)

  (``e = 0`` without error feedback). ``k = ceil(density d)`` over the
  whole update (all leaves together); ties are broken by position
  (``lax.top_k``), so exactly ``k`` coordinates are sent. Uplink:
  ``k (32 + ceil(log2 d))`` bits.

  Args:
    density: fraction of coordinates sent, in (0, 1].
    k: a fixed count instead of ``density``.
    error_feedback: keep the unsent residual per client across rounds.
  """
  if (density is None) == (k is None):
    raise ValueError(
      f"top_k needs exactly one of density (fraction of "
      f"coordinates, in (0, 1]) or k (a count); got "
      f"density={density!r}, k={k!r}."
    )
  if density is not None and not (0.0 < float(density) <= 1.0):
    raise ValueError(
      f"density must be in (0, 1], got {density!r} (e.g. 0.1 "
      "sends 10% of the coordinates)."
    )
  if k is not None and (not checks.is_int(k) or k < 1):
    raise ValueError(f"k must be a positive int, got {k!r}.")

  def num_kept(d: int) -> int:
    kk = math.ceil(float(density) * d) if k is None else int(k)
    if kk > d:
      raise ValueError(
        f"top_k: k={kk} is larger than the update's {d} coordinates; lower k."
      )
    return max(1, kk)

  def init(template):
    return _zeros_f32(template)

  def compress(update, memory, rng):
    del rng
    flat, unravel = ravel_pytree(update)
    d = flat.shape[0]
    kk = num_kept(d)
    p = flat
    if error_feedback:
      p = p + ravel_pytree(memory)[0].astype(flat.dtype)
    _, idx = jax.lax.top_k(jnp.abs(p), kk)
    sent = jnp.zeros_like(p).at[idx].set(p[idx])
    new_memory = memory
    if error_feedback:
      new_memory = ravel_pytree(memory)[1](p - sent)
    return unravel(sent), new_memory, _bytes(kk * (32 + _index_bits(d)))

  name = f"top_k({density if k is None else k})" + (
    "+ef" if error_feedback else ""
  )
  return Compressor(
    init=init if error_feedback else None, compress=compress, name=name
  )


def qsgd(levels: int, *, bucket_size: int | None = None) -> Compressor:
  r"""QSGD stochastic uniform quantization (Alistarh et al. 2017), unbiased.

  For each bucket ``v`` (the whole flattened update by default) with
  ``s = levels``, coordinate ``i`` with ``l = floor(s |v_i| / ||v||_2)``:

  .. math:: Q_s(v_i) = ||v||_2\,\mathrm{sign}(v_i)\,\xi_i / s,\quad
            \xi_i = l + 1 \text{ w.p. } s |v_i| / ||v||_2 - l,
            \text{ else } l

  so ``E[Q_s(v)] = v`` and ``Var[Q_s(v_i)] = ||v||^2 p_i (1 - p_i) / s^2``.
  Uplink: ``32`` bits per bucket norm plus ``1 + ceil(log2(s + 1))`` bits per
  coordinate.

  Args:
    levels: ``s >= 1`` quantization levels.
    bucket_size: quantize buckets of this many coordinates, each with its
      own norm (the paper's bucketing); None: one bucket.
  """
  if not checks.is_int(levels) or levels < 1:
    raise ValueError(
      f"levels must be an int >= 1 (s quantization levels), got {levels!r}."
    )
  if bucket_size is not None and (
    not isinstance(bucket_size, (int, np.integer)) or bucket_size < 1
  ):
    raise ValueError(
      f"bucket_size must be a positive int or None, got {bucket_size!r}."
    )
  s = int(levels)

  def compress(update, memory, rng):
    flat, unravel = ravel_pytree(update)
    d = flat.shape[0]
    b = d if bucket_size is None else min(int(bucket_size), d)
    nb = math.ceil(d / b)
    v = jnp.pad(flat, (0, nb * b - d)).reshape(nb, b)
    norm = jnp.sqrt(jnp.sum(v * v, axis=1, keepdims=True))
    r = jnp.abs(v) * s / jnp.where(norm > 0, norm, 1.0)
    low = jnp.floor(r)
    up = jax.random.uniform(rng, v.shape, v.dtype) < (r - low)
    xi = jnp.minimum(low + up.astype(v.dtype), s)
    q = norm * jnp.sign(v) * xi / s
    q = jnp.where(norm > 0, q, 0.0).reshape(-1)[:d]
    bits = 32 * nb + d * (1 + math.ceil(math.log2(s + 1)))
    return unravel(q), memory, _bytes(bits)

  name = (
    f"qsgd(s={s}" + ("" if bucket_size is None else f",b={bucket_size}") + ")"
  )
  return Compressor(init=None, compress=compress, name=name)


def sign_ef(error_feedback: bool = True) -> Compressor:
  r"""Scaled sign compression with error feedback (EF-SignSGD).

  Karimireddy et al. 2019, "Error Feedback Fixes SignSGD and other Gradient
  Compression Schemes" (ICML, arXiv:1901.09847), Algorithm 1, per tensor
  ``l`` of size ``d_l``:

  .. math:: p_l = \Delta_l + e_l,\quad C(p_l) = \frac{||p_l||_1}{d_l}
            \mathrm{sign}(p_l),\quad e_l \leftarrow p_l - C(p_l)

  (``sign(0) = +1``, a one-bit code). Uplink: ``d`` bits plus one 32-bit
  scale per tensor.
  """

  def init(template):
    return _zeros_f32(template)

  def compress(update, memory, rng):
    del rng
    p = update
    if error_feedback:
      p = jax.tree.map(lambda u, e: u + e.astype(u.dtype), update, memory)

    def one(x):
      scale = jnp.sum(jnp.abs(x)) / max(1, x.size)
      return scale * jnp.where(x >= 0, 1.0, -1.0).astype(x.dtype)

    sent = jax.tree.map(one, p)
    new_memory = memory
    if error_feedback:
      new_memory = jax.tree.map(
        lambda a, c: (a - c).astype(jnp.float32), p, sent
      )
    leaves = jax.tree.leaves(update)
    return sent, new_memory, _bytes(_size(update) + 32 * len(leaves))

  return Compressor(
    init=init if error_feedback else None,
    compress=compress,
    name="sign" + ("+ef" if error_feedback else ""),
  )


# ------------------------------------------------------------------ wrapper
@flax.struct.dataclass
class CompressedClientState:
  """Per-client state of a compressed algorithm.

  Attributes:
    inner: the wrapped algorithm's client state (None if it has none).
    memory: the compressor's error-feedback residual (None if it has none).
  """

  inner: PyTree
  memory: PyTree


def with_compression(
  algorithm: FederatedAlgorithm,
  compressor: Compressor,
  *,
  update_template: Callable[[PyTree], PyTree] | None = None,
) -> FederatedAlgorithm:
  r"""``algorithm`` whose clients send ``compressor(update)`` to the server.

  Every sampled client runs the wrapped ``client_update`` and compresses its
  update (fresh randomness from the client's key, so the local training is
  the wrapped algorithm's exactly); the server sees the decoded update. With
  error feedback the residual is per-client state: the engine keeps all
  ``num_clients`` residuals (``[num_clients, ...]``, as for SCAFFOLD), and
  a client that is not sampled keeps its residual.

  Args:
    algorithm: any algorithm (its client state is kept alongside).
    compressor: :func:`top_k`, :func:`qsgd`, :func:`sign_ef`,
      :func:`no_compression` or your own :class:`Compressor`.
    update_template: ``params -> a pytree shaped like one update`` (sizes
      the residual); default: the update is shaped like the params (FedAvg,
      FedProx, Ditto). SCAFFOLD's update ``{"y", "c"}`` needs
      ``lambda p: {"y": p, "c": p}``.

  Returns:
    The wrapped algorithm; client metrics gain ``uplink_bytes``.
  """
  checks.instance_of("algorithm", algorithm, FederatedAlgorithm)
  checks.instance_of(
    "compressor", compressor, Compressor, " (e.g. fl.compression.top_k(0.1))"
  )
  template = update_template or (lambda params: params)
  inner_stateful = algorithm.client_init is not None
  has_memory = compressor.init is not None
  stateful = inner_stateful or has_memory

  def client_init(params):
    inner = algorithm.client_init(params) if inner_stateful else None
    memory = compressor.init(template(params)) if has_memory else None
    return CompressedClientState(inner=inner, memory=memory)

  def client_update(broadcast, client_state, data, rng):
    inner = client_state.inner if stateful else None
    out = algorithm.client_update(broadcast, inner, data, rng)
    memory = client_state.memory if stateful else None
    if has_memory:
      want = jax.tree.structure(memory)
      got = jax.tree.structure(out.update)
      if want != got:
        raise ValueError(
          f"{compressor.name}: the residual was built from "
          f"update_template(params) with structure {want}, but "
          f"{algorithm.name}'s update has structure {got}. Pass "
          "update_template=<params -> pytree shaped like one update>."
        )
    k = jax.random.fold_in(rng, _COMPRESSION_STREAM)
    sent, memory, nbytes = compressor.compress(out.update, memory, k)
    metrics = dict(out.metrics)
    metrics["uplink_bytes"] = (nbytes, jnp.ones((), jnp.float32))
    state = (
      CompressedClientState(inner=out.state, memory=memory)
      if stateful
      else out.state
    )
    return out._replace(update=sent, state=state, metrics=metrics)

  return algorithm._replace(
    client_init=client_init if stateful else None,
    client_update=client_update,
    name=f"{algorithm.name}+{compressor.name}",
  )


def dense_bytes(params: PyTree) -> int:
  """Bytes of one dense float32 update shaped like ``params``."""
  return math.ceil(32 * _size(params) / 8)
