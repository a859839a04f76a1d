"""FTL: closed-form exchanged gradients, Paillier protocol, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_lite as fl
from fedjax_lite import vertical as fv
from fedjax_lite.vertical import ftl


def _reps(n_a=12, n_ab=4, d=3, seed=0):
  rng = np.random.default_rng(seed)
  u_a = rng.normal(size=(n_a, d))
  u_b = rng.normal(size=(n_ab, d))
  y = rng.choice([-1.0, 1.0], n_a)
  rows = rng.choice(n_a, n_ab, replace=False)
  return u_a, u_b, y, rows


def _numpy_loss(u_a, u_b, y, rows, gamma):
  """The paper's loss (averaged over the overlap), float64."""
  phi = (y[:, None] * u_a).mean(0)
  total = 0.0
  for i, k in enumerate(rows):
    s = phi @ u_b[i]
    total += math.log(2) - 0.5 * y[k] * s + 0.125 * s * s
    total += gamma * np.sum((u_a[k] - u_b[i]) ** 2)
  return total / len(rows)


def test_closed_form_gradients_match_autodiff_and_reference():
  u_a, u_b, y, rows = _reps()
  gamma = 0.7
  args = [jnp.asarray(v) for v in (u_a, u_b, y, rows)]

  @jax.jit
  def both(u_a, u_b, y, rows):
    return (
      ftl.rep_grads(u_a, u_b, y, rows, gamma),
      jax.grad(ftl.ftl_loss, argnums=(0, 1))(u_a, u_b, y, rows, gamma),
    )

  (g_a, g_b, loss), auto = both(*args)
  np.testing.assert_allclose(g_a, auto[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g_b, auto[1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    loss, _numpy_loss(u_a, u_b, y, rows, gamma), rtol=1e-5
  )


def test_paillier_protocol_matches_plaintext():
  # 256-bit keys: fast, for testing the protocol only (insecure).
  u_a, u_b, y, rows = _reps()
  keys = (
    fv.paillier.keypair(256, insecure_ok=True),
    fv.paillier.keypair(256, insecure_ok=True),
  )
  g_a, g_b, loss, sent = ftl.encrypted_rep_grads(u_a, u_b, y, rows, 0.7, *keys)
  ref = ftl.rep_grads(*(jnp.asarray(v) for v in (u_a, u_b, y, rows)), 0.7)
  np.testing.assert_allclose(g_a, ref[0], atol=1e-6)
  np.testing.assert_allclose(g_b, ref[1], atol=1e-6)
  assert abs(loss - _numpy_loss(u_a, u_b, y, rows, 0.7)) < 1e-6
  assert sent["bytes_source"] > 0 and sent["bytes_target"] > 0


def _small_data():
  src, tgt, labels = fv.digits_transfer(
    num_overlap=6, num_source=20, num_target=14, seed=0
  )
  data, res = fv.FTLData.from_parties(src, tgt, seed=0)
  assert res.size == 6
  return data, labels


def test_process_modes_agree_and_plaintext_trains():
  data, labels = _small_data()
  net_a, net_b = (
    fl.models.mlp(32, 3, hidden=()),
    fl.models.mlp(32, 3, hidden=()),
  )
  kw = dict(gamma=0.1, l2=1e-3, key_bits=256, insecure_ok=True)
  plain = fv.build_ftl_process(data, net_a, net_b, optax.sgd(0.5), **kw)
  enc = fv.build_ftl_process(
    data, net_a, net_b, optax.sgd(0.5), mode="paillier", **kw
  )
  sp, se = plain.initialize(0), enc.initialize(0)
  sp, mp = plain.next(sp)
  se, me = enc.next(se)
  assert abs(mp["loss"] - me["loss"]) < 1e-4
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
    se.params,
    sp.params,
  )
  first = mp["loss"]
  for _ in range(20):
    sp, mp = plain.next(sp)
  assert mp["loss"] < first
  rest = data.target_non_overlap()
  ev = plain.evaluate(sp, data.x_target[rest], labels[rest])
  assert 0.0 <= ev["accuracy"] <= 1.0 and len(rest) == 8


def test_ftl_input_errors():
  src, tgt, _ = fv.digits_transfer(
    num_overlap=5, num_source=20, num_target=10, seed=0
  )
  unlabeled = fv.Party(src.name, src.ids, src.x)
  with pytest.raises(ValueError, match="no label column"):
    fv.FTLData.from_parties(unlabeled, tgt)
  stranger = fv.Party("target", np.asarray([f"x{i}" for i in range(10)]), tgt.x)
  with pytest.raises(ValueError, match="share no sample ids"):
    fv.FTLData.from_parties(src, stranger)
  with pytest.raises(ValueError, match="misaligned overlap"):
    fv.FTLData(src.x, np.ones(20), tgt.x, np.arange(3), np.arange(2))


def test_ftl_overlap_rows_are_checked_on_the_host():
  """Row indices outside a table would be clamped (jnp) or wrapped (numpy)
  into a wrong row: refused, naming the argument, the row and the range
  (issue 23, case 6)."""
  src, tgt, _ = fv.digits_transfer(
    num_overlap=5, num_source=20, num_target=10, seed=0
  )
  x_s, y_s = src.x[:4], np.ones(4)
  with pytest.raises(
    ValueError,
    match=r"rows_source has row 9 at position 1; expected rows in "
    r"\[0, 4\) \(the 4 rows of x_source\)",
  ):
    fv.FTLData(x_s, y_s, tgt.x, np.array([0, 9]), np.array([0, 1]))
  with pytest.raises(
    ValueError,
    match=r"rows_target has row -1 at position 0; expected rows in "
    r"\[0, 10\)",
  ):
    fv.FTLData(x_s, y_s, tgt.x, np.array([0, 1]), np.array([-1, 0]))
  with pytest.raises(
    ValueError, match=r"rows_source must be 1-D integer.*float"
  ):
    fv.FTLData(x_s, y_s, tgt.x, np.array([0.0, 1.0]), np.array([0, 1]))
  with pytest.raises(ValueError, match=r"rows_target repeats row 3"):
    fv.FTLData(x_s, y_s, tgt.x, np.array([0, 1]), np.array([3, 3]))


def test_ftl_representation_widths_are_checked_at_build_time():
  data, _ = _small_data()
  net_a = fl.models.mlp(32, 3, hidden=())
  with pytest.raises(
    ValueError,
    match=r"source_net maps rows to width 3, target_net to "
    r"width 4; expected one common width",
  ):
    fv.build_ftl_process(
      data, net_a, fl.models.mlp(32, 4, hidden=()), optax.sgd(0.5)
    )
  with pytest.raises(
    ValueError,
    match=r"target_net does not accept x_target's rows of shape "
    r"\(32,\)",
  ):
    fv.build_ftl_process(
      data, net_a, fl.models.mlp(30, 3, hidden=()), optax.sgd(0.5)
    )


def test_ftl_paillier_refuses_small_keys_unless_insecure_ok():
  data, _ = _small_data()
  net = fl.models.mlp(32, 3, hidden=())
  with pytest.raises(
    ValueError, match=r"key_bits=1024 is below 2048.*insecure_ok=True"
  ):
    fv.build_ftl_process(
      data, net, net, optax.sgd(0.5), mode="paillier", key_bits=1024
    )
  fv.build_ftl_process(
    data,
    net,
    net,
    optax.sgd(0.5),
    mode="paillier",
    key_bits=1024,
    insecure_ok=True,
  )
