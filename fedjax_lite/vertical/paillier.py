"""Paillier helpers (``phe``): fixed-point encoding, masking, byte counts.

Paillier (1999) is additively homomorphic: ``[[a]] [[b]] = [[a + b]]`` and
``[[a]]^k = [[k a]]`` for a public integer ``k``. ``phe`` encodes a float
``v`` as an integer mantissa and a base-16 exponent; we encode every value a
protocol sums with one fixed precision (:data:`PRECISION`) so that all
ciphertexts of a vector share one exponent and sums need no rescaling.

Masking (the arbiter pattern of Hardy et al. 2017): a party adds a fresh
uniform ``r`` in ``Z_n`` to its ciphertext (``[[m]] Enc(r) = [[m + r mod n]]``,
which also re-randomizes it), the key holder decrypts the raw residue
``m + r mod n`` (a uniformly random number: it learns nothing about ``m``),
and the party subtracts ``r`` and decodes. This hides ``m`` perfectly from
the key holder, unlike masking with random floats.

Sizes: a ciphertext is an integer below ``n^2`` (:func:`ciphertext_bytes`),
a raw decrypted residue one below ``n`` (:func:`plaintext_bytes`). Keys of
1024 bits or fewer are for tests and benchmarks of the protocol's cost only;
2048 bits (:data:`MIN_KEY_BITS`) is the usual minimum for real use, and
:func:`keypair` refuses smaller keys unless the caller passes
``insecure_ok=True``.
"""

from __future__ import annotations

import functools
import operator
from typing import Sequence

import numpy as np

from fedjax_lite import checks
from fedjax_lite._optional import optional_import

phe = optional_import("phe", "vertical")  # imported at first use

PRECISION = 2.0**-32
# The usual minimum modulus for real use (NIST SP 800-57: 2048-bit RSA-type
# moduli for 112-bit security).
MIN_KEY_BITS = 2048


def check_key_bits(key_bits, insecure_ok: bool = False) -> int:
  """Checks a Paillier modulus size; returns it as an int.

  Raises:
    ValueError: for ``key_bits < 2048`` (:data:`MIN_KEY_BITS`) unless
      ``insecure_ok``, and always below 128 bits (too small to hold the
      fixed-point values).
  """
  key_bits = checks.positive_int("key_bits", key_bits)
  if key_bits < 128:
    raise ValueError(
      f"key_bits={key_bits} is too small to hold the "
      "fixed-point values; use >= 256 (tests) or 2048 (real)."
    )
  if key_bits < MIN_KEY_BITS and not insecure_ok:
    raise ValueError(
      f"key_bits={key_bits} is below {MIN_KEY_BITS}, the usual minimum "
      f"Paillier modulus for real use; use key_bits={MIN_KEY_BITS} (or "
      "more), or pass insecure_ok=True for a toy key in tests and cost "
      "benchmarks."
    )
  return key_bits


def keypair(key_bits: int = MIN_KEY_BITS, *, insecure_ok: bool = False):
  """``(public_key, private_key)`` with an ``key_bits``-bit modulus ``n``.

  ``key_bits`` below 2048 (:data:`MIN_KEY_BITS`) needs ``insecure_ok=True``
  (toy keys for tests and cost benchmarks; see :func:`check_key_bits`).
  """
  key_bits = check_key_bits(key_bits, insecure_ok)
  return phe.generate_paillier_keypair(n_length=key_bits)


def ciphertext_bytes(pk) -> int:
  return (pk.nsquare.bit_length() + 7) // 8


def plaintext_bytes(pk) -> int:
  return (pk.n.bit_length() + 7) // 8


def encode(pk, values) -> list:
  """Fixed-point ``EncodedNumber`` per value (exponent from PRECISION)."""
  return [
    phe.EncodedNumber.encode(pk, float(v), precision=PRECISION)
    for v in np.asarray(values, np.float64).ravel()
  ]


def encrypt(pk, values) -> list:
  """Fresh (obfuscated) ciphertexts of ``values`` at fixed precision."""
  return [pk.encrypt(e) for e in encode(pk, values)]


def rerandomize(enc: Sequence) -> list:
  """Fresh randomness for ciphertexts about to leave the party: without it a
  receiver that made ``[[a]]`` could strip ``[[a]]^k`` off ``[[a]]^k Enc(t)``
  and read the sender's plaintext ``t``."""
  for e in enc:
    e.obfuscate()
  return list(enc)


def total(enc: Sequence):
  """Homomorphic sum of a non-empty list of ciphertexts."""
  return functools.reduce(operator.add, enc)


def mul(e, p):
  """``[[a]]^k = [[k a]]`` for an ``EncodedNumber`` ``p`` (mantissa ``k``).

  The same as ``e * p`` in ``phe``, but a negative mantissa is inverted with
  Python's built-in modular inverse (``pow(c, -1, n^2)``) instead of ``phe``'s
  pure-Python extended Euclid, which dominates without gmpy2.
  """
  pk = e.public_key
  c, k = e.ciphertext(be_secure=False), p.encoding
  if k >= pk.n - pk.max_int:  # a negative mantissa
    c, k = pow(c, -1, pk.nsquare), pk.n - k
  return phe.EncryptedNumber(pk, pow(c, k, pk.nsquare), e.exponent + p.exponent)


def matvec_t(enc_d: Sequence, x: np.ndarray) -> list:
  """``[[x^T d]]``: column ``j`` is ``prod_i [[d_i]]^{x_ij}``, for a plaintext
  ``x`` ``[b, k]`` and ciphertexts ``[[d]]`` ``[b]``."""
  x = np.asarray(x, np.float64)
  cols = []
  for j in range(x.shape[1]):
    enc_x = encode(enc_d[0].public_key, x[:, j])
    cols.append(total([mul(d, e) for d, e in zip(enc_d, enc_x)]))
  return cols


def mask(enc: Sequence, rng=None) -> tuple[list, list[int]]:
  """``([[m_i + r_i mod n]], r)`` with fresh uniform ``r_i`` in ``Z_n``."""
  out, rs = [], []
  for e in enc:
    pk = e.public_key
    r = pk.get_random_lt_n()
    c = (e.ciphertext(be_secure=False) * pk.raw_encrypt(r)) % pk.nsquare
    out.append(phe.EncryptedNumber(pk, c, e.exponent))
    rs.append(r)
  return out, rs


def decrypt_raw(sk, enc: Sequence) -> list[int]:
  """The key holder's side: the raw residues ``m + r mod n`` (no decoding)."""
  return [sk.raw_decrypt(e.ciphertext(be_secure=False)) for e in enc]


def unmask(
  pk, raw: Sequence[int], masks: Sequence[int], exponents: Sequence[int]
) -> np.ndarray:
  """Removes the masks and decodes: ``[m_i]`` float64."""
  return np.asarray(
    [
      phe.EncodedNumber(pk, (v - r) % pk.n, ex).decode()
      for v, r, ex in zip(raw, masks, exponents)
    ],
    np.float64,
  )


def masked_decrypt(pk, sk, enc: Sequence) -> tuple[np.ndarray, int, int]:
  """One round trip through the key holder: mask, decrypt raw, unmask.

  Returns ``(values, bytes to the key holder, bytes back)``.
  """
  masked, rs = mask(enc)
  raw = decrypt_raw(sk, masked)
  vals = unmask(pk, raw, rs, [e.exponent for e in enc])
  return vals, len(enc) * ciphertext_bytes(pk), len(enc) * plaintext_bytes(pk)
