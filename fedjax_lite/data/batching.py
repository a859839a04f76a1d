r"""Device-side client data: padding plan, size buckets, sampling and gathering.

Everything here runs inside the jitted round. A sampled client's examples are
gathered from the packed device arrays into a static ``[steps, batch, ...]``
block with an example mask, so shapes never change between rounds.

Padding and buckets. Clients are grouped into a few *size buckets*; a client in
bucket ``j`` is padded to that bucket's largest client ``L_j``. With one bucket
every client is padded to the population's largest client, which wastes most of
the work on power-law client sizes; :func:`choose_buckets` picks bucket limits
that minimise the padded slots (dynamic programming over the sorted sizes) and
:func:`padding_report` reports the waste.

Local work. ``LocalWork(batch_size, num_epochs)`` runs ``num_epochs`` passes
over the client's data in batches of ``batch_size`` (the last batch of a pass
may be short: it is the masked mean over its valid examples), shuffled each
pass; ``LocalWork(batch_size, num_steps=S)`` runs exactly ``S`` steps cycling
through one per-round shuffle of the client's data; ``batch_size=None`` is
full-batch gradient descent (one step per epoch on all the client's examples).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lite import checks
from fedjax_lite.data.federated_dataset import FederatedDataset


@dataclasses.dataclass(frozen=True)
class LocalWork:
  """How much local training one client does per round (static config).

  Attributes:
    batch_size: examples per local step; ``None`` = the client's whole data
      (full-batch gradient descent).
    num_epochs: passes over the client's data (exclusive with ``num_steps``).
    num_steps: a fixed number of local steps instead of epochs.
    shuffle: reshuffle the client's examples every pass.
  """

  batch_size: int | None = 10
  num_epochs: int | None = 1
  num_steps: int | None = None
  shuffle: bool = True

  def __post_init__(self):
    checks.positive_int(
      "batch_size", self.batch_size, allow_none=True, hint=" (None: full batch)"
    )
    if self.num_steps is not None:
      checks.positive_int("num_steps", self.num_steps)
      object.__setattr__(self, "num_epochs", None)
    else:
      checks.positive_int(
        "num_epochs", self.num_epochs, hint=" (or give num_steps)"
      )

  def plan(self, max_examples: int) -> tuple[int, int]:
    """Static ``(num_steps, batch_size)`` for clients of at most ``max_examples``."""
    b = max_examples if self.batch_size is None else self.batch_size
    if self.num_steps is not None:
      return self.num_steps, b
    return self.num_epochs * math.ceil(max_examples / b), b

  def slots(self, max_examples: int) -> int:
    steps, b = self.plan(max_examples)
    return steps * b

  def examples_processed(self, n: np.ndarray) -> np.ndarray:
    """Example-steps a client of size ``n`` really uses (for waste reports)."""
    if self.num_steps is not None:
      b = n if self.batch_size is None else self.batch_size
      return self.num_steps * np.asarray(b)
    return self.num_epochs * np.asarray(n)


# --------------------------------------------------------------------- buckets
def choose_buckets(
  counts: np.ndarray,
  local_work: LocalWork,
  max_buckets: int | str = "auto",
  max_waste: float = 0.15,
) -> tuple[int, ...]:
  """Upper client sizes of the size buckets, ascending.

  Minimises the total padded example slots over the population with dynamic
  programming on the distinct client sizes (at most ~256 candidate limits:
  quantiles plus log-spaced sizes). With ``max_buckets="auto"`` the fewest buckets (at most 8) whose
  waste is at most ``max_waste`` are used.
  """
  counts = np.asarray(counts, np.int64)
  if isinstance(max_buckets, str):
    if max_buckets != "auto":
      raise ValueError(
        f"max_buckets must be a positive int or 'auto', got {max_buckets!r}."
      )
    limit = 8
  else:
    limit = int(max_buckets)
    if limit < 1:
      raise ValueError(f"max_buckets must be >= 1, got {max_buckets!r}.")
  sizes, freq = np.unique(counts, return_counts=True)
  if sizes.size > 256:
    # Candidate limits: quantiles (where the clients are) and log-spaced
    # sizes (where the padded slots are, on heavy tails), snapped up to
    # sizes that occur.
    q = np.quantile(counts, np.linspace(0, 1, 129), method="higher")
    g = np.geomspace(sizes[0], sizes[-1], 128)
    snap = sizes[np.minimum(np.searchsorted(sizes, g), sizes.size - 1)]
    cand = np.unique(np.concatenate([q.astype(np.int64), snap, sizes[-1:]]))
    idx = np.searchsorted(cand, sizes)
    freq = np.bincount(idx, weights=freq, minlength=cand.size)
    sizes = cand
  u = sizes.size
  slots = np.array([local_work.slots(int(s)) for s in sizes], np.float64)
  cum = np.concatenate([[0.0], np.cumsum(freq)])
  used = float(local_work.examples_processed(counts).sum())
  # cost[i] (buckets ending at candidate i): min over p of best[p] + slots[i] *
  # (clients in (p, i]).
  inf = np.inf
  best = np.full(u + 1, inf)
  best[0] = 0.0
  choice = []
  results = {}
  for k in range(1, min(limit, u) + 1):
    new = np.full(u + 1, inf)
    arg = np.zeros(u + 1, np.int64)
    for i in range(1, u + 1):
      c = best[:i] + slots[i - 1] * (cum[i] - cum[:i])
      p = int(np.argmin(c))
      new[i], arg[i] = c[p], p
    choice.append(arg)
    best = new
    # Reconstruct the k-bucket solution.
    bounds, i = [], u
    for kk in range(k - 1, -1, -1):
      bounds.append(int(sizes[i - 1]))
      i = int(choice[kk][i])
      if i == 0:
        break
    total = best[u]
    waste = 1.0 - used / total if total > 0 else 0.0
    results[k] = (tuple(sorted(set(bounds))), waste)
    if isinstance(max_buckets, str) and waste <= max_waste:
      return results[k][0]
  if isinstance(max_buckets, str):
    return min(results.values(), key=lambda r: r[1])[0]
  return results[max(results)][0]


def padding_report(
  counts: np.ndarray, local_work: LocalWork, bucket_sizes: Sequence[int]
) -> dict:
  """Share of padded example slots when every client is sampled equally often."""
  counts = np.asarray(counts, np.int64)
  bucket_sizes = tuple(bucket_sizes)
  b = np.searchsorted(np.asarray(bucket_sizes), counts)
  slots = np.array([local_work.slots(s) for s in bucket_sizes], np.float64)[b]
  used = local_work.examples_processed(counts).astype(np.float64)
  one = float(local_work.slots(int(counts.max())))
  return {
    "bucket_sizes": list(bucket_sizes),
    "clients_per_bucket": np.bincount(b, minlength=len(bucket_sizes)).tolist(),
    "waste": float(1.0 - used.sum() / slots.sum()),
    "waste_one_bucket": float(1.0 - used.sum() / (one * counts.size)),
  }


# ----------------------------------------------------------------- device data
@flax.struct.dataclass
class DeviceData:
  """A :class:`FederatedDataset` on device, with its static padding plan.

  Attributes:
    features: name -> ``[total_examples + max(bucket_sizes), ...]`` device
      array (zero rows at the end so a client's padded slice stays in bounds).
    offsets, counts: int32 ``[num_clients]``.
    bucket: int32 ``[num_clients]``: each client's size bucket.
    bucket_sizes: static tuple, the largest client of each bucket.
    bucket_clients, bucket_examples: static tuples, clients and examples per
      bucket (the engine sizes each bucket's blocks by its expected share of
      a round's clients).
    owner: None for replicated data (every device holds every client). For
      client-sharded data (:func:`fedjax_lite.data.to_device_sharded`),
      int32 ``[num_clients]``, the mesh position of the device holding each
      client; ``features`` then have shape ``[num_devices, shard_rows, ...]``
      (sharded on the first axis) and ``offsets`` index each client's rows
      inside its device's shard.
  """

  features: Mapping[str, jax.Array]
  offsets: jax.Array
  counts: jax.Array
  bucket: jax.Array
  bucket_sizes: tuple = flax.struct.field(pytree_node=False)
  bucket_clients: tuple = flax.struct.field(pytree_node=False, default=None)
  bucket_examples: tuple = flax.struct.field(pytree_node=False, default=None)
  owner: jax.Array | None = None

  @property
  def num_clients(self) -> int:
    return int(self.counts.shape[0])

  @property
  def sharded(self) -> bool:
    """True when each device holds only its share of the clients."""
    return self.owner is not None

  def shard_view(self, shard: jax.Array) -> "DeviceData":
    """The replicated-style view of one device's shard (``features[shard]``)
    for the clients that device holds (offsets are local to the shard)."""
    if not self.sharded:
      return self
    return self.replace(
      features={k: v[shard] for k, v in self.features.items()}, owner=None
    )


def bucket_plan(
  counts: np.ndarray,
  local_work: LocalWork,
  buckets: int | str | Sequence[int] = "auto",
) -> tuple[tuple, np.ndarray]:
  """``(bucket sizes, int32 bucket of every client)`` for client sizes
  ``counts`` (``buckets``: ``"auto"``, a maximum count, or explicit limits)."""
  if isinstance(buckets, (list, tuple)):
    sizes = tuple(int(s) for s in buckets)
    if list(sizes) != sorted(set(sizes)) or sizes[-1] < counts.max():
      raise ValueError(
        f"buckets={buckets!r} must be strictly ascending and end "
        f">= the largest client ({int(counts.max())})."
      )
  else:
    sizes = choose_buckets(counts, local_work, buckets)
  return sizes, np.searchsorted(np.asarray(sizes), counts).astype(np.int32)


def to_device(
  dataset: FederatedDataset,
  local_work: LocalWork,
  buckets: int | str | Sequence[int] = "auto",
  sharding: jax.sharding.Sharding | None = None,
) -> DeviceData:
  """Uploads a dataset and fixes its padding plan (bucket sizes).

  Args:
    dataset: the packed dataset.
    local_work: local training spec (decides what padding costs).
    buckets: ``"auto"``, a maximum number of buckets, or explicit ascending
      upper sizes (the last must be >= the largest client).
    sharding: where to place the arrays (default: replicated on the default
      mesh of the engine, or the default device).
  """
  if not isinstance(dataset, FederatedDataset):
    raise TypeError(
      f"dataset must be a FederatedDataset, got "
      f"{type(dataset).__name__}. Build one with "
      "FederatedDataset.from_clients(...)."
    )
  counts = dataset.counts
  sizes, bucket = bucket_plan(counts, local_work, buckets)
  put = (
    (lambda a: jax.device_put(a, sharding))
    if sharding is not None
    else (jnp.asarray)
  )
  if int(counts.sum()) >= 2**31:
    raise ValueError("datasets with >= 2**31 examples are not supported.")
  pad = int(max(sizes))
  feats = {
    k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
    for k, v in dataset.features.items()
  }
  return device_data(
    {k: put(v) for k, v in feats.items()},
    dataset.offsets,
    counts,
    sizes,
    bucket,
    put,
  )


def device_data(features, offsets, counts, sizes, bucket, put, owner=None):
  """A :class:`DeviceData` from uploaded ``features`` and host per-client
  vectors (``put`` uploads them; ``owner``: see :class:`DeviceData`)."""
  return DeviceData(
    features=features,
    offsets=put(np.asarray(offsets).astype(np.int32)),
    counts=put(counts.astype(np.int32)),
    bucket=put(bucket),
    bucket_sizes=tuple(sizes),
    bucket_clients=tuple(
      int(v) for v in np.bincount(bucket, minlength=len(sizes))
    ),
    bucket_examples=tuple(
      int(v) for v in np.bincount(bucket, weights=counts, minlength=len(sizes))
    ),
    owner=None if owner is None else put(owner),
  )


# -------------------------------------------------------------------- sampling
def sample_clients(
  rng: jax.Array,
  num_clients: int,
  num_sampled: int,
  weights: jax.Array | None = None,
  replace: bool = False,
) -> jax.Array:
  """Client indices for one round, int32 ``[num_sampled]``.

  Uniform without replacement uses the top-``k`` of i.i.d. uniform keys;
  weighted without replacement uses Gumbel-top-``k`` (successive sampling
  proportional to ``weights``); ``replace=True`` draws i.i.d.
  """
  if num_sampled > num_clients and not replace:
    raise ValueError(
      f"clients_per_round={num_sampled} is larger than the "
      f"population of {num_clients} clients; expected at most "
      f"{num_clients} (or sample with replacement)."
    )
  if replace:
    p = None if weights is None else weights / jnp.sum(weights)
    return jax.random.choice(
      rng, num_clients, (num_sampled,), replace=True, p=p
    ).astype(jnp.int32)
  if weights is None:
    if num_sampled == num_clients:
      return jax.random.permutation(rng, num_clients).astype(jnp.int32)
    keys = jax.random.uniform(rng, (num_clients,))
  else:
    keys = jnp.log(weights) + jax.random.gumbel(rng, (num_clients,))
  return jax.lax.top_k(keys, num_sampled)[1].astype(jnp.int32)


# -------------------------------------------------------------------- gathering
_RANK_SORT_MAX = 128


def _random_order(keys: jax.Array) -> jax.Array:
  """``argsort(keys, axis=-1)`` as int32, ties broken by position.

  Short rows (typical client sizes) use pairwise ranks, O(n^2) vectorised
  compares that beat XLA's CPU sort by ~10x at n=50; long rows use argsort.
  """
  n = keys.shape[-1]
  if n > _RANK_SORT_MAX:
    return jnp.argsort(keys, axis=-1).astype(jnp.int32)
  lead = (1,) * (keys.ndim - 1)
  idx = jnp.arange(n, dtype=jnp.int32)
  ki, kj = keys[..., :, None], keys[..., None, :]
  tie = (idx[None, :] < idx[:, None]).reshape(lead + (n, n))
  before = (kj < ki) | ((kj == ki) & tie)
  rank = jnp.sum(before, axis=-1, dtype=jnp.int32)  # [..., n]
  onehot = rank[..., None, :] == idx.reshape(lead + (n, 1))  # [..., pos, i]
  return jnp.sum(
    jnp.where(onehot, idx.reshape(lead + (1, n)), 0), axis=-1, dtype=jnp.int32
  )


@flax.struct.dataclass
class ClientData:
  """One client's local data for a round (no client axis).

  Attributes:
    batches: feature name -> ``[num_steps, batch_size, ...]``.
    mask: bool ``[num_steps, batch_size]``, True for real examples.
    num_examples: int32 scalar, the client's dataset size ``n_k``.
    client_id: int32 scalar index of the client in the population.
    slot: int32 scalar, the client's position in this round's sample
      (``0 .. clients_per_round-1``); lets an algorithm make round-level
      choices (e.g. exactly 90% stragglers) from a key it broadcasts.
    num_clients: static int, the population size (set by the engine's
      gather; None for hand-made client data). An algorithm that indexes a
      per-client array with ``client_id`` checks its length against it at
      trace time (:func:`fedjax_lite.checks.per_client`): a jitted gather
      would clamp the ids beyond a short array onto its last entry.
  """

  batches: Mapping[str, jax.Array]
  mask: jax.Array
  num_examples: jax.Array
  client_id: jax.Array
  slot: jax.Array = None
  num_clients: int | None = flax.struct.field(pytree_node=False, default=None)

  @property
  def num_steps(self) -> int:
    """Local steps of the layout (static), ``mask.shape[0]``."""
    return self.mask.shape[0]


def gather_client(
  data: DeviceData,
  client_id: jax.Array,
  rng: jax.Array,
  local_work: LocalWork,
  bucket_size: int,
  slot: jax.Array | None = None,
) -> ClientData:
  """Gathers one client's examples into ``[steps, batch, ...]`` (traceable)."""
  steps, b = local_work.plan(bucket_size)
  n = data.counts[client_id]
  off = data.offsets[client_id]
  L = bucket_size
  if local_work.num_steps is not None:
    if local_work.shuffle:
      keys = jax.random.uniform(rng, (L,))
      keys = jnp.where(jnp.arange(L) < n, keys, 2.0)
      order = _random_order(keys)
    else:
      order = jnp.arange(L, dtype=jnp.int32)
    pos = jnp.arange(steps * b, dtype=jnp.int32)
    if local_work.batch_size is None:
      # Full batch: every step sees exactly the client's n examples.
      pos = jnp.tile(jnp.arange(b, dtype=jnp.int32), steps)
      local = order[pos].reshape(steps, b)
      mask = (pos < n).reshape(steps, b)
    else:
      local = order[pos % n].reshape(steps, b)
      mask = jnp.ones((steps, b), bool)
  else:
    epochs = local_work.num_epochs
    per_epoch = steps // epochs * b
    pos = jnp.arange(per_epoch, dtype=jnp.int32)
    valid = pos < n
    if local_work.shuffle:
      keys = jax.random.uniform(rng, (epochs, per_epoch))
      keys = jnp.where(valid[None], keys, 2.0)
      local = _random_order(keys)
    else:
      local = jnp.broadcast_to(pos, (epochs, per_epoch))
    local = local.reshape(steps, b)
    mask = jnp.broadcast_to(valid, (epochs, per_epoch)).reshape(steps, b)
  # Slice the client's contiguous rows (a cheap block copy; the packed arrays
  # are padded at the end so the slice never runs out of bounds), then pick
  # the shuffled rows inside that small, cache-resident block.
  rows = jnp.minimum(local, n - 1)
  batches = {}
  for k, v in data.features.items():
    block = jax.lax.dynamic_slice_in_dim(v, off, L, axis=0)
    batches[k] = jnp.take(block, rows, axis=0, mode="clip")
  return ClientData(
    batches=batches,
    mask=mask,
    num_examples=n,
    client_id=client_id.astype(jnp.int32),
    slot=(
      jnp.zeros((), jnp.int32) if slot is None else jnp.asarray(slot, jnp.int32)
    ),
    num_clients=data.num_clients,
  )
