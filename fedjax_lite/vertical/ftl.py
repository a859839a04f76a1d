r"""Federated transfer learning (Liu et al. 2020, arXiv:1812.03337).

"A Secure Federated Transfer Learning Framework" (IEEE Intelligent Systems
35(4), 2020). Two parties with different features and mostly different
samples: the *source* A holds ``x^A`` ``[N_A, d_A]`` and labels
:math:`y \in \{-1, +1\}`; the *target* B holds ``x^B`` ``[N_B, d_B]`` and no
labels; ``N_AB`` samples are held by both (found by PSI). Each party maps its
rows to a ``d``-dimensional representation, :math:`u^A_i = Net^A(x^A_i)`,
:math:`u^B_j = Net^B(x^B_j)`. B's samples are scored through A's labeled
representations,

.. math:: \Phi^A = \frac{1}{N_A}\sum_{i=1}^{N_A} y_i u^A_i, \qquad
          \varphi(u^B_j) = \Phi^A \cdot u^B_j,

and trained with the paper's loss on the overlap (every overlap sample is
labeled on A's side, so the paper's labeled set :math:`D_c` is the overlap):

.. math::

   L = \underbrace{\frac{1}{N_{AB}}\sum_{i \in AB} \Big(\log 2
       - \tfrac12 y_i \varphi(u^B_i) + \tfrac18 \varphi(u^B_i)^2\Big)}_{
       L_1:\ \text{Taylor-approximated logistic loss}}
     + \gamma \underbrace{\frac{1}{N_{AB}}\sum_{i \in AB}
       \|u^A_i - u^B_i\|^2}_{L_2:\ \text{alignment}}
     + \frac{\lambda}{2}\big(\|\theta_A\|^2 + \|\theta_B\|^2\big).

(The paper writes sums; we average ``L_1`` and ``L_2`` over the overlap, which
only rescales ``gamma`` and the learning rate.) The representation gradients
are closed-form and are what the parties exchange:

.. math::

   \frac{\partial L}{\partial u^B_i} = \frac{1}{N_{AB}}\Big[(-\tfrac12 y_i
     + \tfrac14 \varphi_i)\Phi^A + 2\gamma(u^B_i - u^A_i)\Big], \qquad
   \frac{\partial L}{\partial \Phi^A} = \frac{1}{N_{AB}}\Big[-\tfrac12
     \sum_i y_i u^B_i + \tfrac14 \Big(\sum_i u^B_i u^{B\top}_i\Big)\Phi^A\Big],

   \frac{\partial L}{\partial u^A_k} = \frac{y_k}{N_A}
     \frac{\partial L}{\partial \Phi^A} + [k \in AB]\frac{2\gamma}{N_{AB}}
     (u^A_k - u^B_k);

each party back-propagates its own through its network (``jax.vjp``) and
applies its optimizer. Prediction for B's non-overlapping rows:
:math:`\mathrm{sign}(\Phi^A \cdot u^B_j)`.

Modes. ``"plaintext"``: one jitted step, the components (``Phi^A``,
``u^A`` and ``y_i Phi^A`` on the overlap, ``u^B`` on the overlap) cross in the
clear. ``"paillier"``: the paper's two-key protocol without an arbiter, in
``phe`` on the host: A sends, under its key, ``[[-y_i Phi/2]]``,
``[[Phi Phi^T / 4]]`` and ``[[u^A_i]]``; B sends, under its key, ``[[u^B_i]]``
and ``[[sum u^B u^B^T]]``; each computes its encrypted gradient (and A the
encrypted loss) homomorphically, adds a uniform mask in ``Z_n``, the other
party decrypts the masked residues, and the owner removes the mask
(:mod:`fedjax_lite.vertical.paillier`). What it protects (semi-honest): A
never sees ``u^B`` or B's gradient in the clear, B never sees labels,
``Phi^A``, ``u^A`` or A's gradient; each party learns its own gradient and A
the loss. What it does not: gradients and the loss leak information over
many steps; B's regularizer norm is sent in the clear for the loss report;
malicious parties are not handled; it is a single-process simulation.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lite import checks
from fedjax_lite._optional import require
from fedjax_lite.models.core import Model
from fedjax_lite.vertical import paillier as _pl
from fedjax_lite.vertical.data import Party
from fedjax_lite.vertical.hetero_lr import to_pm1

LOG2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class FTLData:
  """The two parties' tables and their overlap.

  Attributes:
    x_source: ``[N_A, d_A]`` source features; y_source ``[N_A]`` in {-1, +1}.
    x_target: ``[N_B, d_B]`` target features (no labels).
    rows_source, rows_target: ``[N_AB]`` row indices of the overlap in each
      table, in the common (PSI) order: distinct integers in ``[0, N_A)``
      and ``[0, N_B)`` (checked here: ``ValueError`` otherwise).
    names: (source name, target name).
  """

  x_source: np.ndarray
  y_source: np.ndarray
  x_target: np.ndarray
  rows_source: np.ndarray
  rows_target: np.ndarray
  names: tuple[str, str] = ("source", "target")

  def __post_init__(self):
    for name in ("x_source", "y_source", "x_target"):
      object.__setattr__(self, name, np.asarray(getattr(self, name)))
    if self.x_source.shape[0] != self.y_source.shape[0]:
      raise ValueError(
        f"x_source has {self.x_source.shape[0]} rows, y_source "
        f"{self.y_source.shape[0]}: expected one label per row."
      )
    rows_s, rows_t = np.asarray(self.rows_source), np.asarray(self.rows_target)
    if rows_s.shape != rows_t.shape:
      raise ValueError(
        f"overlap rows differ in length: source "
        f"{rows_s.shape}, target "
        f"{rows_t.shape}: misaligned overlap."
      )
    if rows_s.size == 0:
      raise ValueError("the parties share no samples; FTL needs an overlap.")
    # On the host, before any gather: jnp would clamp a row outside the
    # table and numpy wrap a negative one, silently training on another row.
    for name, rows, x in (
      ("rows_source", rows_s, "x_source"),
      ("rows_target", rows_t, "x_target"),
    ):
      checked = checks.index_array(
        name,
        rows,
        getattr(self, x).shape[0],
        what="row",
        of=x,
        unique=True,
      )
      object.__setattr__(self, name, checked)

  @property
  def num_overlap(self) -> int:
    return int(self.rows_source.shape[0])

  def target_non_overlap(self) -> np.ndarray:
    """Row indices of B's samples that A does not have (to be labeled)."""
    mask = np.ones(self.x_target.shape[0], bool)
    mask[self.rows_target] = False
    return np.flatnonzero(mask)

  @classmethod
  def from_parties(
    cls, source: Party, target: Party, *, seed: int | None = None
  ) -> tuple["FTLData", object]:
    """Aligns the overlap by ECDH PSI; returns ``(FTLData, PsiResult)``.

    Raises ValueError if the source has no labels or the ids do not overlap.
    """
    from fedjax_lite.vertical import psi as _psi  # pylint: disable=g-import-not-at-top

    if source.y is None:
      raise ValueError(
        f"the source party {source.name!r} has no label column "
        "(y=None); FTL needs labels on the source side."
      )
    res = _psi.ecdh_psi(
      [source.ids, target.ids],
      names=(source.name, target.name),
      guest=0,
      seed=seed,
    )
    return cls(
      source.x,
      to_pm1(source.y, f"party {source.name!r} y"),
      target.x,
      res.rows[0],
      res.rows[1],
      (source.name, target.name),
    ), res


def split_transfer(
  x: np.ndarray,
  y: np.ndarray,
  *,
  source_cols: Sequence[int],
  target_cols: Sequence[int],
  num_source: int,
  num_target: int,
  num_overlap: int,
  id_type: str = "str",
  seed: int = 0,
) -> tuple[Party, Party, np.ndarray]:
  """A centralized table as an FTL pair: different columns, different rows.

  Draws ``num_overlap`` rows held by both parties, ``num_source -
  num_overlap`` only by the source and ``num_target - num_overlap`` only by
  the target (disjoint), each party in its own random row order.

  Returns:
    ``(source, target, target_labels)``: the source party holds ``y``;
    ``target_labels`` ``[num_target]`` are the target rows' labels, for
    evaluation only (the target does not hold them).
  """
  x = np.asarray(x, np.float32).reshape(len(x), -1)
  n = x.shape[0]
  if not 0 < num_overlap <= min(num_source, num_target):
    raise ValueError(
      f"num_overlap={num_overlap} must be in (0, min(num_source, num_target)]."
    )
  need = num_source + num_target - num_overlap
  if need > n:
    raise ValueError(
      f"the split needs {need} distinct rows, the table has {n}."
    )
  rng = np.random.default_rng(seed)
  perm = rng.permutation(n)
  both = perm[:num_overlap]
  only_s = perm[num_overlap:num_source]
  only_t = perm[num_source:need]
  rows_s = rng.permutation(np.concatenate([both, only_s]))
  rows_t = rng.permutation(np.concatenate([both, only_t]))
  ids = (
    np.asarray([f"u{i:06d}" for i in range(n)])
    if id_type == "str"
    else np.arange(n, dtype=np.int64)
  )
  src = Party(
    "source",
    ids[rows_s],
    x[rows_s][:, np.asarray(source_cols)],
    np.asarray(y)[rows_s],
  )
  tgt = Party("target", ids[rows_t], x[rows_t][:, np.asarray(target_cols)])
  return src, tgt, np.asarray(y)[rows_t]


def digits_transfer(
  num_overlap: int = 100,
  num_source: int = 900,
  num_target: int = 897,
  seed: int = 0,
):
  """Digits, binary (digit >= 5): source sees the left image half, target the
  right half; see :func:`split_transfer` for the return value."""
  sklearn_datasets = require("sklearn.datasets", "vertical")
  b = sklearn_datasets.load_digits()
  cols = np.arange(64).reshape(8, 8)
  return split_transfer(
    b.data / 16.0,
    (b.target >= 5).astype(np.int32),
    source_cols=cols[:, :4].ravel(),
    target_cols=cols[:, 4:].ravel(),
    num_source=num_source,
    num_target=num_target,
    num_overlap=num_overlap,
    seed=seed,
  )


@flax.struct.dataclass
class FTLState:
  """``params = (source net params, target net params)``, optimizer state,
  step counter."""

  params: tuple
  opt_state: optax.OptState
  step: jax.Array


def representations(nets: tuple[Model, Model], params, x_source, x_target_ab):
  """``(u^A [N_A, d], u^B [N_AB, d])``: each party's own forward pass."""
  (net_a, net_b), (pa, pb) = nets, params
  return (
    net_a.apply(pa, {net_a.input_key: x_source}),
    net_b.apply(pb, {net_b.input_key: x_target_ab}),
  )


def ftl_loss(u_a, u_b, y, rows_source, gamma):
  """``L_1 + gamma L_2`` (no regularizer) from the representations."""
  phi = jnp.mean(y[:, None] * u_a, axis=0)
  scores = u_b @ phi
  yc = y[rows_source]
  l1 = jnp.mean(LOG2 - 0.5 * yc * scores + 0.125 * scores * scores)
  l2 = jnp.mean(jnp.sum((u_a[rows_source] - u_b) ** 2, axis=-1))
  return l1 + gamma * l2


def rep_grads(u_a, u_b, y, rows_source, gamma):
  """The closed-form exchange (plaintext): ``(dL/du^A, dL/du^B, loss)``."""
  n_a, n_ab = u_a.shape[0], u_b.shape[0]
  # A -> B: Phi (for y_i Phi on the overlap) and u^A on the overlap.
  phi = jnp.mean(y[:, None] * u_a, axis=0)
  yc = y[rows_source]
  ua_ab = u_a[rows_source]
  scores = u_b @ phi
  g_b = (
    (-0.5 * yc + 0.25 * scores)[:, None] * phi[None]
    + 2.0 * gamma * (u_b - ua_ab)
  ) / n_ab
  # B -> A: u^B on the overlap (A forms sum y u^B and sum u^B u^B^T).
  g_phi = (-0.5 * (yc @ u_b) + 0.25 * (u_b.T @ (u_b @ phi))) / n_ab
  g_a = y[:, None] * g_phi[None] / n_a
  g_a = g_a.at[rows_source].add(2.0 * gamma * (ua_ab - u_b) / n_ab)
  loss = ftl_loss(u_a, u_b, y, rows_source, gamma)
  return g_a, g_b, loss


def _common_width(*nets) -> int:
  """The representation width ``d`` both networks map their rows to.

  Checked at build time on shapes only (``jax.eval_shape``): a network that
  does not accept its table's rows, or widths that differ, would otherwise
  surface as a raw shape error at the first step.

  Args:
    *nets: ``(net, rows, net name, table name)`` per party.
  """
  widths = []
  for net, x, name, table in nets:
    params = jax.eval_shape(net.init, jax.random.PRNGKey(0))
    try:
      out = jax.eval_shape(lambda p: net.apply(p, {net.input_key: x}), params)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(
        f"{name} does not accept {table}'s rows of shape "
        f"{tuple(x.shape[1:])}: {e}"
      ) from e
    if out.ndim != 2:
      raise ValueError(
        f"{name} maps {table}'s rows [{x.shape[0]}, ...] to shape "
        f"{out.shape}; expected representations [{x.shape[0]}, d]."
      )
    widths.append(int(out.shape[1]))
  if len(set(widths)) != 1:
    (_, _, a, _), (_, _, b, _) = nets
    raise ValueError(
      f"{a} maps rows to width {widths[0]}, {b} to width {widths[1]}; "
      "expected one common width d (the parties' representations are "
      "aligned and multiplied)."
    )
  return widths[0]


def _l2(params):
  return sum(jnp.sum(p * p) for p in jax.tree.leaves(params))


class FTLProcess:
  """TFF-style FTL: ``initialize(seed)`` / ``next(state)`` (one full-batch
  step); metrics ``loss`` (``L_1 + gamma L_2 + lambda/2 ||theta||^2``),
  ``seconds`` and bytes per party. Build with :func:`build_ftl_process`."""

  def __init__(
    self,
    data: FTLData,
    source_net: Model,
    target_net: Model,
    optimizer: optax.GradientTransformation,
    *,
    gamma: float,
    l2: float,
    mode: str,
    key_bits: int,
    insecure_ok: bool = False,
  ):
    if mode not in ("plaintext", "paillier"):
      raise ValueError(f"mode must be 'plaintext' or 'paillier', got {mode!r}.")
    if not isinstance(data, FTLData):
      raise TypeError(f"data must be FTLData, got {type(data).__name__}.")
    if mode == "paillier":  # at build time, not at the first next()
      _pl.check_key_bits(key_bits, insecure_ok)
    self.data, self.nets = data, (source_net, target_net)
    self.optimizer, self.mode, self.key_bits = optimizer, mode, key_bits
    self.insecure_ok = bool(insecure_ok)
    self.gamma, self.l2 = float(gamma), float(l2)
    self._xa = jnp.asarray(data.x_source)
    self._y = jnp.asarray(data.y_source, jnp.float32)
    self._xb_ab = jnp.asarray(data.x_target[data.rows_target])
    self._rows = jnp.asarray(data.rows_source)
    self._keys = None
    self._dim = _common_width(
      (source_net, self._xa, "source_net", "x_source"),
      (target_net, self._xb_ab, "target_net", "x_target"),
    )
    nets, gamma, l2 = self.nets, self.gamma, self.l2

    def forward(params):
      return jax.vjp(
        lambda p: representations(nets, p, self._xa, self._xb_ab), params
      )

    def apply(state, vjp, g_a, g_b):
      grads = vjp((g_a, g_b))[0]
      grads = jax.tree.map(lambda g, p: g + l2 * p, grads, state.params)
      updates, opt_state = optimizer.update(
        grads, state.opt_state, state.params
      )
      return state.replace(
        params=optax.apply_updates(state.params, updates),
        opt_state=opt_state,
        step=state.step + 1,
      )

    def plain_step(state):
      (u_a, u_b), vjp = forward(state.params)
      g_a, g_b, loss = rep_grads(u_a, u_b, self._y, self._rows, gamma)
      return apply(state, vjp, g_a, g_b), loss + 0.5 * l2 * _l2(state.params)

    self._plain_step = jax.jit(plain_step)
    self._forward = jax.jit(
      lambda p: representations(nets, p, self._xa, self._xb_ab)
    )

    def enc_apply(state, g_a, g_b):
      _, vjp = forward(state.params)
      return apply(state, vjp, g_a, g_b)

    self._enc_apply = jax.jit(enc_apply)
    self._reg = jax.jit(lambda p: (_l2(p[0]), _l2(p[1])))

  def _rep_dim(self, params) -> int:
    if self._dim is None:
      self._dim = jax.eval_shape(self._forward, params)[1].shape[1]
    return self._dim

  def initialize(self, seed: int = 0) -> FTLState:
    """Each party initializes its network from ``fold_in(seed, party)``."""
    return self._init(jax.random.PRNGKey(seed))

  @functools.partial(jax.jit, static_argnums=0)
  def _init(self, key) -> FTLState:
    params = (
      self.nets[0].init(jax.random.fold_in(key, 0)),
      self.nets[1].init(jax.random.fold_in(key, 1)),
    )
    return FTLState(
      params=params,
      opt_state=self.optimizer.init(params),
      step=jnp.zeros((), jnp.int32),
    )

  def next(self, state: FTLState) -> tuple[FTLState, dict]:
    if not isinstance(state, FTLState):
      raise TypeError(
        f"state must come from initialize(), got {type(state).__name__}."
      )
    t0 = time.perf_counter()
    if self.mode == "plaintext":
      state, loss = self._plain_step(state)
      loss = float(loss)
      # float32 messages: A sends Phi, the overlap's labels and u^A; B u^B.
      n_ab = self._xb_ab.shape[0]
      d = self._rep_dim(state.params)
      sent = {
        "bytes_source": 4 * (d + n_ab + n_ab * d),
        "bytes_target": 4 * n_ab * d,
      }
      return state, {"loss": loss, "seconds": time.perf_counter() - t0, **sent}
    if self._keys is None:
      self._keys = tuple(
        _pl.keypair(self.key_bits, insecure_ok=self.insecure_ok)
        for _ in range(2)
      )
      t0 = time.perf_counter()  # key generation is setup, not a step
    c0 = time.process_time()
    u_a, u_b = (np.asarray(u, np.float64) for u in self._forward(state.params))
    reg_a, reg_b = (float(r) for r in self._reg(state.params))
    g_a, g_b, loss, sent = encrypted_rep_grads(
      u_a,
      u_b,
      np.asarray(self._y, np.float64),
      np.asarray(self._rows),
      self.gamma,
      self._keys[0],
      self._keys[1],
    )
    loss += 0.5 * self.l2 * (reg_a + reg_b)
    state = self._enc_apply(
      state, jnp.asarray(g_a, jnp.float32), jnp.asarray(g_b, jnp.float32)
    )
    return state, {
      "loss": loss,
      "seconds": time.perf_counter() - t0,
      "cpu_seconds": time.process_time() - c0,
      **sent,
    }

  def predict_scores(self, state: FTLState, x_target: np.ndarray) -> np.ndarray:
    """``Phi^A . u^B_j`` for target rows ``x_target`` (sign = label)."""
    net_a, net_b = self.nets
    u_a = net_a.apply(state.params[0], {net_a.input_key: self._xa})
    phi = jnp.mean(self._y[:, None] * u_a, axis=0)  # A -> B
    u_b = net_b.apply(state.params[1], {net_b.input_key: jnp.asarray(x_target)})
    return np.asarray(u_b @ phi)

  def evaluate(
    self, state: FTLState, x_target: np.ndarray, labels: np.ndarray
  ) -> dict:
    """Accuracy and logistic loss of ``sign(Phi . u^B)`` on target rows."""
    s = self.predict_scores(state, x_target)
    y = to_pm1(labels, "labels")
    return {
      "accuracy": float(np.mean(np.where(s >= 0, 1.0, -1.0) == y)),
      "loss": float(np.mean(np.logaddexp(0.0, -y * s))),
    }


def encrypted_rep_grads(u_a, u_b, y, rows_source, gamma, keys_a, keys_b):
  """The Paillier protocol for one step's representation gradients.

  Args:
    u_a: ``[N_A, d]`` A's representations; u_b ``[N_AB, d]`` B's on the
      overlap; y ``[N_A]`` in {-1, +1}; rows_source ``[N_AB]``.
    keys_a, keys_b: each party's Paillier ``(public, private)`` key pair.

  Returns:
    ``(dL/du^A, dL/du^B, loss, bytes)`` with the same values as
    :func:`rep_grads` up to fixed-point rounding.
  """
  (pk_a, sk_a), (pk_b, sk_b) = keys_a, keys_b
  n_a, d = u_a.shape
  n_ab = u_b.shape[0]
  ct_a, ct_b = _pl.ciphertext_bytes(pk_a), _pl.ciphertext_bytes(pk_b)
  sent = {"bytes_source": 0, "bytes_target": 0}
  yc = y[rows_source]
  ua_ab = u_a[rows_source]
  # A: components under A's key.
  phi = np.mean(y[:, None] * u_a, axis=0)
  e_yphi = _pl.encrypt(pk_a, (-0.5 * yc[:, None] * phi[None]).ravel())
  e_phiphi = _pl.encrypt(pk_a, (0.25 * np.outer(phi, phi)).ravel())
  e_ua = _pl.encrypt(pk_a, ua_ab.ravel())
  sent["bytes_source"] += ct_a * (len(e_yphi) + len(e_phiphi) + len(e_ua))
  # B: components under B's key.
  e_ub = _pl.encrypt(pk_b, u_b.ravel())
  e_uu = _pl.encrypt(pk_b, (u_b.T @ u_b).ravel())
  sent["bytes_target"] += ct_b * (len(e_ub) + len(e_uu))
  # B computes [[dL/du^B]] under A's key:
  #   ([[-y Phi/2]] + [[Phi Phi^T/4]] u^B_i + 2 gamma (u^B_i - [[u^A_i]]))
  #   / N_AB
  g_b_enc = []
  for i in range(n_ab):
    coef = _pl.encode(pk_a, u_b[i] / n_ab)
    two_g = _pl.encode(pk_a, [-2.0 * gamma / n_ab])[0]
    for r in range(d):
      quad = _pl.total(
        [_pl.mul(e_phiphi[r * d + c], coef[c]) for c in range(d)]
      )
      val = (
        e_yphi[i * d + r] * (1.0 / n_ab)
        + quad
        + _pl.mul(e_ua[i * d + r], two_g)
        + 2.0 * gamma * u_b[i, r] / n_ab
      )
      g_b_enc.append(val)
  g_b, up, down = _pl.masked_decrypt(pk_a, sk_a, g_b_enc)  # A decrypts
  sent["bytes_target"] += up
  sent["bytes_source"] += down
  # A computes [[dL/dPhi]], the alignment part of [[dL/du^A]] and the loss,
  # under B's key.
  yc_enc = _pl.encode(pk_b, -0.5 * yc / n_ab)
  phi_enc = _pl.encode(pk_b, 0.25 * phi / n_ab)
  g_phi_enc = []
  for c in range(d):
    lin = _pl.total([_pl.mul(e_ub[i * d + c], yc_enc[i]) for i in range(n_ab)])
    quad = _pl.total([_pl.mul(e_uu[c * d + k], phi_enc[k]) for k in range(d)])
    g_phi_enc.append(lin + quad)
  align_coef = _pl.encode(pk_b, [-2.0 * gamma / n_ab])[0]
  g_align_enc = [
    _pl.mul(e_ub[j], align_coef) + 2.0 * gamma * float(v) / n_ab
    for j, v in enumerate(ua_ab.ravel())
  ]
  # Loss: L1 = log2 + sum_i(-y_i/2 Phi.u^B_i)/N + Phi^T (sum u u^T) Phi/(8N);
  # L2 = (sum ||u^A_i||^2 - 2 sum u^A_i.u^B_i + tr(sum u u^T)) / N.
  lin_coef = _pl.encode(
    pk_b, (-0.5 * yc[:, None] * phi[None] - 2.0 * gamma * ua_ab).ravel() / n_ab
  )
  quad_coef = _pl.encode(
    pk_b, (np.outer(phi, phi) / 8.0 + gamma * np.eye(d)).ravel() / n_ab
  )
  e_loss = (
    _pl.total([_pl.mul(e, c) for e, c in zip(e_ub, lin_coef)])
    + _pl.total([_pl.mul(e, c) for e, c in zip(e_uu, quad_coef)])
    + (LOG2 + gamma * float(np.sum(ua_ab**2)) / n_ab)
  )
  vals, up, down = _pl.masked_decrypt(
    pk_b, sk_b, g_phi_enc + g_align_enc + [e_loss]
  )
  sent["bytes_source"] += up
  sent["bytes_target"] += down
  g_phi = vals[:d]
  g_align = vals[d : d + n_ab * d].reshape(n_ab, d)
  loss = float(vals[-1])
  g_a = y[:, None] * g_phi[None] / n_a
  np.add.at(g_a, rows_source, g_align)
  return g_a, g_b.reshape(n_ab, d), loss, sent


def build_ftl_process(
  data: FTLData,
  source_net: Model,
  target_net: Model,
  optimizer: optax.GradientTransformation,
  *,
  gamma: float = 1.0,
  l2: float = 1e-3,
  mode: str = "plaintext",
  key_bits: int = _pl.MIN_KEY_BITS,
  insecure_ok: bool = False,
) -> FTLProcess:
  """FTL as a process.

  Args:
    data: :class:`FTLData` (e.g. from :meth:`FTLData.from_parties`).
    source_net, target_net: :class:`~fedjax_lite.models.Model` s mapping each
      party's rows to representations of one common width ``d``.
    optimizer: optax optimizer for both networks.
    gamma: weight of the alignment loss ``L_2``.
    l2: ``lambda`` of the weight penalty.
    mode: ``"plaintext"`` or ``"paillier"`` (each party's key of
      ``key_bits`` bits; keep the overlap and ``d`` small: every overlap
      coordinate is a ciphertext).
    key_bits: Paillier modulus size; at least 2048
      (:data:`fedjax_lite.vertical.paillier.MIN_KEY_BITS`, the usual minimum
      for real use) unless ``insecure_ok``.
    insecure_ok: allow ``key_bits`` below 2048 (toy keys: tests and cost
      benchmarks of the protocol only).

  Raises:
    ValueError: if a network does not accept its party's rows, the two
      representation widths differ, or (``mode="paillier"``) ``key_bits``
      is below 2048 without ``insecure_ok``.
  """
  return FTLProcess(
    data,
    source_net,
    target_net,
    optimizer,
    gamma=gamma,
    l2=l2,
    mode=mode,
    key_bits=key_bits,
    insecure_ok=insecure_ok,
  )


def train_target_alone(
  x: np.ndarray,
  labels: np.ndarray,
  net: Model,
  optimizer: optax.GradientTransformation,
  *,
  num_steps: int,
  l2: float = 1e-3,
  seed: int = 0,
):
  """The baseline: the target's own network plus a linear head trained on the
  only labeled rows it has, with the (exact) logistic loss, full batch.

  Returns ``predict(x) -> scores`` (sign = label).
  """
  y = jnp.asarray(to_pm1(labels, "labels"))
  x = jnp.asarray(x)
  key = jax.random.PRNGKey(seed)
  width = jax.eval_shape(
    lambda p: net.apply(p, {net.input_key: x}), jax.eval_shape(net.init, key)
  ).shape[1]
  params = (net.init(key), jnp.zeros((width,)), jnp.zeros(()))

  def scores(p, x):
    return net.apply(p[0], {net.input_key: x}) @ p[1] + p[2]

  def loss(p):
    return jnp.mean(jnp.logaddexp(0.0, -y * scores(p, x))) + 0.5 * l2 * _l2(p)

  @jax.jit
  def run(params):
    def body(carry, _):
      p, s = carry
      g = jax.grad(loss)(p)
      u, s = optimizer.update(g, s, p)
      return (optax.apply_updates(p, u), s), None

    (params, _), _ = jax.lax.scan(
      body, (params, optimizer.init(params)), None, length=num_steps
    )
    return params

  params = run(params)
  return lambda xq: np.asarray(scores(params, jnp.asarray(xq)))
