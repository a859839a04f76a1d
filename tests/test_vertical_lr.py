"""Hetero LR equals centralized Taylor-loss LR; Paillier matches plaintext."""

import math

import chex
import jax
import numpy as np
import pytest

from fedjax_lite import vertical as fv
from fedjax_lite.vertical import hetero_lr


def _aligned(n=40, dims=(3, 2), seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, sum(dims))).astype(np.float32)
  w = rng.normal(size=sum(dims))
  y = (x @ w + 0.3 * rng.normal(size=n) > 0).astype(np.int32)
  cols = np.split(np.arange(sum(dims)), np.cumsum(dims)[:-1])
  ds = fv.split_vertical(
    x,
    y,
    feature_splits=cols,
    keep=[1.0] * len(dims),
    standardize=False,
    seed=seed,
  )
  aligned, _ = ds.align(seed=0)
  return aligned


def _reference(aligned, batches, lr, l2):
  """Centralized LR on the joined features, float64 numpy, same steps."""
  x = aligned.joined().astype(np.float64)
  y = 2.0 * aligned.y - 1.0
  w, b, losses = np.zeros(x.shape[1]), 0.0, []
  for rows in batches:
    xb, yb = x[rows], y[rows]
    z = xb @ w + b
    losses.append(
      np.mean(math.log(2) - 0.5 * yb * z + 0.125 * z * z) + 0.5 * l2 * w @ w
    )
    d = 0.25 * z - 0.5 * yb
    w, b = w - lr * (xb.T @ d / len(rows) + l2 * w), b - lr * d.mean()
  return w, b, losses


@pytest.mark.parametrize("batch_size", [None, 8])
@pytest.mark.parametrize("dims", [(3, 2), (2, 2, 3)])
def test_plaintext_equals_centralized_reference(batch_size, dims):
  aligned = _aligned(dims=dims)
  lr, l2, epochs = 0.3, 0.01, 4
  proc = fv.build_vertical_logistic_regression_process(
    aligned, learning_rate=lr, l2=l2, batch_size=batch_size
  )
  state = proc.initialize(seed=5)
  batches, losses = [], []
  for e in range(epochs):
    batches += list(
      np.asarray(
        hetero_lr.batch_indices(
          state.rng, state.epoch, aligned.num_examples, batch_size
        )
      )
    )
    state, m = proc.next(state)
    losses.append(m["loss"])
  w_ref, b_ref, l_ref = _reference(aligned, batches, lr, l2)
  np.testing.assert_allclose(
    np.concatenate(state.weights), w_ref, rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(float(state.bias), b_ref, rtol=1e-5, atol=1e-6)
  per_epoch = np.asarray(l_ref).reshape(epochs, -1).mean(1)
  np.testing.assert_allclose(losses, per_epoch, rtol=1e-5)


def test_plaintext_epoch_compiles_once():
  aligned = _aligned()
  proc = fv.build_vertical_logistic_regression_process(aligned, batch_size=8)
  epoch = chex.assert_max_traces(proc._epoch.__wrapped__, n=1)
  proc._epoch = jax.jit(epoch)
  state = proc.initialize(0)
  for _ in range(3):
    state, _ = proc.next(state)


def test_paillier_matches_plaintext():
  # A 256-bit Paillier key: fast, for testing the protocol only (insecure).
  aligned = _aligned(n=16)
  kw = dict(
    learning_rate=0.3, l2=0.01, batch_size=8, key_bits=256, insecure_ok=True
  )
  plain = fv.build_vertical_logistic_regression_process(aligned, **kw)
  enc = fv.build_vertical_logistic_regression_process(
    aligned, mode="paillier", **kw
  )
  sp, se = plain.initialize(1), enc.initialize(1)
  for _ in range(2):
    sp, mp = plain.next(sp)
    se, me = enc.next(se)
    assert abs(mp["loss"] - me["loss"]) < 1e-3
  np.testing.assert_allclose(
    np.concatenate(se.weights), np.concatenate(sp.weights), atol=1e-5
  )
  # 2 ciphertexts per row from the host, one from the guest, per epoch.
  ct = (enc._keys[0].nsquare.bit_length() + 7) // 8
  assert me["bytes_host"] >= 2 * 16 * ct and me["bytes_guest"] >= 16 * ct


def test_hetero_lr_rejects_bad_labels():
  aligned = _aligned()
  bad = fv.AlignedData(aligned.xs, aligned.y + 3, aligned.ids, aligned.names)
  with pytest.raises(ValueError, match="hetero LR is binary"):
    fv.build_vertical_logistic_regression_process(bad)
  with pytest.raises(ValueError, match="two-party"):
    fv.build_vertical_logistic_regression_process(
      _aligned(dims=(2, 2, 2)), mode="paillier"
    )


@pytest.mark.parametrize("batch_size", [0, -8])
def test_hetero_lr_rejects_a_batch_size_below_one(batch_size):
  with pytest.raises(
    ValueError,
    match=rf"batch_size must be a positive int or None.*got {batch_size}\.",
  ):
    fv.build_vertical_logistic_regression_process(
      _aligned(), batch_size=batch_size
    )


def test_paillier_keys_below_2048_bits_need_insecure_ok():
  with pytest.raises(
    ValueError, match=r"key_bits=128 is below 2048.*insecure_ok=True"
  ):
    fv.paillier.keypair(128)
  with pytest.raises(ValueError, match=r"key_bits=64 is too small"):
    fv.paillier.keypair(64, insecure_ok=True)
  pk, _ = fv.paillier.keypair(256, insecure_ok=True)
  assert pk.n.bit_length() == 256
  with pytest.raises(
    ValueError, match=r"key_bits=1024 is below 2048.*insecure_ok=True"
  ):
    fv.build_vertical_logistic_regression_process(
      _aligned(), mode="paillier", key_bits=1024
    )
