r"""Split learning on vertically partitioned data (SplitNN; FATE's HeteroNN).

Vepakomma et al. 2018, "Split learning for health" (arXiv:1812.00564),
vertical configuration. Party ``k`` runs a bottom network
:math:`h_k = f_k(x_k; \theta_k)`; the guest (label owner) runs the top network
on the concatenated cut-layer activations,
:math:`\hat y = g([h_1, \dots, h_K]; \phi)`, and the loss
:math:`L = \frac1B \sum_i \ell(\hat y_i, y_i)`. One step:

1. forward: each host sends its ``h_k`` ``[B, c_k]`` to the guest;
2. the guest computes :math:`\nabla_\phi L` and
   :math:`\delta_k = \partial L / \partial h_k` and sends ``delta_k`` back;
   with ``grad_noise_std = s`` it sends :math:`\delta_k + N(0, s^2 I)`
   instead (label protection: the cut gradients carry label information,
   e.g. their sign/direction; noise blurs it at a cost in accuracy);
3. each party back-propagates its ``delta_k`` through its own bottom
   (``jax.vjp``), and every party applies its optimizer to its own
   parameters.

Without noise, the gradients equal those of the centralized network
:math:`g([f_1(x_1), \dots])` on the joined features (the chain rule split at
the cut), which ``tests/test_vertical_split_nn.py`` checks. The step is one
jitted function; parties are a static Python loop inside it (each has its own
network). One ``optax`` optimizer over the tuple of all parties' parameters
equals one optimizer per party for elementwise optimizers (SGD, Adam, ...),
which is what is assumed.

What it protects: raw features and labels stay with their owners. What it
does not: cut activations and gradients leak information about features and
labels (model inversion, label leakage attacks; Li et al. 2021,
arXiv:2102.08504); the Gaussian noise is a heuristic defence with no formal
DP guarantee as implemented (no clipping).
"""

from __future__ import annotations

import functools
import time
from typing import Sequence

import flax
import jax
import jax.numpy as jnp
import optax

from fedjax_lite.models.core import Model
from fedjax_lite.vertical.data import AlignedData
from fedjax_lite.vertical.hetero_lr import batch_indices


@flax.struct.dataclass
class SplitNNState:
  """``params = (bottom params per party, top params)``, optimizer state,
  epoch counter and the key for batches and cut-gradient noise."""

  params: tuple
  opt_state: optax.OptState
  epoch: jax.Array
  rng: jax.Array


def forward(bottoms: Sequence[Model], top: Model, params, xs):
  """Logits of the split network (also the centralized one on joined x)."""
  hs = [m.apply(p, {m.input_key: x}) for m, p, x in zip(bottoms, params[0], xs)]
  return top.apply(params[1], {top.input_key: jnp.concatenate(hs, -1)})


def split_grads(
  bottoms: Sequence[Model],
  top: Model,
  params,
  xs,
  y,
  rng,
  *,
  guest: int = 0,
  grad_noise_std: float = 0.0,
):
  """The protocol's gradients: ``(loss, logits, grads, stats)``.

  ``stats["cut_bytes"]`` counts the float32 activations the hosts send forward
  and the gradients they get back (the guest's own cut layer stays local);
  ``stats["cut_grad_rms"]`` is the root mean square of the exact cut
  gradients sent to hosts (the scale to read ``grad_noise_std`` against).
  """
  outs = [
    jax.vjp(lambda p, m=m, x=x: m.apply(p, {m.input_key: x}), p)
    for m, p, x in zip(bottoms, params[0], xs)
  ]
  hs = [h for h, _ in outs]  # hosts -> guest

  def top_loss(top_params, hs):
    logits = top.apply(top_params, {top.input_key: jnp.concatenate(hs, -1)})
    return jnp.mean(top.loss(logits, y)), logits

  (loss, logits), (g_top, deltas) = jax.value_and_grad(
    top_loss, argnums=(0, 1), has_aux=True
  )(params[1], hs)
  deltas = list(deltas)
  cut_bytes, sq, count = 0, 0.0, 0
  for k, d in enumerate(deltas):  # guest -> hosts
    if k == guest:
      continue
    cut_bytes += 2 * 4 * d.size
    sq, count = sq + jnp.sum(d * d), count + d.size
    if grad_noise_std:
      deltas[k] = d + grad_noise_std * jax.random.normal(
        jax.random.fold_in(rng, k), d.shape, d.dtype
      )
  g_bottoms = tuple(vjp(d)[0] for (_, vjp), d in zip(outs, deltas))
  rms = jnp.sqrt(sq / max(count, 1))
  return (
    loss,
    logits,
    (g_bottoms, g_top),
    {"cut_bytes": cut_bytes, "cut_grad_rms": rms},
  )


def make_epoch(
  bottoms,
  top,
  optimizer,
  num_examples,
  batch_size,
  *,
  guest=0,
  grad_noise_std=0.0,
):
  """A jitted ``(state, xs, y) -> (state, metrics)`` over one epoch."""

  @jax.jit
  def epoch(state: SplitNNState, xs, y):
    idx = batch_indices(state.rng, state.epoch, num_examples, batch_size)
    noise_key = jax.random.fold_in(
      jax.random.fold_in(state.rng, 0x5EED), state.epoch
    )

    def body(carry, inp):
      params, opt_state = carry
      t, rows = inp
      loss, logits, grads, stats = split_grads(
        bottoms,
        top,
        params,
        [x[rows] for x in xs],
        y[rows],
        jax.random.fold_in(noise_key, t),
        guest=guest,
        grad_noise_std=grad_noise_std,
      )
      updates, opt_state = optimizer.update(grads, opt_state, params)
      acc = jnp.mean((jnp.argmax(logits, -1) == y[rows]).astype(jnp.float32))
      return (optax.apply_updates(params, updates), opt_state), (
        loss,
        acc,
        stats["cut_grad_rms"],
      )

    (params, opt_state), (loss, acc, rms) = jax.lax.scan(
      body, (state.params, state.opt_state), (jnp.arange(idx.shape[0]), idx)
    )
    return state.replace(
      params=params, opt_state=opt_state, epoch=state.epoch + 1
    ), {
      "loss": jnp.mean(loss),
      "accuracy": jnp.mean(acc),
      "cut_grad_rms": jnp.mean(rms),
    }

  return epoch


class SplitNNProcess:
  """TFF-style SplitNN: ``initialize(seed)`` / ``next(state)`` (one epoch).

  Metrics: mean batch ``loss`` and ``accuracy``, ``cut_grad_rms`` (mean
  over steps of the RMS of the exact cut gradients sent to hosts), ``seconds``,
  ``bytes_per_step`` (cut activations + gradients of all hosts, float32) and
  ``bytes`` for the epoch. Build with :func:`build_split_nn_process`.
  """

  def __init__(
    self,
    train: AlignedData,
    bottoms: Sequence[Model],
    top: Model,
    optimizer: optax.GradientTransformation,
    *,
    batch_size: int | None,
    grad_noise_std: float,
  ):
    if not isinstance(train, AlignedData):
      raise TypeError(f"train must be AlignedData, got {type(train).__name__}.")
    if len(bottoms) != len(train.xs):
      raise ValueError(
        f"got {len(bottoms)} bottom models for "
        f"{len(train.xs)} parties; one per party."
      )
    if grad_noise_std < 0:
      raise ValueError(f"grad_noise_std must be >= 0, got {grad_noise_std}.")
    top.validate_labels(train.y, "train.y")
    self.train, self.bottoms, self.top = train, tuple(bottoms), top
    self.optimizer = optimizer
    self.batch_size = batch_size
    self.grad_noise_std = float(grad_noise_std)
    self._xs = tuple(jnp.asarray(x) for x in train.xs)
    self._y = jnp.asarray(train.y)
    self._epoch = make_epoch(
      self.bottoms,
      top,
      optimizer,
      train.num_examples,
      batch_size,
      guest=train.guest,
      grad_noise_std=self.grad_noise_std,
    )
    n = train.num_examples
    self.batch = n if batch_size is None or batch_size >= n else batch_size
    self.steps_per_epoch = n // self.batch

  def initialize(self, seed: int = 0) -> SplitNNState:
    """Every party initializes its own network from ``fold_in(seed, k)``."""
    return self._init(jax.random.PRNGKey(seed))

  @functools.partial(jax.jit, static_argnums=0)
  def _init(self, key):
    bottoms = tuple(
      m.init(jax.random.fold_in(key, k)) for k, m in enumerate(self.bottoms)
    )
    params = (bottoms, self.top.init(jax.random.fold_in(key, len(bottoms))))
    return SplitNNState(
      params=params,
      opt_state=self.optimizer.init(params),
      epoch=jnp.zeros((), jnp.int32),
      rng=jax.random.fold_in(key, 10_000),
    )

  def cut_bytes_per_step(self, state: SplitNNState) -> int:
    hs = [
      jax.eval_shape(
        lambda p, x, m=m: m.apply(p, {m.input_key: x}), p, x[: self.batch]
      )
      for m, p, x in zip(self.bottoms, state.params[0], self._xs)
    ]
    return sum(
      2 * 4 * h.size for k, h in enumerate(hs) if k != self.train.guest
    )

  def next(self, state: SplitNNState) -> tuple[SplitNNState, dict]:
    if not isinstance(state, SplitNNState):
      raise TypeError(
        f"state must come from initialize(), got {type(state).__name__}."
      )
    t0 = time.perf_counter()
    state, metrics = self._epoch(state, self._xs, self._y)
    out = {k: float(v) for k, v in metrics.items()}
    per_step = self.cut_bytes_per_step(state)
    out.update(
      seconds=time.perf_counter() - t0,
      bytes_per_step=per_step,
      bytes=per_step * self.steps_per_epoch,
    )
    return state, out

  def evaluate(self, state: SplitNNState, data: AlignedData) -> dict:
    logits = forward(
      self.bottoms, self.top, state.params, [jnp.asarray(x) for x in data.xs]
    )
    y = jnp.asarray(data.y)
    return {
      "loss": float(jnp.mean(self.top.loss(logits, y))),
      "accuracy": float(
        jnp.mean((jnp.argmax(logits, -1) == y).astype(jnp.float32))
      ),
    }


def build_split_nn_process(
  train: AlignedData,
  bottoms: Sequence[Model],
  top: Model,
  optimizer: optax.GradientTransformation,
  *,
  batch_size: int | None = 32,
  grad_noise_std: float = 0.0,
) -> SplitNNProcess:
  """SplitNN as a process over aligned training data.

  Args:
    train: aligned rows (from :meth:`VerticalDataset.align`).
    bottoms: one :class:`~fedjax_lite.models.Model` per party mapping its
      columns ``[B, d_k]`` to cut activations ``[B, c_k]`` (e.g.
      ``fl.models.mlp(d_k, c_k, hidden=(64,))``).
    top: the guest's model on the concatenated activations ``[B, sum c_k]``;
      its ``loss`` is the training loss.
    optimizer: optax optimizer applied to every party's parameters.
    batch_size: rows per step (None = full batch).
    grad_noise_std: std of the Gaussian noise the guest adds to the cut
      gradients it sends to hosts (0 = exact gradients).
  """
  return SplitNNProcess(
    train,
    bottoms,
    top,
    optimizer,
    batch_size=batch_size,
    grad_noise_std=grad_noise_std,
  )
