r"""Hetero (vertical) logistic regression with a Taylor loss (FATE's HeteroLR).

Hardy et al. 2017, "Private federated learning on vertically partitioned data
via entity resolution and additively homomorphic encryption"
(arXiv:1711.10677). Party ``k`` holds columns ``X_k`` ``[n, d_k]`` and weights
``w_k``; the guest also holds the labels ``y`` in {-1, +1} (mapped from
{0, 1}) and the bias ``b``. With :math:`z = \sum_k X_k w_k + b`, the logistic
loss is replaced by its second-order Taylor expansion at 0,

.. math::

   \ell(z, y) \approx \log 2 - \tfrac12 y z + \tfrac18 z^2, \qquad
   L = \tfrac1B \sum_i \ell(z_i, y_i) + \tfrac{\lambda}{2}\sum_k \|w_k\|^2,

so the gradient is linear in ``z``: with the residual
:math:`d = \tfrac14 z - \tfrac12 y`,
:math:`\nabla_{w_k} L = X_k^\top d / B + \lambda w_k`,
:math:`\nabla_b L = \bar d`; then ``w_k -= lr * grad`` (plain SGD).

Protocol per batch (two data parties and an arbiter that holds the Paillier
key; ``mode="paillier"``):

1. host: ``[[z_h]]``, ``[[z_h^2]]`` -> guest (2B ciphertexts);
2. guest: ``[[d]] = 1/4 ([[z_h]] + z_g) - y/2`` -> host (B ciphertexts,
   re-randomized), and the encrypted loss;
3. each party: ``[[X_k^T d]]`` plus a uniform mask in ``Z_n`` -> arbiter; the
   arbiter decrypts the masked residues and returns them; the party removes
   its mask (:mod:`fedjax_lite.vertical.paillier`) and updates its weights.

What it protects: against semi-honest parties, the host never sees labels,
the guest's logits or residuals in the clear, the arbiter sees only uniformly
masked residues and the loss, and no party sees another's weights or
features. What it does not: the guest learns the loss each batch; the arbiter
could decrypt any ciphertext it is sent unmasked (colluding arbiter and
party break it); gradients themselves reveal information about the data over
many steps (no DP here); the Taylor loss is an approximation.

``mode="plaintext"`` runs the same messages without encryption inside one
jitted epoch (``lax.scan`` over batches; the parties are a static Python
loop inside the step, as each party has its own feature width); the masks
are omitted there since they cancel exactly.
"""

from __future__ import annotations

import math
import time
from typing import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lite import checks
from fedjax_lite.vertical import paillier as _pl
from fedjax_lite.vertical.data import AlignedData

LOG2 = math.log(2.0)


@flax.struct.dataclass
class HeteroLRState:
  """``weights`` per party ``[d_k]``; the guest's ``bias`` ``[]``; the epoch
  counter and the key that draws the batches."""

  weights: tuple
  bias: jax.Array
  epoch: jax.Array
  rng: jax.Array


def taylor_loss(z: jax.Array, y: jax.Array) -> jax.Array:
  """Per-example ``log 2 - y z / 2 + z^2 / 8`` for ``y`` in {-1, +1}."""
  return LOG2 - 0.5 * y * z + 0.125 * z * z


def to_pm1(y: np.ndarray, where: str = "labels") -> np.ndarray:
  """{0, 1} (or {-1, +1}) labels as float32 {-1, +1}; anything else errors."""
  y = np.asarray(y)
  vals = set(np.unique(y).tolist())
  if vals <= {0, 1}:
    return (2.0 * y - 1.0).astype(np.float32)
  if vals <= {-1, 1}:
    return y.astype(np.float32)
  raise ValueError(
    f"{where}: hetero LR is binary, got label values "
    f"{sorted(vals)[:6]}; expected {{0, 1}} or {{-1, +1}}. Use "
    "digits_vertical(binary=True) or a one-vs-rest label."
  )


def batch_indices(
  rng: jax.Array, epoch: jax.Array, n: int, batch_size: int | None
) -> jax.Array:
  """``[num_batches, batch]`` row indices of one epoch: all rows in order for
  full-batch, else a fresh permutation (``fold_in(rng, epoch)``) cut into
  ``n // batch_size`` batches (the remainder is dropped)."""
  if batch_size is None or batch_size >= n:
    return jnp.arange(n)[None]
  perm = jax.random.permutation(jax.random.fold_in(rng, epoch), n)
  nb = n // batch_size
  return perm[: nb * batch_size].reshape(nb, batch_size)


def lr_step(weights, bias, xs, y, *, learning_rate: float, l2: float):
  """One plaintext protocol step on a batch (``xs[k]`` ``[B, d_k]``, ``y``
  ``[B]`` in {-1, +1}); returns ``(weights, bias, loss, bytes)`` where
  ``loss`` is at the incoming weights."""
  z_parts = [x @ w for x, w in zip(xs, weights)]  # each party, locally
  z = sum(z_parts) + bias  # guest sums them
  loss = jnp.mean(taylor_loss(z, y)) + 0.5 * l2 * sum(
    jnp.sum(w * w) for w in weights
  )
  d = 0.25 * z - 0.5 * y  # guest -> hosts
  b = y.shape[0]
  grads = [x.T @ d / b + l2 * w for x, w in zip(xs, weights)]
  new_w = tuple(w - learning_rate * g for w, g in zip(weights, grads))
  return new_w, bias - learning_rate * jnp.mean(d), loss


def make_plaintext_epoch(
  num_examples: int, batch_size: int | None, *, learning_rate: float, l2: float
):
  """A jitted ``(state, xs, y) -> (state, mean batch loss)`` epoch."""

  @jax.jit
  def epoch(state: HeteroLRState, xs, y):
    idx = batch_indices(state.rng, state.epoch, num_examples, batch_size)

    def body(carry, rows):
      w, b = carry
      w, b, loss = lr_step(
        w, b, [x[rows] for x in xs], y[rows], learning_rate=learning_rate, l2=l2
      )
      return (w, b), loss

    (w, b), losses = jax.lax.scan(body, (state.weights, state.bias), idx)
    return state.replace(weights=w, bias=b, epoch=state.epoch + 1), (
      jnp.mean(losses)
    )

  return epoch


def encrypted_epoch(
  state: HeteroLRState,
  xs: Sequence[np.ndarray],
  y: np.ndarray,
  *,
  guest: int,
  batch_size: int | None,
  learning_rate: float,
  l2: float,
  pk,
  sk,
) -> tuple[HeteroLRState, dict]:
  """One epoch of the Paillier protocol (host-side Python; two data parties).

  Returns the new state and ``{"loss", "seconds", "cpu_seconds",
  "bytes_guest", "bytes_host", "bytes_arbiter"}`` for the epoch (wall and
  process CPU time: the CPU time is the cost on a machine shared with
  others).
  """
  if len(xs) != 2:
    raise ValueError(
      f"the Paillier mode runs the two-party protocol (guest, "
      f"host, arbiter), got {len(xs)} data parties; use "
      "mode='plaintext' or merge hosts."
    )
  t0, c0 = time.perf_counter(), time.process_time()
  host = 1 - guest
  n = y.shape[0]
  idx = np.asarray(batch_indices(state.rng, state.epoch, n, batch_size))
  w = [np.asarray(v, np.float64) for v in state.weights]
  b = float(state.bias)
  ct = _pl.ciphertext_bytes(pk)
  sent = {"guest": 0, "host": 0, "arbiter": 0}
  losses = []
  for rows in idx:
    xg, xh = (
      np.asarray(xs[guest][rows], np.float64),
      np.asarray(xs[host][rows], np.float64),
    )
    yb = np.asarray(y[rows], np.float64)
    bsz = rows.shape[0]
    # 1. Host: encrypted partial logits and their squares.
    zh = xh @ w[host]
    enc_zh, enc_zh2 = _pl.encrypt(pk, zh), _pl.encrypt(pk, zh * zh)
    sent["host"] += 2 * bsz * ct
    # 2. Guest: encrypted residual (re-randomized before it leaves) and loss.
    zg = xg @ w[guest] + b
    plain_d = _pl.encode(pk, 0.25 * zg - 0.5 * yb)
    enc_d = _pl.rerandomize([e * 0.25 + p for e, p in zip(enc_zh, plain_d)])
    sent["guest"] += bsz * ct
    # Loss terms with z_h: z_h^2 / 8 + z_h (z_g / 4 - y / 2).
    enc_loss = _pl.total(
      [e2 * 0.125 + _pl.mul(e, c) for e2, e, c in zip(enc_zh2, enc_zh, plain_d)]
    )
    plain_loss = float(np.sum(LOG2 - 0.5 * yb * zg + 0.125 * zg * zg))
    # 3. Gradients through the arbiter, masked.
    enc_gg = _pl.matvec_t(enc_d, xg) + [_pl.total(enc_d)]
    enc_gh = _pl.matvec_t(enc_d, xh)
    gg, up_g, down_g = _pl.masked_decrypt(pk, sk, enc_gg + [enc_loss])
    gh, up_h, down_h = _pl.masked_decrypt(pk, sk, enc_gh)
    sent["guest"] += up_g
    sent["host"] += up_h
    sent["arbiter"] += down_g + down_h
    loss = (gg[-1] + plain_loss) / bsz + 0.5 * l2 * sum(
      float(np.sum(v * v)) for v in w
    )
    losses.append(loss)
    grad_g = gg[:-2] / bsz + l2 * w[guest]
    grad_b = gg[-2] / bsz
    grad_h = gh / bsz + l2 * w[host]
    w[guest] = w[guest] - learning_rate * grad_g
    w[host] = w[host] - learning_rate * grad_h
    b = b - learning_rate * grad_b
  new = state.replace(
    weights=tuple(jnp.asarray(v, jnp.float32) for v in w),
    bias=jnp.asarray(b, jnp.float32),
    epoch=state.epoch + 1,
  )
  metrics = {
    "loss": float(np.mean(losses)),
    "seconds": time.perf_counter() - t0,
    "cpu_seconds": time.process_time() - c0,
    **{f"bytes_{k}": v for k, v in sent.items()},
  }
  return new, metrics


def plaintext_bytes_per_epoch(
  num_examples: int, batch_size: int | None, feature_dims: Sequence[int]
) -> dict:
  """Bytes the same messages would take as float32, without encryption:
  hosts send ``z_k`` (4B each), the guest sends ``d`` to every host."""
  bs = (
    num_examples
    if batch_size is None or batch_size >= num_examples
    else (batch_size)
  )
  nb = num_examples // bs
  hosts = len(feature_dims) - 1
  return {"bytes_guest": 4 * bs * hosts * nb, "bytes_host": 4 * bs * nb}


class VerticalLRProcess:
  """TFF-style hetero LR: ``initialize(seed)`` / ``next(state)`` (one epoch).

  ``next`` returns ``(state, metrics)`` with the epoch's mean batch ``loss``,
  ``seconds`` and the bytes each role sent. Build it with
  :func:`build_vertical_logistic_regression_process`.
  """

  def __init__(
    self,
    train: AlignedData,
    *,
    mode: str,
    learning_rate: float,
    l2: float,
    batch_size: int | None,
    key_bits: int,
    insecure_ok: bool = False,
  ):
    if mode not in ("plaintext", "paillier"):
      raise ValueError(f"mode must be 'plaintext' or 'paillier', got {mode!r}.")
    if not isinstance(train, AlignedData):
      raise TypeError(
        f"train must be AlignedData (from "
        f"VerticalDataset.align()), got {type(train).__name__}."
      )
    checks.positive_int(
      "batch_size", batch_size, allow_none=True, hint=" (None: full batch)"
    )
    if mode == "paillier":  # at build time, not at the first next()
      _pl.check_key_bits(key_bits, insecure_ok)
    self.train = train
    self.mode = mode
    self.learning_rate = float(learning_rate)
    self.l2 = float(l2)
    self.batch_size = batch_size
    self.key_bits, self.insecure_ok = key_bits, bool(insecure_ok)
    self._y = jnp.asarray(to_pm1(train.y, "train.y"))
    self._xs = tuple(jnp.asarray(x) for x in train.xs)
    self._epoch = make_plaintext_epoch(
      train.num_examples,
      batch_size,
      learning_rate=self.learning_rate,
      l2=self.l2,
    )
    self._keys = None
    if mode == "paillier" and len(train.xs) != 2:
      raise ValueError(
        f"mode='paillier' runs the two-party protocol; the data "
        f"has {len(train.xs)} parties."
      )

  def initialize(self, seed: int = 0) -> HeteroLRState:
    """Zero weights (as FATE's default), epoch 0, batch key from ``seed``."""
    return HeteroLRState(
      weights=tuple(
        jnp.zeros((d,), jnp.float32) for d in self.train.feature_dims
      ),
      bias=jnp.zeros((), jnp.float32),
      epoch=jnp.zeros((), jnp.int32),
      rng=jax.random.PRNGKey(seed),
    )

  def next(self, state: HeteroLRState) -> tuple[HeteroLRState, dict]:
    if not isinstance(state, HeteroLRState):
      raise TypeError(
        f"state must come from initialize(), got {type(state).__name__}."
      )
    if self.mode == "plaintext":
      t0 = time.perf_counter()
      state, loss = self._epoch(state, self._xs, self._y)
      loss = float(loss)
      return state, {
        "loss": loss,
        "seconds": time.perf_counter() - t0,
        **plaintext_bytes_per_epoch(
          self.train.num_examples, self.batch_size, self.train.feature_dims
        ),
      }
    if self._keys is None:
      # The arbiter's key pair.
      self._keys = _pl.keypair(self.key_bits, insecure_ok=self.insecure_ok)
    return encrypted_epoch(
      state,
      self.train.xs,
      np.asarray(self._y),
      guest=self.train.guest,
      batch_size=self.batch_size,
      learning_rate=self.learning_rate,
      l2=self.l2,
      pk=self._keys[0],
      sk=self._keys[1],
    )

  def evaluate(self, state: HeteroLRState, data: AlignedData) -> dict:
    """Taylor loss, true logistic loss and accuracy on aligned ``data``
    (prediction is the same protocol's forward pass: ``sign(z)``)."""
    if data.feature_dims != self.train.feature_dims:
      raise ValueError(
        f"data has per-party widths {data.feature_dims}, the "
        f"model {self.train.feature_dims}."
      )
    y = jnp.asarray(to_pm1(data.y, "data.y"))
    z = (
      sum(jnp.asarray(x) @ w for x, w in zip(data.xs, state.weights))
      + state.bias
    )
    return {
      "taylor_loss": float(jnp.mean(taylor_loss(z, y))),
      "loss": float(jnp.mean(jnp.logaddexp(0.0, -y * z))),
      "accuracy": float(jnp.mean((jnp.sign(z) == y).astype(jnp.float32))),
    }


def build_vertical_logistic_regression_process(
  train: AlignedData,
  *,
  mode: str = "plaintext",
  learning_rate: float = 0.5,
  l2: float = 0.0,
  batch_size: int | None = None,
  key_bits: int = _pl.MIN_KEY_BITS,
  insecure_ok: bool = False,
) -> VerticalLRProcess:
  """Hetero LR as a process over aligned training data.

  Args:
    train: aligned rows (from :meth:`VerticalDataset.align`), binary labels.
    mode: ``"plaintext"`` (one jitted epoch) or ``"paillier"`` (encrypted
      two-party protocol with an arbiter, host-side ``phe``).
    learning_rate: SGD step.
    l2: ``lambda`` of the ``lambda/2 ||w||^2`` penalty (not on the bias).
    batch_size: rows per step (a positive int); None = full batch.
    key_bits: the arbiter's Paillier modulus size; at least 2048
      (:data:`fedjax_lite.vertical.paillier.MIN_KEY_BITS`, the usual minimum
      for real use) unless ``insecure_ok``.
    insecure_ok: allow ``key_bits`` below 2048 (toy keys: tests and cost
      benchmarks of the protocol only).

  Raises:
    ValueError: for a ``batch_size`` below 1, or (``mode="paillier"``)
      ``key_bits`` below 2048 without ``insecure_ok``.
  """
  return VerticalLRProcess(
    train,
    mode=mode,
    learning_rate=learning_rate,
    l2=l2,
    batch_size=batch_size,
    key_bits=key_bits,
    insecure_ok=insecure_ok,
  )
