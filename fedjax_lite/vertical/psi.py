r"""Diffie-Hellman private set intersection over X25519 (semi-honest).

The Meadows (1986) / Huberman-Franklin-Hogg (1999) protocol, with the group
exponentiation done by X25519 (RFC 7748) from the ``cryptography`` package.
Each id is hashed to a Montgomery u-coordinate ``P = H(id)``; a party with
secret scalar ``a`` *blinds* it as ``X25519(a, P)``. Blinding commutes,

.. math::

   X25519(b, X25519(a, P)) = x([b][a]P) = x([a][b]P)
   = X25519(a, X25519(b, P)),

because the Montgomery ladder computes ``x([k]P)`` for the point ``P`` on
either Curve25519 or its quadratic twist (every 32-byte string is the
u-coordinate of a point on one of the two), and ``[a]P`` stays on the same
curve. ``tests/test_vertical_psi.py`` checks this for points on both.

Two parties, guest ``G`` (scalar ``g``) and host ``H`` (scalar ``h``)::

  H -> G : U_H  = [X25519(h, H(x)) for x in host ids]          32 B per id
  G -> H : U_G  = [X25519(g, H(y)) for y in guest ids],
           UU_H = [X25519(g, u) for u in U_H]   (same order)      64 B per id
  H -> G : UU_G = [X25519(h, v) for v in U_G]   (same order)      32 B per id

Both now hold ``H(id)^{gh}`` for their own ids and the other's, so both learn
exactly the intersection; the common row order is the order of the doubly
blinded values (which depends on neither party's row order nor the raw ids).
With more hosts the guest runs this with each host, intersects the results,
and sends each host the doubly blinded values of the final intersection in
the final order (32 B per common id per host), so every party ends with the
same rows in the same order.

What it protects, plainly: against *semi-honest* parties (who follow the
protocol), under the decisional Diffie-Hellman assumption on Curve25519 and
its twist with ``H`` modelled as a random oracle, a party learns only the
intersection (and the other set's size), never the other ids. It does *not*
protect against malicious parties (one can put guessed ids in its set and
learn whether they are in the other's: that is what an intersection reveals,
and nothing limits a party's input), it reveals set sizes, and it is not a
constant-round-optimal or OPRF-based protocol. Caveats of using X25519 as the
group: ``H`` is SHA-256 into a u-coordinate, not a hash-to-curve (RFC 9380);
this is fine for the random-oracle argument because nobody knows a discrete
log of ``H(id)``, but about half the points lie on the twist, whose order
is 4 times a prime of about :math:`2^{253}` (Curve25519 was chosen to be
twist-secure). Clamped scalars are multiples of 8, a multiple of both
cofactors (8 on the curve, 4 on the twist), so ``X25519`` discards the
small-order component: two ids collide only if their hashed points differ by a small-order
point (or a sign), which has probability about :math:`2^{-250}`; ``X25519``
rejects the all-zero output (a low-order input), raised here as an error.
Each run uses fresh secret scalars from ``os.urandom`` unless ``seed`` is set
(tests only: a seeded scalar is no secret). This is a simulation in one
process: the "messages" are byte strings recorded in a transcript.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Sequence

import numpy as np

from fedjax_lite._optional import optional_import
from fedjax_lite.vertical.data import id_kind

# The vertical extra, imported at first use (fedjax_lite/_optional.py).
x25519 = optional_import(
  "cryptography.hazmat.primitives.asymmetric.x25519", "vertical"
)

ELEMENT_BYTES = 32
_DOMAIN = b"fedjax_lite.vertical.psi.v1|"


def encode_id(i) -> bytes:
  """Canonical bytes of one id: ``b"s:" + utf-8`` or ``b"i:" + decimal``."""
  if isinstance(i, (str, np.str_)):
    return b"s:" + str(i).encode("utf-8")
  if isinstance(i, (int, np.integer)) and not isinstance(i, bool):
    return b"i:" + str(int(i)).encode("ascii")
  raise TypeError(f"ids must be str or int, got {type(i).__name__} ({i!r}).")


def hash_to_u(i) -> bytes:
  """SHA-256 of the domain-separated id, top bit cleared: a 32-byte
  little-endian u-coordinate (of a point on Curve25519 or its twist)."""
  h = bytearray(hashlib.sha256(_DOMAIN + encode_id(i)).digest())
  h[31] &= 0x7F
  return bytes(h)


def blind(key: x25519.X25519PrivateKey, u: bytes) -> bytes:
  """``X25519(key, u)``: the commutative blinding of one element."""
  try:
    return key.exchange(x25519.X25519PublicKey.from_public_bytes(u))
  except ValueError as e:  # all-zero output: u is a low-order point
    raise ValueError(
      "PSI: an element is a low-order point (X25519 output "
      "is zero); rehash the id set with a different domain."
    ) from e


def new_key(rng: np.random.Generator | None) -> x25519.X25519PrivateKey:
  raw = os.urandom(32) if rng is None else rng.bytes(32)
  return x25519.X25519PrivateKey.from_private_bytes(raw)  # clamped inside


@dataclasses.dataclass(frozen=True)
class Message:
  """One protocol message: a list of 32-byte group elements."""

  sender: str
  receiver: str
  name: str
  payload: tuple[bytes, ...]

  @property
  def nbytes(self) -> int:
    return sum(len(p) for p in self.payload)


@dataclasses.dataclass(frozen=True)
class PsiResult:
  """What the parties end with.

  Attributes:
    rows: per party, ``[m]`` int64 row indices into its own table, in the
      common order (row ``rows[k][i]`` of party ``k`` is sample ``i``).
    size: ``m``, the intersection size.
    bytes_sent: party name -> bytes it sent.
    messages: the transcript (everything that crossed between parties).
  """

  rows: tuple[np.ndarray, ...]
  size: int
  bytes_sent: dict
  messages: tuple[Message, ...]


def _pairwise(g_name, g_ids, g_key, h_name, h_ids, h_key, log):
  """The 3-message protocol; returns ``(guest_map, host_map)`` of doubly
  blinded value -> own row index, each restricted to the intersection."""
  # Host: blind own ids (host-side computation).
  u_h = [blind(h_key, hash_to_u(x)) for x in h_ids]
  log.append(Message(h_name, g_name, "host_blinded", tuple(u_h)))
  # Guest: blind own ids; re-blind the host's.
  u_g = [blind(g_key, hash_to_u(y)) for y in g_ids]
  uu_h = [blind(g_key, u) for u in u_h]
  log.append(Message(g_name, h_name, "guest_blinded", tuple(u_g)))
  log.append(Message(g_name, h_name, "host_double_blinded", tuple(uu_h)))
  # Host: re-blind the guest's, return them.
  uu_g = [blind(h_key, v) for v in u_g]
  log.append(Message(h_name, g_name, "guest_double_blinded", tuple(uu_g)))
  # Each side intersects the two doubly blinded lists it now holds.
  host_view = {v: i for i, v in enumerate(uu_h)}
  guest_set = set(uu_g)
  host_map = {v: i for v, i in host_view.items() if v in guest_set}
  guest_map = {v: j for j, v in enumerate(uu_g) if v in host_view}
  return guest_map, host_map


def ecdh_psi(
  id_lists: Sequence[Sequence],
  names: Sequence[str] | None = None,
  guest: int = 0,
  seed: int | None = None,
) -> PsiResult:
  """Intersects the parties' id sets; every party learns the intersection.

  Args:
    id_lists: per party, its ids (all ``str`` or all ``int``, unique).
    names: party names (for the transcript and errors).
    guest: the party that runs the pairwise protocol with every other.
    seed: seeds the secret scalars (tests only); None draws them from
      ``os.urandom``.

  Returns:
    :class:`PsiResult`; rows are in the order of the guest-host-0 doubly
    blinded values.

  Raises:
    ValueError: duplicate ids within a party, mixed id types, or an empty
      intersection.
  """
  num = len(id_lists)
  names = (
    tuple(names)
    if names is not None
    else tuple(f"party{k}" for k in range(num))
  )
  if num < 2:
    raise ValueError(f"PSI needs at least 2 parties, got {num}.")
  ids = [np.asarray(i) for i in id_lists]
  kinds = {}
  for n, i in zip(names, ids):
    kinds[n] = id_kind(i, f"party {n!r}")
    if np.unique(i).size != i.size:
      raise ValueError(f"party {n!r} has duplicate ids; PSI needs a set.")
    if i.size == 0:
      raise ValueError(f"party {n!r} has no ids.")
  if len(set(kinds.values())) > 1:
    raise TypeError(
      f"parties use different id types {kinds}; convert them "
      "to one type (e.g. ids.astype(str))."
    )
  rng = None if seed is None else np.random.default_rng(seed)
  keys = [new_key(rng) for _ in range(num)]
  log: list[Message] = []
  hosts = [k for k in range(num) if k != guest]
  pair = {}
  for k in hosts:
    pair[k] = _pairwise(
      names[guest], ids[guest], keys[guest], names[k], ids[k], keys[k], log
    )
    if not pair[k][0]:
      raise ValueError(
        f"parties {names[guest]!r} and {names[k]!r} share no "
        "sample ids; vertical training needs common samples. "
        "Check that both use the same id scheme (e.g. the same "
        "customer key, same formatting)."
      )
  # Guest: rows present in every pairwise intersection, ordered by the first
  # host's doubly blinded value.
  common = set.intersection(*(set(pair[k][0].values()) for k in hosts))
  if not common:
    raise ValueError(
      f"the parties {list(names)} share no sample id common to all of them."
    )
  first = hosts[0]
  order = sorted((v, j) for v, j in pair[first][0].items() if j in common)
  guest_rows = np.asarray([j for _, j in order], np.int64)
  rows: list[np.ndarray | None] = [None] * num
  rows[guest] = guest_rows
  for k in hosts:
    by_row = {j: v for v, j in pair[k][0].items()}
    final = tuple(by_row[j] for j in guest_rows)
    log.append(Message(names[guest], names[k], "final_order", final))
    host_map = pair[k][1]  # host k maps each value to its own row
    rows[k] = np.asarray([host_map[v] for v in final], np.int64)
  sent = {n: 0 for n in names}
  for m in log:
    sent[m.sender] += m.nbytes
  return PsiResult(
    rows=tuple(rows), size=len(guest_rows), bytes_sent=sent, messages=tuple(log)
  )
