"""ECDH PSI over X25519: commutativity, exact intersection, blinded messages."""

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import x25519

from fedjax_lite.vertical import psi

P = 2**255 - 19
A24 = 486662


def _on_curve(u: bytes) -> bool:
  """Whether u is the u-coordinate of a point on Curve25519 (else: twist)."""
  x = int.from_bytes(u, "little") % P
  rhs = (x**3 + A24 * x * x + x) % P
  return rhs == 0 or pow(rhs, (P - 1) // 2, P) == 1


def test_blinding_commutes_on_curve_and_twist():
  rng = np.random.default_rng(0)
  kinds = set()
  for i in range(40):
    u = psi.hash_to_u(f"id{i}")
    a, b = psi.new_key(rng), psi.new_key(rng)
    ab = psi.blind(b, psi.blind(a, u))
    ba = psi.blind(a, psi.blind(b, u))
    assert ab == ba
    kinds.add(_on_curve(u))
  assert kinds == {True, False}  # both the curve and its twist were covered


def test_blinding_agrees_with_x25519_key_agreement():
  # X25519(b, X25519(a, 9)) is the Diffie-Hellman shared secret.
  a, b = x25519.X25519PrivateKey.generate(), x25519.X25519PrivateKey.generate()
  base = (9).to_bytes(32, "little")
  assert psi.blind(b, psi.blind(a, base)) == a.exchange(b.public_key())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", ["str", "int"])
def test_psi_finds_exact_intersection(seed, kind):
  rng = np.random.default_rng(seed)
  universe = rng.choice(10_000, size=300, replace=False)
  sets = [
    rng.choice(universe, size=int(rng.integers(60, 200)), replace=False)
    for _ in range(3)
  ]
  if kind == "str":
    sets = [np.asarray([f"cust-{v}" for v in s]) for s in sets]
  truth = set(sets[0]).intersection(sets[1], sets[2])
  res = psi.ecdh_psi(sets, names=["g", "h1", "h2"], seed=seed)
  assert res.size == len(truth)
  aligned = [s[r] for s, r in zip(sets, res.rows)]
  assert set(aligned[0].tolist()) == truth
  for a in aligned[1:]:  # same ids in the same order
    np.testing.assert_array_equal(a, aligned[0])


def test_two_party_psi_order_is_independent_of_row_order():
  ids_g = np.asarray([f"u{i}" for i in range(50)])
  ids_h = np.asarray([f"u{i}" for i in range(25, 90)])
  r1 = psi.ecdh_psi([ids_g, ids_h], seed=3)
  perm = np.random.default_rng(1).permutation(len(ids_h))
  r2 = psi.ecdh_psi([ids_g, ids_h[perm]], seed=3)
  np.testing.assert_array_equal(ids_g[r1.rows[0]], ids_g[r2.rows[0]])
  np.testing.assert_array_equal(ids_h[perm][r2.rows[1]], ids_g[r2.rows[0]])


def test_messages_never_contain_unblinded_ids():
  ids = [
    np.asarray([f"alice{i}" for i in range(30)]),
    np.asarray([f"alice{i}" for i in range(10, 50)]),
  ]
  res = psi.ecdh_psi(ids, names=["bank", "shop"], seed=0)
  raw = {psi.encode_id(i) for s in ids for i in s}
  hashed = {psi.hash_to_u(i) for s in ids for i in s}
  everything = b"".join(p for m in res.messages for p in m.payload)
  for m in res.messages:
    for p in m.payload:
      assert len(p) == psi.ELEMENT_BYTES
      assert p not in hashed  # not the bare hash
  for r in raw:
    assert r not in everything  # no raw id bytes anywhere
  assert b"alice" not in everything
  # Byte accounting: the host sends 32 B per own id and per guest id; the
  # guest 32 B per own id, per host id and per common id.
  n_g, n_h, m = 30, 40, res.size
  assert res.bytes_sent == {
    "bank": 32 * (n_g + n_h + m),
    "shop": 32 * (n_h + n_g),
  }


def test_psi_errors():
  with pytest.raises(ValueError, match="share no sample ids"):
    psi.ecdh_psi([np.asarray(["a", "b"]), np.asarray(["c", "d"])])
  with pytest.raises(ValueError, match="duplicate"):
    psi.ecdh_psi([np.asarray(["a", "a"]), np.asarray(["a"])])
  with pytest.raises(TypeError, match="different id types"):
    psi.ecdh_psi([np.asarray(["1", "2"]), np.asarray([1, 2])])
