r"""Secure aggregation: SecAgg (Bonawitz et al. 2017) and SecAgg+ (Bell et al.
2020), simulated in one process with real X25519 keys, HKDF, AES-GCM and
Shamir sharing, and the masked modular sum vectorized in JAX.

Papers: Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving
Machine Learning", CCS 2017 (ePrint 2017/281); Bell et al., "Secure
Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020
(ePrint 2020/704).

Protocol (one round, ``n`` clients, neighbour graph ``G``, threshold ``t``)::

  0 AdvertiseKeys   client u: X25519 key pairs (c_u^SK, c_u^PK) for share
                    encryption and (s_u^SK, s_u^PK) for masks -> server -> N(u)
  1 ShareKeys       u draws a self-mask seed b_u (16 bytes), Shamir-splits
                    s_u^SK (32 bytes -> 3 field elements) and b_u (2 elements)
                    t-of-|N(u)|+1 among N(u) and itself, encrypts v's share
                    with AES-GCM under HKDF(X25519(c_u^SK, c_v^PK)) -> server
                    routes the ciphertexts to v
  2 MaskedInput     s_uv = HKDF(X25519(s_u^SK, s_v^PK)); u sends
                    y_u = q_u + PRG(b_u) + sum_{v in N(u)} sgn(u, v) PRG(s_uv)
                    mod 2^b, sgn(u, v) = +1 if u < v else -1
  3 Unmasking       server announces the survivors U; each survivor v decrypts
                    what it holds and reveals shares of b_u for u in U and of
                    s_u^SK for dropped u; the server reconstructs them (needs t
                    shares each, else it REFUSES before any share is revealed),
                    recomputes s_dv for every dropped d and surviving
                    neighbour v, and outputs
                    z = sum_{u in U} y_u - sum_{u in U} PRG(b_u)
                          - sum_{v in U, d not in U, v ~ d} sgn(v, d) PRG(s_vd)
                      = sum_{u in U} q_u   (mod 2^b)

SecAgg is ``G`` = the complete graph. SecAgg+ replaces it by a random
``k``-regular Harary graph (nodes on a ring in a random order, each joined to
its ``k/2`` nearest on either side), so each client agrees keys with, shares
with and masks against ``k = O(log n)`` peers instead of ``n - 1``
(:func:`secagg_plus_degree` picks ``k``). Threshold rule (both): a strict
majority of the ``h`` share holders (``h = n`` for SecAgg, ``k + 1`` for
SecAgg+: the neighbours and the client itself), ``h // 2 + 1 <= t <= h``.
With ``2t > h`` any two sets of ``t`` holders intersect, and an honest holder
reveals for a client u either its share of b_u or of s_u^SK, never both:
this is the paper's reason for a majority threshold against a server that
lies about who dropped (its full active-server argument also needs the
ConsistencyCheck round and signatures, not implemented here). Correctness
needs ``t`` surviving holders for every client.

Dropouts are simulated after masking (a client completes AdvertiseKeys and
ShareKeys, then its masked input never arrives) -- the case that needs the
unmasking machinery; clients that drop before ShareKeys would simply be left
out of the round and are not simulated separately.

Quantization (fixed point, no wrap-around): each update is clipped to L2 norm
``C`` (so every coordinate is in ``[-C, C]``), then
``q = round(x L / C) + L`` with ``L = 2^{bits_per_value} - 1``, an integer in
``[0, 2L] \subset [0, 2^{bits_per_value + 1})``. The sum of ``n`` of them is
below ``2^{bits_per_value + 1 + ceil(log2 n)}``, hence the headroom rule

.. math:: b \ge \text{bits\_per\_value} + \lceil \log_2 n \rceil + 1,
          \qquad b \le 32,

so the sum in :math:`\mathbb{Z}_{2^b}` is the exact integer sum. Arithmetic is
uint32 (wrapping mod :math:`2^{32}`) reduced mod :math:`2^b`
(:math:`2^b \mid 2^{32}`). The server decodes
:math:`\sum_u x_u \approx (z - |U| L) C / L`.

Where each step runs: key generation, X25519 agreements, HKDF, AES-GCM and
Shamir sharing/reconstruction are per client or per pair of clients (never per
model parameter) and run on the host in Python; mask expansion and the
modular sums are per parameter and run on device, vectorized over clients
(``vmap``) and over a client's neighbours (``lax.fori_loop``).

PRG: masks are expanded with JAX's threefry2x32 counter-based generator
(``jax.random.bits``) keyed by the first 64 bits of the 32-byte HKDF output
(or of b_u). Threefry (Salmon et al. 2011) passes statistical test batteries
and is fast on accelerators, but it is not a vetted cryptographic PRG and a
64-bit key can be brute-forced; the masks here are statistically uniform,
not computationally secure. A deployment would expand the full 256-bit seed
with AES-CTR or ChaCha20.

What this simulation protects and what it does not:

* Protects (in the protocol's honest-but-curious server model): the server
  only ever holds public keys, AES-GCM ciphertexts it cannot decrypt, masked
  vectors that are uniform in :math:`\mathbb{Z}_{2^b}` on their own, the
  survivor list and the shares survivors reveal; it learns the sum of the
  survivors' quantized updates and nothing else about an individual one
  (up to the PRG's strength), also when clients drop, as long as fewer than
  ``t`` holders of a client collude with it.
* Does not protect: all parties live in one Python process and the network is
  simulated (messages are counted, not sent); there are no signatures or
  PKI (the paper's active-adversary variant with a consistency check round
  and signed keys is not implemented), so a server that substitutes public
  keys (man in the middle) or a malicious client is out of scope beyond the
  checks below; there are no defences against malicious clients sending
  out-of-range inputs (a client can shift the sum arbitrarily); the PRG
  caveat above; by default the key
  material comes from a seeded NumPy/``random`` generator so runs are
  reproducible (``seed=None`` draws from the OS CSPRNG instead); the sum
  itself is revealed (combine with DP for that, see :func:`secure_aggregator`).

What the server checks during Unmasking (refusing with :class:`SecAggError`,
naming the clients, and unmasking nothing):

* Every share ciphertext is AES-GCM authenticated: an altered one (or one
  under another key) fails authentication (``REFUSED_AUTHENTICATION``, names
  sender and recipient); one that decrypts but names another pair of clients
  is misrouted or replayed (``REFUSED_MISROUTED``).
* Share consistency, when redundancy exists: a secret with more than ``t``
  revealed shares must have them all on one polynomial of degree ``t - 1``
  (a random parity check, :func:`shamir.check_shares`, ``O(h)`` per secret).
  A crafted but well-formed share (a client revealing a wrong share, or a
  dealer sharing inconsistent values) is refused with
  ``REFUSED_INCONSISTENT_SHARE``, naming the client whose share is wrong when
  exactly one is wrong and at least ``t + 2`` shares are revealed, else the
  set of holders.
* It does NOT detect: a wrong share when exactly ``t`` shares are revealed
  (``t`` points fit every polynomial of degree ``t - 1``; only a
  reconstructed value that encodes no valid key or seed is caught,
  ``REFUSED_UNDECODABLE``, without naming the share); several colluding
  clients whose wrong shares lie on another common polynomial (the wrong one
  may then be misattributed); a malicious client's masked input itself (see
  above); a malicious server (it could skip these checks, lie about who
  dropped, or substitute keys).

Refusals inside the jitted round: the host callbacks never raise (an
exception in one device's callback would leave the other devices waiting in
a collective and abort the process). A refused round returns a zero mean and
weight as placeholders, reports the reason in its metrics (``secagg_refused``
and the clients concerned) and records the :class:`SecAggError` on the
round's :class:`SecAggRound` (``refusal``); the aggregator's ``check_output``
raises that error on the host after the round (:meth:`Engine.round`,
:meth:`Engine.run`), so the refused round's state is never returned. Callers
of ``Engine.round_body`` / ``rounds_body`` must call
``Engine.check_metrics`` themselves and must not use the state of a refused
round.

Layer: ``fedjax_lite.privacy`` sits beside ``aggregators/`` (it imports
``aggregators/``); ``engine/`` and ``learning.py`` may import it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
import secrets as _secrets
import struct
import threading
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from fedjax_lite import checks
from fedjax_lite._optional import optional_import
from fedjax_lite.aggregators.base import (
  Aggregator,
  AggregatorOutput,
  check_float_updates,
  clip_by_norm,
  taking_part,
)
from fedjax_lite.privacy import shamir

# The privacy extra, imported at first use (fedjax_lite/_optional.py).
crypto_errors = optional_import("cryptography.exceptions", "privacy")
hashes = optional_import("cryptography.hazmat.primitives.hashes", "privacy")
x25519 = optional_import(
  "cryptography.hazmat.primitives.asymmetric.x25519", "privacy"
)
crypto_aead = optional_import(
  "cryptography.hazmat.primitives.ciphers.aead", "privacy"
)
hkdf = optional_import("cryptography.hazmat.primitives.kdf.hkdf", "privacy")
serialization = optional_import(
  "cryptography.hazmat.primitives.serialization", "privacy"
)
scipy_stats = optional_import("scipy.stats", "privacy")

PyTree = Any
MAX_BITS = 32
_MASK_INFO = b"fedjax_lite secagg pairwise mask v1"
_ENC_INFO = b"fedjax_lite secagg share encryption v1"
_KEY_BYTES = 32  # X25519 private key
_SEED_BYTES = 16  # self-mask seed b_u
_ID_BYTES = 4  # a client index on the wire
_NONCE_BYTES = 12
_TAG_BYTES = 16
_SK_ELEMS = shamir.num_elements(_KEY_BYTES)  # 3
_SEED_ELEMS = shamir.num_elements(_SEED_BYTES)  # 2


# Why the server refused to unmask a round (the ``secagg_refused`` metric).
REFUSED_THRESHOLD = 1  # a secret has fewer than t surviving holders
REFUSED_INCONSISTENT_SHARE = 2  # revealed shares on no polynomial of degree t-1
REFUSED_AUTHENTICATION = 3  # a share ciphertext failed AES-GCM authentication
REFUSED_MISROUTED = 4  # a share ciphertext names another pair of clients
REFUSED_UNDECODABLE = 5  # t shares reconstruct no valid secret encoding
REFUSED_HOST_ERROR = 6  # an unexpected error in the host callbacks


class SecAggError(ValueError):
  """The protocol refuses to unmask: fewer than ``t`` surviving holders of a
  secret, revealed shares that are inconsistent, or a share ciphertext that
  fails authentication (the message names the clients).

  Attributes:
    reason: one of the ``REFUSED_*`` codes.
    client: the client whose secret (or whose ciphertext) is concerned, -1
      if none (clients are numbered by their slot in the round's sample).
    peer: the other client (who revealed the wrong share, or the ciphertext's
      recipient), -1 if none or not pinned.
    holders: the number of that secret's surviving share holders, -1 if none.
  """

  def __init__(
    self,
    message: str,
    *,
    reason: int = REFUSED_HOST_ERROR,
    client: int = -1,
    peer: int = -1,
    holders: int = -1,
  ):
    super().__init__(message)
    self.reason = int(reason)
    self.client = int(client)
    self.peer = int(peer)
    self.holders = int(holders)


def refusal_message(
  reason: int,
  *,
  client: int,
  peer: int,
  holders: int,
  survivors: int,
  num_clients: int,
  threshold: int,
  degree: int,
  detail: str = "",
) -> str:
  """The one-line message of a refusal (the same from the protocol object
  and from a round's metrics; ``detail`` adds what metrics cannot hold)."""
  u, v, t, n = int(client), int(peer), int(threshold), int(num_clients)
  head = (
    f"secure aggregation refuses to unmask: {int(survivors)} of {n} "
    "clients survived"
  )
  kept = " The masked sum stays masked."
  if reason == REFUSED_THRESHOLD:
    complete = degree >= n - 1
    safe = safe_threshold(int(degree) + 1)
    graph = (
      "all clients" if complete else f"the client and its {degree} neighbours"
    )
    return (
      f"{head}, and client {u} has only {int(holders)} surviving share "
      f"holders ({graph}) but threshold t={t} shares are needed to remove "
      "its masks. No shares were revealed and the masked sum stays masked. "
      f"Expected at least t={t} surviving holders for every client (lower "
      "the dropout rate"
      + (", use more neighbours" if not complete else "")
      + (
        f", or pick a smaller t >= {safe})."
        if t > safe
        else "; t is already the safe minimum)."
      )
    )
  if reason == REFUSED_INCONSISTENT_SHARE:
    if v >= 0:
      return (
        f"{head}, but the share of client {u}'s secret revealed by client "
        f"{v} is inconsistent: it does not lie on the polynomial of degree "
        f"t-1={t - 1} through the other {int(holders) - 1} shares that "
        f"client {u}'s surviving holders revealed (a tampered or corrupted "
        "share)." + kept
      )
    return (
      f"{head}, but the {int(holders)} shares of client {u}'s secret "
      f"revealed by its surviving share holders{detail} do not lie on one "
      f"polynomial of degree t-1={t - 1} (a tampered or corrupted share), "
      "and no single wrong share can be pinned (t+1 shares, or several "
      "wrong)." + kept
    )
  if reason == REFUSED_AUTHENTICATION:
    return (
      f"{head}, but the encrypted share that client {u} sent to client {v} "
      "failed authentication (AES-GCM tag mismatch: the ciphertext was "
      "altered or encrypted under another key), so client "
      f"{v} cannot reveal it." + kept
    )
  if reason == REFUSED_MISROUTED:
    return (
      f"{head}, but the share ciphertext that client {v} holds from client "
      f"{u} decrypts to a share addressed to another pair of clients"
      f"{detail} (misrouted or replayed)." + kept
    )
  if reason == REFUSED_UNDECODABLE:
    return (
      f"{head}, but the t={t} shares of client {u}'s secret revealed by "
      f"its surviving share holders{detail} reconstruct a value that "
      "encodes no valid secret: a share is wrong, and with exactly t shares "
      "it cannot be told which." + kept
    )
  return (
    f"secure aggregation failed on the host and did not unmask the round"
    f"{detail}."
  )


# --------------------------------------------------------------- parameters
def min_modulus_bits(bits_per_value: int, num_clients: int) -> int:
  """``bits_per_value + ceil(log2 num_clients) + 1``: the sum never wraps."""
  return int(bits_per_value + math.ceil(math.log2(max(1, num_clients))) + 1)


def check_modulus_bits(
  bits: int,
  bits_per_value: int,
  num_clients: int,
  where: str = "secure aggregation",
) -> int:
  """Validates the modulus width ``b`` (``bits``) for ``num_clients``."""
  if not checks.is_int(bits_per_value) or bits_per_value < 1:
    raise ValueError(
      f"{where}: bits_per_value must be an int >= 1, got {bits_per_value!r}."
    )
  if not checks.is_int(bits):
    raise ValueError(
      f"{where}: bits must be an int in [2, {MAX_BITS}], got {bits!r}."
    )
  if bits > MAX_BITS:
    raise ValueError(
      f"{where}: bits={bits} exceeds {MAX_BITS}; expected "
      f"bits <= {MAX_BITS} (the masked sum is computed in "
      "uint32 on device). Lower bits_per_value or the number "
      "of clients per round."
    )
  need = min_modulus_bits(bits_per_value, num_clients)
  if bits < need:
    raise ValueError(
      f"{where}: bits={bits} is too small for the sum of {num_clients} "
      f"values of bits_per_value={bits_per_value}: expected bits >= "
      f"bits_per_value + ceil(log2(num_clients)) + 1 = {need} (else the "
      f"sum wraps mod 2^{bits}). Pass bits={min(need, MAX_BITS)}"
      + (
        "."
        if need <= MAX_BITS
        else f" after lowering bits_per_value to "
        f"{bits_per_value - (need - MAX_BITS)}."
      )
    )
  return int(bits)


def safe_threshold(num_holders: int) -> int:
  """The smallest safe threshold: a strict majority ``h // 2 + 1``."""
  return num_holders // 2 + 1


def resolve_threshold(threshold, num_holders: int, num_clients: int) -> int:
  """``threshold`` (int, fraction of the holders, or None) -> ``t``.

  Raises:
    ValueError: ``t`` above the number of holders, or below the strict
      majority ``num_holders // 2 + 1``.
  """
  lo = safe_threshold(num_holders)
  if threshold is None:
    return lo
  if isinstance(threshold, float) and 0 < threshold <= 1:
    t = math.ceil(threshold * num_holders)
  elif isinstance(threshold, (int, np.integer)) and not isinstance(
    threshold, bool
  ):
    t = int(threshold)
  else:
    raise ValueError(
      f"threshold must be an int, a fraction in (0, 1] of the "
      f"share holders, or None; got {threshold!r}."
    )
  what = (
    "all clients"
    if num_holders == num_clients
    else "the client and its neighbours"
  )
  if t > num_holders:
    raise ValueError(
      f"threshold={threshold!r} (t={t}) exceeds the {num_holders} share "
      f"holders of each secret ({what}, {num_clients} clients per round); "
      f"expected {lo} <= t <= {num_holders}."
    )
  if t < lo:
    raise ValueError(
      f"threshold={threshold!r} (t={t}) is below the safe minimum for "
      f"{num_holders} share holders ({what}): expected t >= "
      f"{num_holders} // 2 + 1 = {lo} (a strict majority, so no two "
      f"disjoint sets of t holders exist) and t <= {num_holders}."
    )
  return t


def secagg_plus_degree(
  num_clients: int,
  dropout_rate: float = 0.1,
  corrupt_fraction: float = 0.0,
  failure_log2: float = -20.0,
) -> tuple[int, int]:
  r"""SecAgg+ neighbourhood size ``k`` and threshold ``t`` for ``n`` clients.

  The smallest even ``k`` such that, with ``t = (k + 1) // 2 + 1`` (a strict
  majority of the ``k + 1`` holders), a union bound over the ``n`` clients
  gives both

  * correctness: :math:`n \Pr[\mathrm{Bin}(k, 1 - \delta) + 1 < t]
    \le 2^{\text{failure\_log2}}` (every client keeps ``t`` surviving
    holders when each client drops independently with probability
    :math:`\delta`; the ``+1`` is the client's own share, which counts for
    survivors; dropped clients need ``t`` surviving neighbours, covered by the
    same bound up to the one share), and
  * secrecy: :math:`n \Pr[\mathrm{Bin}(k, \gamma) \ge t] \le
    2^{\text{failure\_log2}}` (fewer than ``t`` of a client's holders
    collude with the server when a fraction :math:`\gamma` is corrupt).

  Bell et al. (2020) show that ``k = O(log n)`` neighbours suffice for
  both properties w.h.p.; this function applies that idea with exact
  binomial tails and a union bound (our parameter rule, not the paper's
  constants). Their further condition, that the honest survivors stay
  connected in the graph, is not re-checked here. Returns the complete graph
  ``(n - 1, n // 2 + 1)`` when no ``k < n - 1`` qualifies.
  """
  n = int(num_clients)
  if n < 2:
    raise ValueError(f"num_clients must be >= 2, got {num_clients!r}.")
  if not 0 <= dropout_rate < 1 or not 0 <= corrupt_fraction < 1:
    raise ValueError(
      f"dropout_rate and corrupt_fraction must be in [0, 1), "
      f"got {dropout_rate!r} and {corrupt_fraction!r}."
    )
  bound = 2.0**failure_log2 / n
  for k in range(2, n - 1, 2):
    t = safe_threshold(k + 1)
    fail = scipy_stats.binom.cdf(t - 2, k, 1.0 - dropout_rate)  # P[Bin + 1 < t]
    fail_dropped = scipy_stats.binom.cdf(t - 1, k, 1.0 - dropout_rate)
    leak = (
      scipy_stats.binom.sf(t - 1, k, corrupt_fraction)
      if corrupt_fraction > 0
      else 0.0
    )
    if max(fail, fail_dropped * dropout_rate) <= bound and leak <= bound:
      return k, t
  return n - 1, safe_threshold(n)


def harary_graph(
  num_clients: int, num_neighbors: int | None, rng: np.random.Generator
) -> np.ndarray:
  """Neighbour lists ``[n, k]`` (sorted, int32) of a random Harary graph.

  The clients sit on a ring in a random order (``rng.permutation``); each is
  joined to the ``k/2`` nearest on either side (``k`` even), so every client
  has exactly ``k`` neighbours. ``num_neighbors=None`` or ``>= n - 1``: the
  complete graph (SecAgg).
  """
  n = num_clients
  if num_neighbors is None or num_neighbors >= n - 1:
    full = np.arange(n)
    return np.stack([np.delete(full, u) for u in range(n)]).astype(np.int32)
  k = int(num_neighbors)
  if k < 2 or k % 2:
    raise ValueError(
      f"num_neighbors must be an even int >= 2 (a Harary "
      f"graph joins k/2 clients on either side), or None for "
      f"the complete graph; got {num_neighbors!r}."
    )
  perm = rng.permutation(n)
  pos = np.empty(n, np.int64)
  pos[perm] = np.arange(n)
  offsets = np.concatenate(
    [np.arange(1, k // 2 + 1), -np.arange(1, k // 2 + 1)]
  )
  nbrs = perm[(pos[:, None] + offsets[None, :]) % n]
  return np.sort(nbrs, axis=1).astype(np.int32)


# ------------------------------------------------------------ host crypto
def _hkdf(shared: bytes, info: bytes, length: int = 32) -> bytes:
  return hkdf.HKDF(
    algorithm=hashes.SHA256(), length=length, salt=None, info=info
  ).derive(shared)


def _public_bytes(key: x25519.X25519PrivateKey) -> bytes:
  return key.public_key().public_bytes(
    serialization.Encoding.Raw, serialization.PublicFormat.Raw
  )


def seed_words(seed: bytes) -> np.ndarray:
  """The PRG key: the first 64 bits of a seed as two uint32 words."""
  return np.frombuffer(seed[:8], dtype=">u4").astype(np.uint32)


def pairwise_seed(
  own_mask_key: x25519.X25519PrivateKey, peer_public: bytes, round_index: int
) -> bytes:
  """``s_uv = HKDF-SHA256(X25519(s_u^SK, s_v^PK), info=round)`` (32 bytes)."""
  shared = own_mask_key.exchange(
    x25519.X25519PublicKey.from_public_bytes(peer_public)
  )
  return _hkdf(shared, _MASK_INFO + struct.pack(">q", round_index))


def _encryption_key(
  own_enc_key: x25519.X25519PrivateKey, peer_public: bytes, round_index: int
) -> crypto_aead.AESGCM:
  shared = own_enc_key.exchange(
    x25519.X25519PublicKey.from_public_bytes(peer_public)
  )
  return crypto_aead.AESGCM(
    _hkdf(shared, _ENC_INFO + struct.pack(">q", round_index))
  )


def _nonce(sender: int, receiver: int) -> bytes:
  # A fresh key per (pair, round) and one message per direction: unique.
  return struct.pack(">IIi", sender, receiver, 0)


def _encode_shares(sender: int, receiver: int, sk_share, seed_share) -> bytes:
  return struct.pack(">II", sender, receiver) + b"".join(
    int(e).to_bytes(shamir.ELEMENT_BYTES, "big")
    for e in list(sk_share) + list(seed_share)
  )


def _decode_shares(plain: bytes):
  sender, receiver = struct.unpack(">II", plain[:8])
  body = plain[8:]
  elems = [
    int.from_bytes(body[i : i + shamir.ELEMENT_BYTES], "big")
    for i in range(0, len(body), shamir.ELEMENT_BYTES)
  ]
  return sender, receiver, elems[:_SK_ELEMS], elems[_SK_ELEMS:]


def client_host_work(
  u: int,
  enc_key: x25519.X25519PrivateKey,
  mask_key: x25519.X25519PrivateKey,
  self_seed: bytes,
  neighbors,
  neighbor_public,
  threshold: int,
  round_index: int,
  randbits,
):
  """Client ``u``'s host work in one round (ShareKeys and MaskedInput seeds).

  For each neighbour ``v``: ``X25519(s_u^SK, s_v^PK)`` + HKDF -> mask seed,
  ``X25519(c_u^SK, c_v^PK)`` + HKDF -> AES-GCM key; Shamir-splits
  ``(s_u^SK, b_u)`` t-of-(k+1) among itself and its neighbours and encrypts
  each neighbour's share.

  Args:
    u: the client's index.
    enc_key, mask_key: its X25519 private keys ``c_u^SK``, ``s_u^SK``.
    self_seed: ``b_u``.
    neighbors: the ``k`` neighbour indices.
    neighbor_public: their ``(c_v^PK, s_v^PK)`` raw public keys.
    threshold: ``t``.
    round_index: bound into the HKDF info.
    randbits: randomness for the Shamir polynomials.

  Returns:
    ``(seed_words [k, 2] uint32, {v: ciphertext}, own_share)``.
  """
  k = len(neighbors)
  seeds = np.zeros((k, 2), np.uint32)
  aeads = []
  for j, (c_pub, s_pub) in enumerate(neighbor_public):
    seeds[j] = seed_words(pairwise_seed(mask_key, s_pub, round_index))
    aeads.append(_encryption_key(enc_key, c_pub, round_index))
  ciphertexts, own = _share_keys(
    u, mask_key, self_seed, neighbors, aeads, threshold, randbits
  )
  return seeds, ciphertexts, own


def _share_keys(u, mask_key, self_seed, neighbors, aeads, threshold, randbits):
  """ShareKeys for client ``u``: Shamir-splits ``(s_u^SK, b_u)`` among
  itself (point ``u + 1``) and its neighbours, encrypts each neighbour's
  share; returns ``({v: ciphertext}, own share)``."""
  holders = [u] + [int(v) for v in neighbors]
  secret = shamir.bytes_to_elements(
    mask_key.private_bytes_raw()
  ) + shamir.bytes_to_elements(self_seed)
  shares = shamir.split(secret, threshold, [h + 1 for h in holders], randbits)
  ciphertexts = {}
  for h, share, aead in zip(holders[1:], shares[1:], aeads):
    ciphertexts[h] = _nonce(u, h) + aead.encrypt(
      _nonce(u, h),
      _encode_shares(u, h, share[:_SK_ELEMS], share[_SK_ELEMS:]),
      None,
    )
  return ciphertexts, (shares[0][:_SK_ELEMS], shares[0][_SK_ELEMS:])


def _round_randomness(seed: int | None, round_index: int):
  """``(entropy, randbits, graph_rng)`` of one round: key material, Shamir
  polynomials and the Harary graph's ring order, from ``(seed, round)``
  (reproducible) or, with ``seed=None``, from the OS CSPRNG."""
  if seed is None:
    return _secrets.token_bytes, _secrets.randbits, np.random.default_rng()
  gen = np.random.default_rng([int(seed), round_index, 0x5EC])
  randbits = random.Random(int(seed) * 1_000_003 + round_index).getrandbits
  graph_rng = np.random.default_rng([int(seed), round_index, 0x6A])
  return gen.bytes, randbits, graph_rng


class _Client:
  """One client's secrets for one round (nothing here reaches the server)."""

  def __init__(self, index: int, entropy):
    self.index = index
    self.enc_key = x25519.X25519PrivateKey.from_private_bytes(
      entropy(_KEY_BYTES)
    )
    self.mask_key = x25519.X25519PrivateKey.from_private_bytes(
      entropy(_KEY_BYTES)
    )
    self.self_seed = entropy(_SEED_BYTES)
    self.inbox: dict[int, bytes] = {}  # sender -> ciphertext for me
    self.own_shares = None  # my share of my own secrets
    self.aead: dict[int, crypto_aead.AESGCM] = {}


@dataclasses.dataclass
class Traffic:
  """Bytes each client sent/received in one round (messages via the server).

  Attributes:
    sent: ``[n]`` bytes sent by each client.
    received: ``[n]`` bytes received by each client.
  """

  sent: np.ndarray
  received: np.ndarray


class SecAggRound:
  """One round of SecAgg / SecAgg+ among ``num_clients`` simulated clients.

  Construction runs AdvertiseKeys and ShareKeys on the host (key pairs,
  Shamir shares, AES-GCM ciphertexts routed through the server) and derives
  every client's mask seeds. :meth:`client_masks` gives what each client
  feeds the device PRG; :meth:`unmask_material` is the server's Unmasking
  round for a given survivor set.

  Each pairwise secret is derived once per edge, from the lower-indexed
  client's side (X25519 is symmetric: the other side derives the same bytes;
  :meth:`rederive_client` recomputes one client's side and checks it).

  Args:
    num_clients: ``n`` clients in the round.
    threshold: ``t`` (int), a fraction of the holders, or None for the safe
      minimum (strict majority of the holders).
    num_neighbors: ``k`` for SecAgg+ (even), or None for SecAgg's complete
      graph.
    round_index: bound into the HKDF info (fresh secrets per round).
    seed: int for reproducible key material, None for OS randomness.
    message_bits: modulus width ``b`` (for the masked input's wire size).
    num_params: ``d`` (for the masked input's wire size).
  """

  def __init__(
    self,
    num_clients: int,
    *,
    threshold=None,
    num_neighbors: int | None = None,
    round_index: int = 0,
    seed: int | None = 0,
    message_bits: int = 32,
    num_params: int = 0,
  ):
    if not checks.is_int(num_clients) or num_clients < 2:
      raise ValueError(
        f"num_clients must be an int >= 2 (secure aggregation "
        f"of one client reveals its update), got "
        f"{num_clients!r}."
      )
    n = self.num_clients = int(num_clients)
    self.round_index = int(round_index)
    self.message_bits = int(message_bits)
    self.num_params = int(num_params)
    entropy, self._randbits, graph_rng = _round_randomness(
      seed, self.round_index
    )
    self.neighbors = harary_graph(n, num_neighbors, graph_rng)  # [n, k]
    self.degree = int(self.neighbors.shape[1])
    self.complete = self.degree == n - 1
    self.num_holders = self.degree + 1
    self.threshold = resolve_threshold(threshold, self.num_holders, n)
    t0 = time.perf_counter()
    self._clients = [_Client(u, entropy) for u in range(n)]
    sent = np.zeros(n, np.int64)
    recv = np.zeros(n, np.int64)
    self._advertise_keys(sent, recv)
    self._agree_pairwise()
    self._route_shares(sent, recv)
    self.setup_seconds = time.perf_counter() - t0
    self.traffic = Traffic(sent, recv)
    self.revealed_shares = 0  # what the server has learned from Unmasking
    self.refusal: SecAggError | None = None  # the last Unmasking refusal

  def _advertise_keys(self, sent: np.ndarray, recv: np.ndarray) -> None:
    """0 AdvertiseKeys: every client's ``(c^PK, s^PK)`` to the server, which
    forwards them to the client's neighbours (``sent``/``recv`` grow)."""
    self.public = [
      (_public_bytes(c.enc_key), _public_bytes(c.mask_key))
      for c in self._clients
    ]
    for u in range(self.num_clients):
      sent[u] += len(self.public[u][0]) + len(self.public[u][1])
      recv[u] += sum(
        len(self.public[v][0]) + len(self.public[v][1])
        for v in self.neighbors[u]
      )

  def _agree_pairwise(self) -> None:
    """Every edge's mask seed ``s_uv`` and AES-GCM key, derived once per edge
    from the lower-indexed side ``u < v`` (X25519 is symmetric); signs
    ``sgn(u, v) = +1`` if ``u < v`` else ``-1``."""
    n, k = self.num_clients, self.degree
    self._pair_seeds = np.zeros((n, k, 2), np.uint32)
    self._signs = np.where(
      self.neighbors > np.arange(n)[:, None], 1, -1
    ).astype(np.int32)
    col = [
      {int(v): j for j, v in enumerate(self.neighbors[u])} for u in range(n)
    ]
    for u, cu in enumerate(self._clients):
      for j, v in enumerate(self.neighbors[u]):
        v = int(v)
        if v < u:
          continue
        s = seed_words(
          pairwise_seed(cu.mask_key, self.public[v][1], self.round_index)
        )
        self._pair_seeds[u, j] = s
        self._pair_seeds[v, col[v][u]] = s
        aead = _encryption_key(cu.enc_key, self.public[v][0], self.round_index)
        cu.aead[v] = aead
        self._clients[v].aead[u] = aead

  def _route_shares(self, sent: np.ndarray, recv: np.ndarray) -> None:
    """1 ShareKeys: every client's Shamir shares of ``s_u^SK`` and ``b_u``,
    encrypted per holder and routed by the server to the holder's inbox."""
    self.ciphertexts_routed = 0
    for u, cu in enumerate(self._clients):
      nbrs = [int(v) for v in self.neighbors[u]]
      cts, cu.own_shares = _share_keys(
        u,
        cu.mask_key,
        cu.self_seed,
        nbrs,
        [cu.aead[v] for v in nbrs],
        self.threshold,
        self._randbits,
      )
      for h, ct in cts.items():
        self._clients[h].inbox[u] = ct  # routed by the server
        sent[u] += len(ct)
        recv[h] += len(ct)
        self.ciphertexts_routed += 1

  # -------------------------------------------------------- client side
  def client_masks(self, clients=None):
    """What each client feeds the device PRG (its own secrets only).

    Returns:
      ``(self_words [m, 2] uint32, pair_words [m, k, 2] uint32,
      signs [m, k] int32)`` for ``clients`` (default all ``n``).
    """
    idx = (
      np.arange(self.num_clients) if clients is None else np.asarray(clients)
    )
    self_words = (
      np.stack([seed_words(self._clients[u].self_seed) for u in idx])
      if len(idx)
      else np.zeros((0, 2), np.uint32)
    )
    return self_words, self._pair_seeds[idx], self._signs[idx]

  def rederive_client(self, u: int) -> float:
    """Recomputes client ``u``'s own host work and checks it; returns seconds.

    Runs :func:`client_host_work` for ``u`` (everything it does on the host
    in ShareKeys/MaskedInput); its pairwise seeds must equal the stored ones
    (derived from the other side for neighbours ``v < u``).
    """
    cu = self._clients[u]
    t0 = time.perf_counter()
    seeds, ciphertexts, _ = client_host_work(
      u,
      cu.enc_key,
      cu.mask_key,
      cu.self_seed,
      self.neighbors[u],
      [self.public[int(v)] for v in self.neighbors[u]],
      self.threshold,
      self.round_index,
      self._randbits,
    )
    secs = time.perf_counter() - t0
    differ = np.flatnonzero((seeds != self._pair_seeds[u]).any(axis=1))
    if len(differ):
      raise SecAggError(
        f"client {u} derived pairwise mask seeds that differ from its "
        f"neighbours' derivations for neighbours "
        f"{self.neighbors[u][differ].tolist()}; expected X25519 to give "
        "both sides of every pair the same seed."
      )
    if len(ciphertexts) != self.degree:
      raise SecAggError(
        f"client {u} produced {len(ciphertexts)} share ciphertexts; "
        f"expected one per neighbour ({self.degree})."
      )
    return secs

  # -------------------------------------------------------- server side
  def check_survivors(self, survivors: np.ndarray) -> None:
    """Refuses (before anything is revealed) if a secret lacks ``t`` holders.

    Raises:
      SecAggError: a surviving client has fewer than ``t`` surviving holders
        (itself and its surviving neighbours) for its b_u, or a dropped client
        has fewer than ``t`` surviving neighbours for its s_u^SK.
    """
    alive = np.asarray(survivors, bool)
    n, t = self.num_clients, self.threshold
    if alive.shape != (n,):
      raise ValueError(
        f"survivors must be a bool [{n}] mask, got shape {alive.shape}."
      )
    holders = alive[self.neighbors].sum(1) + alive  # own share if alive
    bad = np.flatnonzero(holders < t)
    if alive.sum() < t or len(bad):
      u = int(bad[0]) if len(bad) else 0
      self._refuse(REFUSED_THRESHOLD, alive, client=u, holders=int(holders[u]))

  def _refuse(self, reason, alive, *, client, peer=-1, holders=-1, detail=""):
    """Raises the refusal (and records it as :attr:`refusal`)."""
    raise SecAggError(
      refusal_message(
        reason,
        client=client,
        peer=peer,
        holders=holders,
        survivors=int(np.sum(alive)),
        num_clients=self.num_clients,
        threshold=self.threshold,
        degree=self.degree,
        detail=detail,
      ),
      reason=reason,
      client=client,
      peer=peer,
      holders=holders,
    )

  def unmask_material(
    self, survivors, pad_rows: int | None = None
  ) -> tuple[tuple, dict]:
    """The server's Unmasking round for the survivor set ``survivors``.

    Survivors decrypt the ciphertexts they hold and reveal shares of ``b_u``
    (surviving ``u``) or of ``s_u^SK`` (dropped ``u``); the server
    reconstructs them (Lagrange, ``t`` shares each) and recomputes the
    dropped clients' pairwise seeds with their surviving neighbours.

    Args:
      survivors: bool ``[n]``: whose masked input arrived.
      pad_rows: return this many pair rows (zero-padded; static shapes
        under jit), at least the number of dropped clients; default exactly
        one row per dropped client.

    Returns:
      ``((self_words [n, 2], self_on [n] int32, pair_words [R, k, 2],
      signs [R, k] int32), stats)``: the masks to subtract from the masked
      sum are ``sum_u self_on_u PRG(self_words_u) + sum_{r, j}
      signs[r, j] PRG(pair_words[r, j])``; row ``r`` holds the r-th dropped
      client's seeds with its surviving neighbours, signed as the neighbour
      added them (0: no mask). ``stats``: the work and the round's traffic
      (``clients_unmask_seconds``: the survivors' decryptions;
      ``server_host_seconds``: reconstruction and key agreements).

    Raises:
      SecAggError: (recorded as :attr:`refusal`, nothing is returned)
        ``REFUSED_THRESHOLD``: see :meth:`check_survivors` (raised before
        any reveal); ``REFUSED_AUTHENTICATION``: a survivor's share
        ciphertext fails AES-GCM authentication (names sender and
        recipient); ``REFUSED_MISROUTED``: it decrypts to a share addressed
        to another pair; ``REFUSED_INCONSISTENT_SHARE``: a secret has more
        than ``t`` revealed shares and they do not lie on one polynomial of
        degree ``t - 1`` (names the client whose share is wrong when it can
        be pinned, see :func:`shamir.check_shares`); ``REFUSED_UNDECODABLE``:
        exactly ``t`` shares reconstruct no valid key or seed.
    """
    try:
      return self._unmask_material(survivors, pad_rows)
    except SecAggError as e:
      self.refusal = e
      raise

  def _unmask_material(self, survivors, pad_rows):
    t0 = time.perf_counter()
    alive = np.asarray(survivors, bool)
    self.check_survivors(alive)
    self.refusal = None
    sent, recv = self._masked_input_traffic(alive)
    t_clients = time.perf_counter()
    revealed = self._reveal_shares(alive, sent)
    t_server = time.perf_counter()
    dropped = np.flatnonzero(~alive)
    rows = len(dropped) if pad_rows is None else int(pad_rows)
    if rows < len(dropped):
      raise ValueError(f"pad_rows={pad_rows} < {len(dropped)} dropped clients.")
    self._check_redundant_shares(alive, revealed)
    material, key_agreements, lagrange_sets = self._reconstruct(
      alive, revealed, rows
    )
    n, signs = self.num_clients, material[3]
    stats = {
      "survivors": float(alive.sum()),
      "dropped": float(n - alive.sum()),
      "threshold": float(self.threshold),
      "degree": float(self.degree),
      "client_bytes_sent": float(sent.mean()),
      "client_bytes_received": float(recv.mean()),
      "server_bytes_received": float(sent.sum()),
      "server_bytes_sent": float(recv.sum()),
      "server_key_agreements": float(key_agreements),
      "server_reconstructions": float(n),
      "server_lagrange_sets": float(lagrange_sets),
      "server_prg_expansions": float(alive.sum() + (signs != 0).sum()),
      "server_host_seconds": time.perf_counter() - t_server + (t_clients - t0),
      "clients_unmask_seconds": t_server - t_clients,
      "setup_host_seconds": self.setup_seconds,
    }
    self.last_traffic = Traffic(sent, recv)
    return material, stats

  def _masked_input_traffic(self, alive: np.ndarray):
    """``(sent, recv)``: the setup traffic plus every survivor's masked input
    (``d`` values of ``b`` bits) and the survivor list the server sends it
    (its surviving neighbours' ids)."""
    sent = self.traffic.sent.copy()
    recv = self.traffic.received.copy()
    sent[alive] += (self.num_params * self.message_bits + 7) // 8
    for v in np.flatnonzero(alive):
      recv[v] += _ID_BYTES * int(alive[self.neighbors[v]].sum())
    return sent, recv

  def _reveal_shares(self, alive: np.ndarray, sent: np.ndarray) -> dict:
    """Every survivor ``v`` decrypts the share ciphertexts it holds and
    reveals, for each neighbour ``u``, its share of ``b_u`` (``u`` survived)
    or of ``s_u^SK`` (``u`` dropped), plus its own share of ``b_v``.

    Returns ``{u: [(x, share), ...]}`` (``x = v + 1``, the holder's Shamir
    point); ``sent`` grows by what each survivor reveals and
    :attr:`revealed_shares` by what reached the server, also when a
    ciphertext is refused part way (``REFUSED_AUTHENTICATION``,
    ``REFUSED_MISROUTED``)."""
    revealed: dict[int, list] = {u: [] for u in range(self.num_clients)}
    try:
      for v in np.flatnonzero(alive):
        v = int(v)
        cv = self._clients[v]
        for u in [int(x) for x in self.neighbors[v]]:
          share = self._open_share(cv, u, v, alive)
          revealed[u].append((v + 1, share))
          sent[v] += _ID_BYTES + shamir.ELEMENT_BYTES * len(share)
        # Its own share of its own b_v (it survived).
        revealed[v].append((v + 1, cv.own_shares[1]))
        sent[v] += _ID_BYTES + shamir.ELEMENT_BYTES * _SEED_ELEMS
    finally:  # what reached the server, also when a survivor fails
      self.revealed_shares += sum(len(r) for r in revealed.values())
    return revealed

  def _open_share(self, cv: _Client, u: int, v: int, alive: np.ndarray):
    """Survivor ``v`` decrypts the ciphertext it holds from ``u`` and returns
    the share it reveals (of ``b_u`` if ``u`` survived, else of
    ``s_u^SK``); refuses one that fails authentication or is misrouted."""
    ct = cv.inbox[u]
    try:
      plain = cv.aead[u].decrypt(ct[:_NONCE_BYTES], ct[_NONCE_BYTES:], None)
    except crypto_errors.InvalidTag:
      self._refuse(REFUSED_AUTHENTICATION, alive, client=u, peer=v)
    sender, receiver, sk_share, seed_share = _decode_shares(plain)
    if (sender, receiver) != (u, v):
      self._refuse(
        REFUSED_MISROUTED,
        alive,
        client=u,
        peer=v,
        detail=f" (from client {sender} to client {receiver})",
      )
    return seed_share if alive[u] else sk_share

  def _check_redundant_shares(self, alive: np.ndarray, revealed: dict) -> None:
    """Refuses (``REFUSED_INCONSISTENT_SHARE``) a secret whose more than
    ``t`` revealed shares lie on no one polynomial of degree ``t - 1``
    (:func:`shamir.check_shares`), before anything is reconstructed."""
    t = self.threshold
    parity_cache: dict[tuple, list] = {}
    for u in range(self.num_clients):
      xs = [x for x, _ in revealed[u]]
      if len(xs) <= t:
        continue
      key = tuple(xs)
      if key not in parity_cache:
        parity_cache[key] = shamir.parity_check(xs, t)
      wrong = shamir.check_shares(
        xs, [s for _, s in revealed[u]], t, parity_cache[key]
      )
      if wrong:
        pinned = len(wrong) == 1
        self._refuse(
          REFUSED_INCONSISTENT_SHARE,
          alive,
          client=u,
          peer=xs[wrong[0]] - 1 if pinned else -1,
          holders=len(xs),
          detail="" if pinned else f" (clients {[x - 1 for x in xs]})",
        )

  def _reconstruct(self, alive: np.ndarray, revealed: dict, rows: int):
    """Lagrange-reconstructs every secret from its first ``t`` shares: the
    survivors' ``b_u`` and the dropped clients' ``s_u^SK``, with which the
    server recomputes each dropped ``d``'s seeds ``s_dv`` with its surviving
    neighbours ``v`` (row ``r`` of ``pair_words``/``signs`` for the r-th
    dropped client, signed as ``v`` added them).

    Returns ``(material, key_agreements, lagrange_sets)`` with ``material =
    (self_words [n, 2], self_on [n], pair_words [rows, k, 2], signs [rows,
    k])``; refuses (``REFUSED_UNDECODABLE``) a value that encodes no key or
    seed."""
    n, k, t = self.num_clients, self.degree, self.threshold
    lam_cache: dict[tuple, list] = {}
    self_words = np.zeros((n, 2), np.uint32)
    self_on = alive.astype(np.int32)
    row_of = {int(u): r for r, u in enumerate(np.flatnonzero(~alive))}
    pair_words = np.zeros((rows, k, 2), np.uint32)
    signs = np.zeros((rows, k), np.int32)
    key_agreements = 0
    for u in range(n):
      xs = [x for x, _ in revealed[u]][:t]
      sh = [s for _, s in revealed[u]][:t]
      key = tuple(xs)
      if key not in lam_cache:
        lam_cache[key] = shamir.lagrange_at_zero(xs)
      elems = shamir.reconstruct(xs, sh, t, lam_cache[key])
      try:
        secret = shamir.elements_to_bytes(
          elems, _SEED_BYTES if alive[u] else _KEY_BYTES
        )
      except ValueError:
        self._refuse(
          REFUSED_UNDECODABLE,
          alive,
          client=u,
          holders=len(revealed[u]),
          detail=f" (clients {[x - 1 for x in xs]})",
        )
      if alive[u]:
        self_words[u] = seed_words(secret)
        continue
      sk = x25519.X25519PrivateKey.from_private_bytes(secret)
      r = row_of[u]
      for j, v in enumerate(self.neighbors[u]):
        if alive[v]:
          pair_words[r, j] = seed_words(
            pairwise_seed(sk, self.public[v][1], self.round_index)
          )
          # Survivor v added sgn(v, u) PRG(s_vu).
          signs[r, j] = 1 if v < u else -1
          key_agreements += 1
    material = (self_words, self_on, pair_words, signs)
    return material, key_agreements, len(lam_cache)


# ------------------------------------------------------------ device side
def _prg(words: jax.Array, num: int) -> jax.Array:
  """``num`` uint32 words of threefry2x32 keyed by ``words`` (uint32[2])."""
  key = jax.random.wrap_key_data(words.astype(jnp.uint32), impl="threefry2x32")
  return jax.random.bits(key, (num,), jnp.uint32)


def client_mask(
  self_words: jax.Array,
  self_on: jax.Array,
  pair_words: jax.Array,
  signs: jax.Array,
  num: int,
) -> jax.Array:
  r"""ONE client's total mask, uint32 ``[num]`` (mod :math:`2^{32}`).

  .. math:: m = [\text{self\_on}]\,\mathrm{PRG}(b) + \sum_j \mathrm{sgn}_j\,
            \mathrm{PRG}(s_j)

  Shapes: self_words [2], self_on [], pair_words [k, 2], signs [k]
  (``0`` = no mask). A ``fori_loop`` over the ``k`` neighbours keeps memory
  at one ``[num]`` vector; vmap it over clients.
  """
  acc = jnp.where(
    self_on > 0, _prg(self_words, num), jnp.zeros((num,), jnp.uint32)
  )

  def body(j, acc):
    m = _prg(pair_words[j], num)
    return jnp.where(
      signs[j] > 0, acc + m, jnp.where(signs[j] < 0, acc - m, acc)
    )

  return jax.lax.fori_loop(0, signs.shape[0], body, acc)


def _mod(x: jax.Array, bits: int) -> jax.Array:
  if bits == 32:
    return x
  return x & jnp.uint32((1 << bits) - 1)


@functools.partial(jax.jit, static_argnames="bits")
def mask_inputs(
  q: jax.Array, self_words, pair_words, signs, bits: int
) -> jax.Array:
  """MaskedInput for a batch: ``y = q + mask mod 2^b``, uint32 ``[m, d]``."""
  d = q.shape[-1]
  masks = jax.vmap(lambda s, p, g: client_mask(s, jnp.int32(1), p, g, d))(
    self_words, pair_words, signs
  )
  return _mod(q.astype(jnp.uint32) + masks, bits)


@functools.partial(jax.jit, static_argnames="bits")
def remove_masks(
  masked_sum: jax.Array, self_words, self_on, pair_words, signs, bits: int
) -> jax.Array:
  """``masked_sum - reconstructed masks mod 2^b`` (uint32 [d]).

  Shapes: self_words [n, 2], self_on [n], pair_words [R, k, 2], signs
  [R, k] (one row per dropped client, see :meth:`SecAggRound.unmask_material`).
  """
  d = masked_sum.shape[-1]
  own = jax.vmap(lambda s, o: jnp.where(o > 0, _prg(s, d), jnp.uint32(0)))(
    self_words, self_on
  )
  total = jnp.sum(own, axis=0, dtype=jnp.uint32)
  if signs.shape[0]:
    zero = jnp.zeros((2,), jnp.uint32)
    pairs = jax.vmap(lambda p, g: client_mask(zero, jnp.int32(0), p, g, d))(
      pair_words, signs
    )
    total = total + jnp.sum(pairs, axis=0, dtype=jnp.uint32)
  return _mod(masked_sum - total, bits)


@functools.partial(jax.jit, static_argnames="bits")
def modular_sum(y: jax.Array, bits: int) -> jax.Array:
  """``sum_u y_u mod 2^b`` of uint32 ``[m, d]`` (wrapping uint32 adds)."""
  return _mod(jnp.sum(y, axis=0, dtype=jnp.uint32), bits)


# quantize()'s code for a non-finite value: above 2L for every
# bits_per_value <= 31, so never the code of a finite value.
INVALID_CODE = 0xFFFFFFFF


def quantize(x: jax.Array, clip_norm, bits_per_value: int) -> jax.Array:
  r"""Fixed point: ``round(x L / C) + L`` in ``[0, 2L]``, uint32
  (``L = 2^{bits_per_value} - 1``; ``x`` already clipped to norm ``C``).

  A NaN or an infinity has no fixed-point value: it becomes
  :data:`INVALID_CODE` (``2^32 - 1``, outside ``[0, 2L]``), never a bound
  such as ``0`` (which would decode as ``-C``). :func:`secure_aggregator`
  does not mask or send such a client's input (see its docstring).
  """
  levels = float((1 << bits_per_value) - 1)
  x = x.astype(jnp.float32)
  v = jnp.clip(jnp.round(x / clip_norm * levels), -levels, levels)
  code = jnp.where(jnp.isfinite(x), v + levels, 0.0).astype(jnp.uint32)
  return jnp.where(jnp.isfinite(x), code, jnp.uint32(INVALID_CODE))


def centered_sum(
  z: jax.Array, num_summed: jax.Array, bits_per_value: int
) -> jax.Array:
  """Exact ``sum_u round(x_u L / C)`` as int32 from the unmasked ``z``.

  ``z = sum_u q_u < 2^b`` and ``|z - n L| < 2^{b-1} <= 2^31``: the uint32
  difference, reinterpreted as int32, is exact.
  """
  levels = jnp.uint32((1 << bits_per_value) - 1)
  diff = z.astype(jnp.uint32) - num_summed.astype(jnp.uint32) * levels
  return jax.lax.bitcast_convert_type(diff, jnp.int32)


# ------------------------------------------------------------ aggregator
# The host's per-round statistics, reported as ``secagg_<name>`` metrics (in
# the order of the stats vector SecAggHost.server_material returns).
_STAT_NAMES = (
  "survivors",
  "dropped",
  "threshold",
  "degree",
  "client_bytes_sent",
  "client_bytes_received",
  "server_key_agreements",
  "server_prg_expansions",
  "server_host_seconds",
  "clients_unmask_seconds",
  "setup_host_seconds",
)
# A round's refusal ``[reason, client, peer, holders]`` as metrics.
_REFUSAL_NAMES = (
  "refused",
  "refused_client",
  "refused_peer",
  "refused_holders",
)


def dropped_clients(
  num_clients: int, dropout_rate: float, round_index: int, seed: int | None
) -> np.ndarray:
  """The simulated dropouts of a round: ``round(rate * n)`` clients chosen
  uniformly from ``(seed, round_index)`` (bool ``[n]``, True = dropped after
  masking)."""
  rng = np.random.default_rng(
    None if seed is None else [int(seed), int(round_index), 0xD0]
  )
  drop = np.zeros(num_clients, bool)
  drop[
    rng.choice(num_clients, round(dropout_rate * num_clients), replace=False)
  ] = True
  return drop


def _plan(num_clients: int, num_neighbors, threshold, dropout_rate: float):
  if num_neighbors == "auto":
    k, t = secagg_plus_degree(num_clients, max(dropout_rate, 0.05))
    return (None if k >= num_clients - 1 else k), (
      t if threshold is None else threshold
    )
  return num_neighbors, threshold


@dataclasses.dataclass(frozen=True)
class SecAggConfig:
  """The checked arguments of :func:`secure_aggregator` (see there).

  ``levels`` is ``L = 2^{bits_per_value} - 1``; :meth:`modulus_bits` gives
  ``b`` for a round of ``num_slots`` clients.
  """

  clip_norm: float
  bits_per_value: int
  bits: int | None
  threshold: Any
  num_neighbors: int | str | None
  dropout_rate: float
  seed: int | None
  noise_multiplier: float | None
  name: str

  @property
  def levels(self) -> float:
    return float((1 << self.bits_per_value) - 1)

  def modulus_bits(self, num_slots: int) -> int:
    """``b``: ``bits``, or the headroom minimum ``bits_per_value +
    ceil(log2 num_slots) + 1``; raises if it does not fit ``num_slots``."""
    need = min_modulus_bits(self.bits_per_value, num_slots)
    if self.bits is None and need > MAX_BITS:
      raise ValueError(
        f"{self.name}: bits_per_value={self.bits_per_value} is too large for "
        f"{num_slots} clients per round: the sum needs bits_per_value + "
        f"ceil(log2({num_slots})) + 1 = {need} > {MAX_BITS} bits; expected "
        f"bits_per_value <= {self.bits_per_value - (need - MAX_BITS)}."
      )
    b = self.bits if self.bits is not None else need
    return check_modulus_bits(b, self.bits_per_value, num_slots, self.name)


class SecAggHost:
  r"""The host side of one secure aggregator for one round shape.

  A :func:`secure_aggregator` makes one per round shape (``m =
  clients_per_round`` slots, an update of ``d`` parameters) the first time
  the engine calls its ``init`` with that shape; the aggregator keeps it
  and the round's accumulator (:class:`SecAggAccumulator`) carries it to
  ``add`` and ``finalize``. Two aggregators never share one, even with the
  same arguments and seed.

  What it keeps: the plan of every round of this shape (``degree`` ``k``,
  ``threshold`` ``t``, modulus ``modulus_bits`` ``b``, ``pad_rows``: the
  pair rows the server may need, ``spec``: one update's structure), and per
  round index ``r`` the round's :class:`SecAggRound` (every client's keys,
  shares and ciphertexts: ``O(m k)``) with its simulated dropouts, from the
  round's first request (``add``) to the end of its Unmasking
  (``finalize``), which frees it; a request for round ``r`` also frees any
  round below ``r - 1`` left behind (e.g. ``add`` called without
  ``finalize``), so at most two rounds are held however many run, and none
  between rounds. ``last_error``: the last unexpected host error (named by
  ``check_output``). The host itself (plan and spec, small) is freed with
  the aggregator and the jitted rounds traced with it; JAX's trace caches
  (bounded LRUs, emptied by ``jax.clear_caches()``) may keep it a while
  longer through the accumulator's pytree structure.

  When it runs: the engine's host callbacks (``jax.pure_callback``) inside
  the jitted round. ``add`` calls :meth:`client_material` (every device's
  block step, concurrently from the devices' threads under ``shard_map``:
  a lock makes each round's :class:`SecAggRound` once); ``finalize`` calls
  :meth:`server_material` (the server's Unmasking). With runs pooled by
  ``vmap``, both receive every run's round index at once. Neither raises
  (an exception in one device's callback would leave the others waiting in
  a collective): a failure gives zero material and a refusal code.

  What it protects and what it does not: it simulates every party in this
  one process, so it holds all clients' secrets next to the server's view;
  what the server learns is limited by the protocol
  (:meth:`SecAggRound.unmask_material` reveals only what Unmasking
  reveals), not by a process or network boundary. See the module docstring
  for the protocol's guarantees and its honest-but-curious scope.
  """

  def __init__(self, config: SecAggConfig, num_slots: int, update_spec):
    m = self.num_slots = int(num_slots)
    self.config = config
    self.spec = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), update_spec
    )
    self.num_params = sum(
      int(np.prod(s.shape)) for s in jax.tree.leaves(update_spec)
    )
    self.modulus_bits = config.modulus_bits(m)
    self.k_arg, self.t_arg = _plan(
      m, config.num_neighbors, config.threshold, config.dropout_rate
    )
    k = m - 1 if self.k_arg is None or self.k_arg >= m - 1 else self.k_arg
    if k < m - 1 and k % 2:
      raise ValueError(
        f"{config.name}: num_neighbors={config.num_neighbors} must be even "
        f"for a Harary graph on {m} clients (k/2 neighbours on either side), "
        f"or >= {m - 1} for the complete graph; got an odd {k}."
      )
    self.degree = k
    self.threshold = resolve_threshold(self.t_arg, k + 1, m)
    # Pair rows the server may need: one per dropped client; with the
    # complete graph at most m - t clients drop (else it refuses).
    self.pad_rows = max(1, m - self.threshold) if k == m - 1 else m
    self.rounds: dict[int, SecAggRound] = {}
    self.drops: dict[int, np.ndarray] = {}
    self.lock = threading.Lock()
    self.last_error: str | None = None

  # ------------------------------------------------------------ rounds
  def round(self, r: int) -> SecAggRound:
    """Round ``r``'s protocol object, made on the first request (frees the
    rounds below ``r - 1``; :meth:`server_material` frees round ``r``)."""
    with self.lock:
      if r not in self.rounds:
        for old in [x for x in self.rounds if x < r - 1]:
          del self.rounds[old], self.drops[old]
        cfg = self.config
        self.rounds[r] = SecAggRound(
          self.num_slots,
          threshold=self.t_arg,
          num_neighbors=self.k_arg,
          round_index=r,
          seed=cfg.seed,
          message_bits=self.modulus_bits,
          num_params=self.num_params,
        )
        self.drops[r] = dropped_clients(
          self.num_slots, cfg.dropout_rate, r, cfg.seed
        )
      return self.rounds[r]

  def record(self, e: Exception) -> None:
    self.last_error = f"{type(e).__name__}: {e}"

  # ------------------------------------------------------ client side
  def client_shapes(self) -> tuple:
    """Shapes of one round's :meth:`client_material`."""
    m, k = self.num_slots, self.degree
    return (
      jax.ShapeDtypeStruct((m, 2), jnp.uint32),
      jax.ShapeDtypeStruct((m, k, 2), jnp.uint32),
      jax.ShapeDtypeStruct((m, k), jnp.int32),
      jax.ShapeDtypeStruct((m,), jnp.bool_),
      jax.ShapeDtypeStruct((), jnp.int32),
    )

  def client_material(self, r):
    """Every client's mask seeds ``(self_words [m, 2], pair_words [m, k,
    2], signs [m, k])``, dropout flags ``[m]`` and a fault flag for round(s)
    ``r`` (any shape: pooled runs). Never raises: a failure gives zero seeds
    and fault 1, and finalize refuses (``REFUSED_HOST_ERROR``)."""
    r = np.asarray(r)
    out = ([], [], [], [], [])
    for i in np.ndindex(r.shape):
      try:
        proto = self.round(int(r[i]))
        got = proto.client_masks() + (self.drops[int(r[i])], np.int32(0))
      except Exception as e:  # pylint: disable=broad-except
        self.record(e)
        got = self._failed_client_material()
      for lst, v in zip(out, got):
        lst.append(np.asarray(v))
    return tuple(np.stack(x).reshape(r.shape + x[0].shape) for x in out)

  def _failed_client_material(self) -> tuple:
    """Zero seeds, every client dropped, fault 1 (as :meth:`client_shapes`)."""
    fill = (0, 0, 0, True, 1)
    return tuple(
      np.full(s.shape, f, s.dtype) for s, f in zip(self.client_shapes(), fill)
    )

  def request_client_material(self, round_index: jax.Array) -> tuple:
    """(device side) :meth:`client_material` of the traced ``round_index``
    through ``jax.pure_callback``."""
    return jax.pure_callback(
      self.client_material,
      self.client_shapes(),
      round_index,
      vmap_method="broadcast_all",
    )

  # ------------------------------------------------------ server side
  def server_shapes(self) -> tuple:
    """Shapes of one round's :meth:`server_material`."""
    m, k, rows = self.num_slots, self.degree, self.pad_rows
    return (
      jax.ShapeDtypeStruct((m, 2), jnp.uint32),
      jax.ShapeDtypeStruct((m,), jnp.int32),
      jax.ShapeDtypeStruct((rows, k, 2), jnp.uint32),
      jax.ShapeDtypeStruct((rows, k), jnp.int32),
      jax.ShapeDtypeStruct((len(_STAT_NAMES),), jnp.float32),
      jax.ShapeDtypeStruct((4,), jnp.int32),
    )

  def unmask(self, r: int, alive: np.ndarray, fault: bool):
    """The server's Unmasking of round ``r``: ``(material, stats,
    refusal)`` with ``refusal = [reason, client, peer, holders]`` (reason
    0: unmasked). Never raises: a refusal gives zero material (see
    :meth:`refused`), recorded on the round's :class:`SecAggRound`
    (``refusal``) and reported in the round's metrics."""
    try:
      if not fault:
        material, stats = self.round(r).unmask_material(
          alive, pad_rows=self.pad_rows
        )
        return material, stats, [0, -1, -1, -1]
      refusal = [REFUSED_HOST_ERROR, -1, -1, -1]
    except SecAggError as e:
      refusal = [e.reason, e.client, e.peer, e.holders]
      if e.reason == REFUSED_HOST_ERROR:
        self.record(e)
    except Exception as e:  # pylint: disable=broad-except
      self.record(e)
      refusal = [REFUSED_HOST_ERROR, -1, -1, -1]
    return self.refused(alive) + (refusal,)

  def refused(self, alive: np.ndarray) -> tuple:
    """``(material, stats)`` of a refused round: zero masks (nothing is
    unmasked) and the survivor counts, threshold and degree."""
    material = tuple(
      np.zeros(s.shape, s.dtype) for s in self.server_shapes()[:4]
    )
    stats = dict.fromkeys(_STAT_NAMES, 0.0)
    stats.update(
      survivors=float(alive.sum()),
      dropped=float(self.num_slots - alive.sum()),
      threshold=float(self.threshold),
      degree=float(self.degree),
    )
    return material, stats

  def server_material(self, r, arrived, fault):
    """:meth:`unmask` for round(s) ``r`` (any shape: pooled runs), with
    ``arrived`` int ``[..., m]`` and ``fault`` int ``[...]``: the masks to
    remove, the stats vector (:data:`_STAT_NAMES`) and the refusal."""
    r, arrived, fault = map(np.asarray, (r, arrived, fault))
    out = ([], [], [], [], [], [])
    for i in np.ndindex(r.shape):
      material, stats, refusal = self.unmask(
        int(r[i]), arrived[i] > 0, bool(fault[i] > 0)
      )
      stats = np.asarray([stats[s] for s in _STAT_NAMES], np.float32)
      for lst, v in zip(out, material + (stats, np.asarray(refusal, np.int32))):
        lst.append(v)
    self.release({int(x) for x in r.ravel()})
    return tuple(np.stack(x).reshape(r.shape + x[0].shape) for x in out)

  def release(self, rounds) -> None:
    """Frees the protocol objects of ``rounds`` (after their Unmasking)."""
    with self.lock:
      for r in rounds:
        self.rounds.pop(r, None)
        self.drops.pop(r, None)

  def request_server_material(self, round_index, arrived, fault) -> tuple:
    """(device side) :meth:`server_material` through ``jax.pure_callback``."""
    return jax.pure_callback(
      self.server_material,
      self.server_shapes(),
      round_index,
      arrived,
      fault,
      vmap_method="broadcast_all",
    )


@flax.struct.dataclass
class SecAggAccumulator:
  """One device's secure-aggregation accumulator for one run (``acc``).

  Attributes:
    sum: uint32 ``[d]``: the masked inputs that arrived, summed mod
      :math:`2^{32}` (reduced mod :math:`2^b` when the masks are removed).
    arrived: int32 ``[m]``: > 0 where a slot's masked input arrived.
    weight: float32: the senders' summed weights (``total_weight``).
    nonfinite: float32: clients whose update reached the aggregator
      non-finite and did not send.
    fault: int32: 1 if a host callback failed this round (finalize refuses).
    host: the :class:`SecAggHost` of the round's shape, static (part of the
      pytree's structure, not an array): ``add`` and ``finalize`` reach the
      host that ``init`` chose, also when a pooled sweep rebuilds the
      aggregator for every run.
  """

  sum: jax.Array
  arrived: jax.Array
  weight: jax.Array
  nonfinite: jax.Array
  fault: jax.Array
  host: SecAggHost = flax.struct.field(pytree_node=False)


def _quantized(updates: PyTree, clip_norm: float, bits_per_value: int):
  """A block's updates (leaves ``[B, ...]``) clipped to norm ``C``,
  flattened and quantized (:func:`quantize`): uint32 ``[B, d]``."""
  bounded = jax.vmap(lambda u: clip_by_norm(u, clip_norm))(updates)
  flat = jax.vmap(lambda u: ravel_pytree(u)[0])(bounded)  # [B, d]
  return quantize(flat, clip_norm, bits_per_value)


def _round_metrics(stats: jax.Array, refusal: jax.Array, nonfinite) -> dict:
  """The ``secagg_*`` metrics of a round from the host's stats vector
  (:data:`_STAT_NAMES`) and refusal ``[reason, client, peer, holders]``."""
  metrics = {f"secagg_{s}": stats[i] for i, s in enumerate(_STAT_NAMES)}
  metrics["secagg_nonfinite"] = nonfinite
  for i, s in enumerate(_REFUSAL_NAMES):
    metrics[f"secagg_{s}"] = refusal[i].astype(jnp.float32)
  return metrics


def _unflatten(spec: PyTree, flat: jax.Array) -> PyTree:
  """``[d]`` -> one update shaped like ``spec`` (``ravel_pytree`` order)."""
  _, unravel = ravel_pytree(
    jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), spec)
  )
  return unravel(flat)


class _SecureAggregation:
  """One :func:`secure_aggregator`: the device-side functions (the
  :class:`Aggregator`'s fields are these bound methods) and the
  :class:`SecAggHost`\\ s it owns, one per round shape (``hosts``: at most
  one per ``(clients_per_round, update structure)`` it was initialised
  with, freed with it)."""

  def __init__(self, config: SecAggConfig):
    self.config = config
    self.hosts: dict[tuple, SecAggHost] = {}

  def host_for(self, update_spec: PyTree, num_slots: int) -> SecAggHost:
    """The host of rounds of ``num_slots`` clients and updates shaped like
    ``update_spec``, made on first use (checks ``b``, ``k`` and ``t`` for
    ``num_slots``)."""
    self.config.modulus_bits(num_slots)
    leaves, treedef = jax.tree.flatten(update_spec)
    key = (
      int(num_slots),
      treedef,
      tuple((tuple(s.shape), np.dtype(s.dtype)) for s in leaves),
    )
    if key not in self.hosts:
      self.hosts[key] = SecAggHost(self.config, num_slots, update_spec)
    return self.hosts[key]

  def _host_of(self, acc) -> SecAggHost:
    if not isinstance(acc, SecAggAccumulator):
      raise TypeError(
        f"{self.config.name}: add, merge and finalize take the accumulator "
        f"that this aggregator's init made (a SecAggAccumulator), got "
        f"{type(acc).__name__}."
      )
    return acc.host

  def init_state(self, update_spec: PyTree) -> dict:
    check_float_updates(update_spec, self.config.name)
    return {"round": jnp.zeros((), jnp.int32)}

  def init(self, state, update_spec, num_slots: int) -> SecAggAccumulator:
    del state
    if num_slots < 2:
      raise ValueError(
        f"{self.config.name}: secure aggregation needs at least 2 "
        f"clients per round, got clients_per_round="
        f"{num_slots}; the sum of one client is its update."
      )
    host = self.host_for(update_spec, num_slots)
    return SecAggAccumulator(
      sum=jnp.zeros((host.num_params,), jnp.uint32),
      arrived=jnp.zeros((num_slots,), jnp.int32),
      weight=jnp.zeros((), jnp.float32),
      nonfinite=jnp.zeros((), jnp.float32),
      fault=jnp.zeros((), jnp.int32),
      host=host,
    )

  def add(self, state, acc, updates, weights, valid, slots):
    """Clips, quantizes and masks ONE device's block; adds what is sent."""
    cfg, host = self.config, self._host_of(acc)
    q = _quantized(updates, cfg.clip_norm, cfg.bits_per_value)
    # A non-finite update (only if the engine's RoundConfig.nonfinite did not
    # already drop it) has no fixed-point value: the client does not send,
    # as a dropout, and is counted in secagg_nonfinite.
    finite = jnp.all(q != jnp.uint32(INVALID_CODE), axis=1)
    # The round's seeds (the host runs AdvertiseKeys/ShareKeys once per
    # round); each client of the block uses only its own row.
    *material, fault = host.request_client_material(state["round"])
    m = host.num_slots
    sw, pw, sg, dropped = (a[jnp.clip(slots, 0, m - 1)] for a in material)
    y = mask_inputs(q, sw, pw, sg, host.modulus_bits)
    takes_part = taking_part(weights, valid)
    sends = takes_part & ~dropped & finite
    y = jnp.where(sends[:, None], y, jnp.zeros((), jnp.uint32))
    return acc.replace(
      sum=acc.sum + jnp.sum(y, axis=0, dtype=jnp.uint32),
      arrived=acc.arrived.at[jnp.where(sends, slots, m)].max(1, mode="drop"),
      weight=acc.weight + jnp.sum(jnp.where(sends, weights, 0.0)),
      nonfinite=acc.nonfinite
      + jnp.sum((takes_part & ~finite).astype(jnp.float32)),
      fault=jnp.maximum(acc.fault, fault),
    )

  def merge(self, accs: SecAggAccumulator) -> SecAggAccumulator:
    """Devices ``[nd, ...]`` -> one (the masked sums add mod 2^32)."""
    self._host_of(accs)
    return accs.replace(
      sum=jnp.sum(accs.sum, axis=0, dtype=jnp.uint32),
      arrived=jnp.sum(accs.arrived, axis=0),
      weight=jnp.sum(accs.weight, axis=0),
      nonfinite=jnp.sum(accs.nonfinite, axis=0),
      fault=jnp.max(accs.fault, axis=0),
    )

  def finalize(self, state, acc, rng):
    """Unmasking on the host, then the masks removed and the sum decoded."""
    cfg, host = self.config, self._host_of(acc)
    # Never raises: a refusal comes back as refusal[0] > 0 (with zero
    # material) and check_output raises SecAggError after the round.
    sw, so, pw, sg, stats, refusal = host.request_server_material(
      state["round"], acc.arrived, acc.fault
    )
    z = remove_masks(acc.sum, sw, so, pw, sg, host.modulus_bits)
    n_sum = jnp.sum((acc.arrived > 0).astype(jnp.int32))
    ints = centered_sum(z, n_sum, cfg.bits_per_value)
    flat_sum = ints.astype(jnp.float32) * (cfg.clip_norm / cfg.levels)
    metrics = _round_metrics(stats, refusal, acc.nonfinite)
    flat_mean = self._mean(flat_sum, n_sum, rng, host, metrics)
    # A refused round: nothing was unmasked; zero placeholders (Engine.round
    # and Engine.run raise in check_output before returning its state).
    refused = refusal[0] > 0
    flat_mean = jnp.where(refused, 0.0, flat_mean)
    total_weight = jnp.where(refused, 0.0, acc.weight)
    output = AggregatorOutput(
      mean=_unflatten(host.spec, flat_mean),
      total_weight=total_weight,
      metrics=metrics,
    )
    return output, {"round": state["round"] + 1}

  def _mean(self, flat_sum, n_sum, rng, host: SecAggHost, metrics: dict):
    r"""The survivors' mean ``sum / |U|``; with ``noise_multiplier`` ``z``
    the DP estimate :math:`(\text{sum} + \mathcal{N}(0, z^2 C_q^2 I)) / m`
    (adds ``secagg_dp_noise_std`` to ``metrics``)."""
    cfg = self.config
    if cfg.noise_multiplier is None:
      denom = jnp.maximum(n_sum, 1).astype(jnp.float32)
      return jnp.where(n_sum > 0, flat_sum / denom, 0.0)
    c_q = cfg.clip_norm * (
      1.0 + math.sqrt(host.num_params) / (2.0 * cfg.levels)
    )
    std = float(cfg.noise_multiplier) * c_q
    noise = std * jax.random.normal(rng, flat_sum.shape, jnp.float32)
    m = host.num_slots
    metrics["secagg_dp_noise_std"] = jnp.asarray(std / m, jnp.float32)
    return (flat_sum + noise) / float(m)

  def check_output(self, metrics: dict) -> None:
    """Raises the SecAggError of the first refused round in ``metrics`` (one
    round, or stacked over rounds/runs), built from the metrics alone (a
    host error's text comes from this aggregator's hosts)."""
    if "secagg_refused" not in metrics:
      return
    codes = np.asarray(metrics["secagg_refused"])
    bad = np.argwhere(codes > 0)
    if not len(bad):
      return
    pos = tuple(int(i) for i in bad[0])
    get = lambda s: int(np.asarray(metrics[f"secagg_{s}"])[pos])
    reason = int(codes[pos])
    detail = ""
    if reason == REFUSED_HOST_ERROR:
      errors = [h.last_error for h in self.hosts.values() if h.last_error]
      detail = f" ({errors[-1]})" if errors else ""
    message = refusal_message(
      reason,
      client=get("refused_client"),
      peer=get("refused_peer"),
      holders=get("refused_holders"),
      survivors=get("survivors"),
      num_clients=get("survivors") + get("dropped"),
      threshold=get("threshold"),
      degree=get("degree"),
      detail=detail,
    )
    if codes.ndim:  # stacked: over the rounds of Engine.run, or runs
      message += (
        f" [{self.config.name}: {len(bad)} of {codes.size} stacked rounds "
        f"refused; first at index "
        f"{pos[0] if codes.ndim == 1 else list(pos)}.]"
      )
    raise SecAggError(
      message,
      reason=reason,
      client=get("refused_client"),
      peer=get("refused_peer"),
      holders=get("refused_holders"),
    )


def _checked_config(
  clip_norm,
  *,
  bits_per_value,
  bits,
  threshold,
  num_neighbors,
  dropout_rate,
  seed,
  noise_multiplier,
  name,
) -> SecAggConfig:
  """:func:`secure_aggregator`'s arguments, checked (what depends on
  ``clients_per_round``, ``b``, ``k`` and ``t``, is checked by ``init``)."""
  if (
    not isinstance(clip_norm, (int, float, np.floating))
    or isinstance(clip_norm, bool)
    or not np.isfinite(clip_norm)
    or clip_norm <= 0
  ):
    raise ValueError(
      f"{name}: clip_norm must be a positive finite float "
      f"(the L2 bound that makes quantization exact), got "
      f"{clip_norm!r}."
    )
  check_modulus_bits(
    MAX_BITS if bits is None else bits, bits_per_value, 1, name
  )
  rate = checks.in_range(f"{name}: dropout_rate", dropout_rate, 0.0, 1.0)
  if num_neighbors not in (None, "auto") and (
    not checks.is_int(num_neighbors) or num_neighbors < 2
  ):
    raise ValueError(
      f"{name}: num_neighbors must be None (SecAgg), "
      f"'auto' or an even int >= 2 (SecAgg+), got "
      f"{num_neighbors!r}."
    )
  if noise_multiplier is not None and (
    isinstance(noise_multiplier, bool)
    or not isinstance(noise_multiplier, (int, float, np.floating))
    or not np.isfinite(noise_multiplier)
    or noise_multiplier < 0
  ):
    raise ValueError(
      f"{name}: noise_multiplier must be None or a finite "
      f"float >= 0, got {noise_multiplier!r}."
    )
  seed = checks.int_at_least(
    f"{name}: seed",
    seed,
    0,
    allow_none=True,
    hint=" (None: fresh OS randomness every round)",
  )
  return SecAggConfig(
    clip_norm=float(clip_norm),
    bits_per_value=int(bits_per_value),
    bits=bits,
    threshold=threshold,
    num_neighbors=num_neighbors,
    dropout_rate=rate,
    seed=seed,
    noise_multiplier=noise_multiplier,
    name=name,
  )


def secure_aggregator(
  clip_norm: float,
  *,
  bits_per_value: int = 16,
  bits: int | None = None,
  threshold=None,
  num_neighbors: int | str | None = None,
  dropout_rate: float = 0.0,
  seed: int | None = 0,
  noise_multiplier: float | None = None,
  name: str = "secure_aggregator",
) -> Aggregator:
  r"""The mean of the survivors' clipped updates through SecAgg / SecAgg+.

  .. math:: \bar u = \frac{C}{L |U|} \Big(\big(\textstyle\sum_{u \in U} y_u
            - \text{masks}\big) \bmod 2^b - |U| L\Big)
            = \frac{1}{|U|} \sum_{u \in U} \frac{C}{L}
            \mathrm{round}\Big(\frac{L\,\mathrm{clip}_C(x_u)}{C}\Big)

  an unweighted mean (every surviving client counts once; ``total_weight``
  reports the survivors' summed weights), as TFF's
  ``secure_aggregator(weighted=False)``: a weighted one would need a public
  bound on the weights.

  Inside the jitted round: ``add`` clips, quantizes and masks ONE device's
  block (mask expansion and the modular sum on device) and adds the block's
  masked inputs mod :math:`2^{32}`; ``merge`` sums devices; ``finalize``
  removes the masks. The per-client host steps run through
  ``jax.pure_callback``: ``add`` fetches the round's table of mask seeds
  (``[m, k]`` pairwise + ``[m]`` self seeds; AdvertiseKeys and ShareKeys run
  on the host once per round, on the first request) and each client of the
  block uses only its own row; ``finalize`` runs the server's Unmasking
  round for the clients whose masked input arrived. Both talk to the
  aggregator's own :class:`SecAggHost` (one per round shape, made by
  ``init``, carried to ``add`` and ``finalize`` by the accumulator
  :class:`SecAggAccumulator`): two aggregators, even with the same
  arguments, never share one. The aggregator state is the round counter
  (int32).
  Client ``u`` of a round is its slot in the round's sample; its keys are
  fresh every round. The same seed gives the same keys to every run of a
  pooled sweep (reproducible, not independent). Host work per round: the
  key agreements and Shamir splits of all ``m`` clients (``O(m k)`` X25519,
  ``O(m k t)`` field operations), see ``experiments/benchmarks/secagg.py``.

  Dropouts: a fraction ``dropout_rate`` of each round's clients (chosen on the
  host from ``(seed, round)``) drops after masking: their masked input never
  arrives and they do not count; clients with weight 0 or padding slots never
  send either. Fewer than ``t`` surviving holders for some client (or
  inconsistent shares, a ciphertext failing authentication, see the module
  docstring): nothing is unmasked, the round's mean and ``total_weight`` are
  zero placeholders, ``secagg_refused`` > 0, and ``check_output`` (called by
  :meth:`Engine.round` / :meth:`Engine.run` after the round) raises
  :class:`SecAggError` with a one-line message (survivors, threshold, the
  clients concerned): the refused round's state is never returned. The
  device computation itself never raises.

  Non-finite updates: the engine drops them before any aggregator
  (``RoundConfig(nonfinite="drop")``, metric ``dropped_nonfinite``). If one
  reaches this aggregator anyway (e.g. from an aggregator wrapped around
  it), :func:`quantize` gives it no fixed-point value
  (:data:`INVALID_CODE`) and the client does not send its masked input: it
  counts as a dropout (for the threshold, too) and in ``secagg_nonfinite``;
  it never contributes (a NaN quantized as 0 would decode as ``-C`` per
  coordinate).

  DP (``noise_multiplier=z``): central Gaussian noise added by the server
  to the unmasked sum, then a fixed denominator ``D = clients_per_round``
  (DP-FedAvg's estimator, McMahan et al. 2018):

  .. math:: \tilde u = \frac{1}{D}\Big(\sum_{u \in U} \hat x_u
            + \mathcal{N}(0, z^2 C_q^2 I)\Big), \qquad
            C_q = C\big(1 + \tfrac{\sqrt{d}}{2L}\big)

  where :math:`C_q` bounds the L2 norm of a dequantized update
  :math:`\hat x_u` (rounding moves each of the ``d`` coordinates by at most
  :math:`C / 2L`), so ``z`` keeps its meaning and the accounting of
  :mod:`fedjax_lite.privacy.accounting` for fixed-size sampling applies
  unchanged (``DpMechanism(z, "fixed", population, clients_per_round)``).
  Why central: the Gaussian mechanism's accounting is reused as is; the
  distributed discrete Gaussian (Kairouz et al. 2021), with each client
  adding its share of the noise to ``q_u`` before masking, would also hide
  the sum from the server but needs its own accounting (modular clipping,
  the noise of dropped clients lost). What central noise means here: the
  server sees the sum before it adds the noise, so DP protects the released
  model against everyone downstream of the server, while secure aggregation
  protects each client's update from the server.

  Args:
    clip_norm: ``C``: every update is scaled to L2 norm at most ``C``.
    bits_per_value: fixed-point resolution ``L = 2^{bits_per_value} - 1``
      per sign (step ``C / L``).
    bits: modulus width ``b`` (``<= 32``); default the headroom minimum
      ``bits_per_value + ceil(log2 m) + 1`` for ``m = clients_per_round``.
    threshold: ``t`` (int, fraction of holders, or None = strict majority).
    num_neighbors: None = SecAgg (complete graph); an even ``k`` = SecAgg+
      on a random ``k``-regular Harary graph; ``"auto"`` =
      :func:`secagg_plus_degree` for the round's size, designed for
      ``max(dropout_rate, 0.05)``.
    dropout_rate: fraction in ``[0, 1)`` of clients dropping after masking.
    seed: key material seed (None: OS randomness every round).
    noise_multiplier: ``z >= 0`` for central DP noise (see above; the mean
      then divides by ``clients_per_round``); None: no noise, mean over the
      survivors.
    name: for reports.

  Metrics per round (float32): ``secagg_survivors``, ``secagg_dropped``,
  ``secagg_client_bytes_sent`` / ``_received`` (mean per client),
  ``secagg_server_key_agreements``, ``secagg_server_prg_expansions``,
  ``secagg_server_host_seconds``, ``secagg_clients_unmask_seconds``,
  ``secagg_setup_host_seconds`` (host seconds of AdvertiseKeys + ShareKeys
  for all clients), ``secagg_threshold``, ``secagg_degree``,
  ``secagg_nonfinite`` (clients whose update reached the aggregator non-finite
  and did not send), ``secagg_refused`` (0: unmasked, else a ``REFUSED_*``
  code), ``secagg_refused_client``, ``secagg_refused_peer``,
  ``secagg_refused_holders`` (the clients concerned, -1 if none; see
  :class:`SecAggError`).
  """
  config = _checked_config(
    clip_norm,
    bits_per_value=bits_per_value,
    bits=bits,
    threshold=threshold,
    num_neighbors=num_neighbors,
    dropout_rate=dropout_rate,
    seed=seed,
    noise_multiplier=noise_multiplier,
    name=name,
  )
  agg = _SecureAggregation(config)
  return Aggregator(
    agg.init_state,
    agg.init,
    agg.add,
    agg.merge,
    agg.finalize,
    materialized=False,
    name=name,
    check_output=agg.check_output,
  )
