r"""t-of-n Shamir secret sharing over the prime field :math:`\mathbb{F}_p`,
:math:`p = 2^{127} - 1` (Shamir 1979, "How to share a secret").

A secret :math:`s \in \mathbb{F}_p` is the constant term of a random
polynomial of degree :math:`t - 1`,

.. math:: f(x) = s + a_1 x + \dots + a_{t-1} x^{t-1}, \qquad
          a_j \sim \mathrm{Uniform}(\mathbb{F}_p),

and holder ``i`` receives the share :math:`(x_i, f(x_i))` at a distinct
nonzero point :math:`x_i`. Any ``t`` shares give back
:math:`s = f(0) = \sum_i \lambda_i f(x_i)` with the Lagrange coefficients
:math:`\lambda_i = \prod_{j \ne i} x_j / (x_j - x_i)`; any ``t - 1`` shares
are uniformly distributed whatever ``s`` is (information-theoretic secrecy).

Byte strings (X25519 private keys, mask seeds) are split into 15-byte chunks,
one field element each (:math:`2^{120} < p`), and every chunk is shared with
its own polynomial at the same points. Plain Python integers, on the host:
sharing is per client (``num_holders x threshold`` multiplications per
field element), never per model parameter.

Consistency (:func:`check_shares`): ``h > t`` shares are redundant, and
the server can test that they all lie on one polynomial of degree
``t - 1`` (a random parity check of the Reed-Solomon code the shares form,
``O(h)`` per secret) and, when exactly one is wrong and ``h >= t + 2``, pin
it. Exactly ``t`` shares fit every set of values: a wrong one among them
cannot be detected.

Layer: ``fedjax_lite.privacy`` (imports nothing from fedjax_lite).
"""

from __future__ import annotations

import math
import operator
import secrets
from collections.abc import Sequence

PRIME = (1 << 127) - 1
CHUNK_BYTES = 15  # 120 bits < 127: every chunk is a field element
ELEMENT_BYTES = 16  # wire size of one field element (127 bits)


def bytes_to_elements(secret: bytes) -> list[int]:
  """Splits a byte string into field elements of 15 bytes (big-endian)."""
  return [
    int.from_bytes(secret[i : i + CHUNK_BYTES], "big")
    for i in range(0, len(secret), CHUNK_BYTES)
  ]


def elements_to_bytes(elements: Sequence[int], num_bytes: int) -> bytes:
  """Inverse of :func:`bytes_to_elements` for a secret of ``num_bytes``."""
  out = b""
  for i, e in enumerate(elements):
    size = min(CHUNK_BYTES, num_bytes - i * CHUNK_BYTES)
    if size <= 0 or not 0 <= e < (1 << (8 * size)):
      raise ValueError(
        f"field element {i} ({e}) does not encode a "
        f"{size}-byte chunk of a {num_bytes}-byte secret: the "
        "shares are inconsistent or too few."
      )
    out += int(e).to_bytes(size, "big")
  return out


def num_elements(num_bytes: int) -> int:
  return -(-num_bytes // CHUNK_BYTES)


def _check_threshold(threshold: int, num_points: int) -> None:
  if (
    isinstance(threshold, bool)
    or not isinstance(threshold, int)
    or threshold < 1
  ):
    raise ValueError(f"threshold must be an int >= 1, got {threshold!r}.")
  if threshold > num_points:
    raise ValueError(
      f"threshold={threshold} exceeds the number of share "
      f"holders ({num_points}); expected threshold <= "
      f"{num_points}."
    )


def split(
  secrets: Sequence[int], threshold: int, xs: Sequence[int], randbits
) -> list[list[int]]:
  """Shares field elements among holders at points ``xs``.

  Args:
    secrets: field elements ``s_e`` in ``[0, p)`` (one polynomial each).
    threshold: ``t``: any ``t`` shares reconstruct, ``t - 1`` reveal nothing.
    xs: distinct nonzero evaluation points in ``[1, p)``, one per holder.
    randbits: ``k -> uniform int in [0, 2^k)`` (e.g. ``random.getrandbits``
      of a seeded ``random.Random``, or ``secrets.randbits``).

  Returns:
    ``shares[h][e] = f_e(xs[h])``: holder ``h``'s share of every secret.
  """
  _check_threshold(threshold, len(xs))
  if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
    raise ValueError("xs must be distinct points in [1, p).")
  for s in secrets:
    if not 0 <= s < PRIME:
      raise ValueError(f"secret {s} is not a field element in [0, 2^127-1).")
  polys = []
  for s in secrets:
    coeffs = [s]
    while len(coeffs) < threshold:
      a = randbits(127)
      if a < PRIME:  # rejection sampling: uniform on F_p
        coeffs.append(a)
    polys.append(coeffs[::-1])  # highest degree first, for Horner
  shares = []
  for x in xs:
    row = []
    for coeffs in polys:
      acc = 0
      for a in coeffs:
        acc = (acc * x + a) % PRIME
      row.append(acc)
    shares.append(row)
  return shares


def lagrange_at_zero(xs: Sequence[int]) -> list[int]:
  r"""Coefficients :math:`\lambda_i` with :math:`f(0) = \sum_i \lambda_i
  f(x_i)` for any polynomial of degree ``< len(xs)``."""
  if len(set(xs)) != len(xs):
    raise ValueError(f"share points must be distinct, got {list(xs)}.")
  lams = []
  for i, xi in enumerate(xs):
    num, den = 1, 1
    for j, xj in enumerate(xs):
      if j != i:
        num = num * xj % PRIME
        den = den * (xj - xi) % PRIME
    lams.append(num * pow(den, -1, PRIME) % PRIME)
  return lams


def reconstruct(
  xs: Sequence[int],
  shares: Sequence[Sequence[int]],
  threshold: int,
  lams: Sequence[int] | None = None,
) -> list[int]:
  """The secrets from ``len(xs) >= threshold`` holders' shares.

  Uses the first ``threshold`` shares (any ``t`` give the same answer).

  Args:
    xs: the holders' points.
    shares: ``shares[h]``: holder ``h``'s shares of every secret.
    threshold: ``t`` used when splitting.
    lams: precomputed :func:`lagrange_at_zero` of ``xs[:threshold]``
      (optional; reuse it when many secrets share the same holders).

  Raises:
    ValueError: fewer than ``threshold`` shares.
  """
  if len(xs) != len(shares):
    raise ValueError(f"got {len(xs)} points but {len(shares)} shares.")
  if len(xs) < threshold:
    raise ValueError(
      f"reconstruction needs threshold={threshold} shares, got {len(xs)}."
    )
  xs, shares = list(xs[:threshold]), list(shares[:threshold])
  if lams is None:
    lams = lagrange_at_zero(xs)
  num = len(shares[0])
  return [
    sum(map(operator.mul, lams, [s[e] for s in shares])) % PRIME
    for e in range(num)
  ]


# ------------------------------------------------------- consistency checks
def _random_element(randbits) -> int:
  while True:  # rejection sampling: uniform on F_p
    a = randbits(127)
    if a < PRIME:
      return a


def barycentric_weights(xs: Sequence[int]) -> list[int]:
  r""":math:`w_i = 1 / \prod_{j \ne i} (x_i - x_j)` for distinct points."""
  if len(set(xs)) != len(xs):
    raise ValueError(f"share points must be distinct, got {list(xs)}.")
  return [
    pow(math.prod(xi - xj for xj in xs if xj != xi) % PRIME, -1, PRIME)
    for xi in xs
  ]


def _dual_vector(xs, weights, degree: int, randbits) -> list[int]:
  """``w_i g(x_i)`` for a uniformly random ``g`` of degree ``< degree``."""
  coeffs = [_random_element(randbits) for _ in range(degree)]
  out = []
  for x, w in zip(xs, weights):
    acc = 0
    for a in coeffs:  # Horner
      acc = (acc * x + a) % PRIME
    out.append(w * acc % PRIME)
  return out


def parity_check(xs: Sequence[int], threshold: int, randbits=None) -> list[int]:
  r"""A random parity check of ``t``-of-``h`` shares at the points ``xs``.

  For :math:`g` uniform among the polynomials of degree :math:`< h - t`,
  :math:`a_i = w_i\, g(x_i)` (:func:`barycentric_weights`). Shares
  :math:`y_i = f(x_i)` of any :math:`f` of degree :math:`< t` satisfy
  :math:`\sum_i a_i y_i = 0` (:math:`g f` has degree :math:`\le h - 2`, and
  :math:`\sum_i w_i P(x_i)` is the leading coefficient of the interpolant of
  degree :math:`h - 1`, zero for such :math:`P`); shares that lie on no such
  polynomial give a nonzero sum except with probability :math:`1/p` over
  ``g`` (the vectors :math:`a` span the dual of the Reed-Solomon code of the
  shares). ``O(h^2)`` once per set of points, then ``O(h)`` per secret
  (:func:`check_shares`). Draw ``g`` after the shares are fixed
  (``randbits`` default: :func:`secrets.randbits`).
  """
  _check_threshold(threshold, len(xs))
  randbits = secrets.randbits if randbits is None else randbits
  return _dual_vector(
    xs, barycentric_weights(xs), len(xs) - threshold, randbits
  )


def check_shares(
  xs: Sequence[int],
  shares: Sequence[Sequence[int]],
  threshold: int,
  parity: Sequence[int] | None = None,
  randbits=None,
) -> list[int]:
  """Positions of shares that do not lie on one polynomial of degree ``< t``.

  With ``h = len(xs)`` shares of a ``t``-of-``h`` sharing (several secrets
  per share, one polynomial each):

  * ``[]``: every secret's shares lie on one polynomial of degree ``< t``
    (always so when ``h == t``: ``t`` shares fit any values, so nothing can
    be checked);
  * ``[i]``: they do not, and leaving out share ``i`` alone makes the others
    consistent: share ``i`` is the wrong one (needs ``h >= t + 2``; pins it
    correctly when exactly one share is wrong);
  * every position: they do not, and no single share can be pinned (``h ==
    t + 1``, or several shares are wrong).

  Leaving out share ``i`` multiplies the barycentric weights by
  :math:`x_j - x_i`, so the parity sums of all ``h`` subsets are
  :math:`A - x_i B` for two sums :math:`A, B` over all shares: the wrong
  share sits at :math:`x_i = A / B`. A test passes a wrong share with
  probability about :math:`h/p`.

  Args:
    xs: the holders' distinct points.
    shares: ``shares[h][e]``: holder ``h``'s share of secret ``e``.
    threshold: ``t`` used when splitting.
    parity: :func:`parity_check` of ``(xs, threshold)`` (reuse it for many
      secrets shared at the same points); drawn here if None.
    randbits: randomness for the checks (default :func:`secrets.randbits`).
  """
  h = len(xs)
  if len(shares) != h:
    raise ValueError(f"got {h} points but {len(shares)} shares.")
  _check_threshold(threshold, h)
  if h == threshold or not shares:
    return []
  randbits = secrets.randbits if randbits is None else randbits
  if parity is None:
    parity = parity_check(xs, threshold, randbits)
  num = len(shares[0])
  bad = [
    e
    for e in range(num)
    if sum(map(operator.mul, parity, [s[e] for s in shares])) % PRIME
  ]
  if not bad:
    return []
  everyone = list(range(h))
  if h < threshold + 2:
    return everyone
  weights = barycentric_weights(xs)
  g = _dual_vector(xs, weights, h - 1 - threshold, randbits)
  gx = [a * x % PRIME for a, x in zip(g, xs)]
  culprit = None
  for e in bad:
    ys = [s[e] for s in shares]
    b = sum(map(operator.mul, g, ys)) % PRIME
    a = sum(map(operator.mul, gx, ys)) % PRIME
    if b == 0:
      return everyone
    x = a * pow(b, -1, PRIME) % PRIME
    if culprit is not None and x != culprit:
      return everyone
    culprit = x
  return [list(xs).index(culprit)] if culprit in xs else everyone
