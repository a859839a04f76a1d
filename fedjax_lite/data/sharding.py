r"""Client-sharded device data: each device holds only its share of the clients.

Replicated data (:func:`~fedjax_lite.data.to_device`) puts the whole packed
population on every device, so the population is capped by ONE device's
memory. Client-sharded data splits the population by client across the
``"clients"`` axis of the mesh::

    owner[k]  = the device (mesh position) that holds client k
    features  = [num_devices, shard_rows, ...], sharded on the first axis;
                device d holds the rows of its clients (and zero padding)
    offsets[k] = client k's first row inside its device's shard

Assignment. Within every size bucket, clients are dealt to devices in a snake
order of decreasing size (d_0, d_1, .., d_{nd-1}, d_{nd-1}, .., d_0, ...),
where d_0 is the device holding the fewest rows so far, and the bucket's
remainder (its smallest clients) goes to the lightest devices: every device
holds ~1/nd of each bucket's clients (within one) and of all the examples. The assignment is
a function of the client sizes only, so every process of a multi-process run
computes the same one and loads only the rows of its own devices' clients
(:class:`ClientLoader` reads them on demand).

The per-client vectors (``counts``, ``offsets``, ``bucket``, ``owner``: 16
bytes per client) stay replicated: sampling reads them, and its distribution
is unchanged. The engine then trains each sampled client on the device that
holds it (see :mod:`fedjax_lite.engine.round`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedjax_lite import checks, runtime
from fedjax_lite.data.batching import (
  DeviceData,
  LocalWork,
  bucket_plan,
  device_data,
)
from fedjax_lite.data.federated_dataset import FederatedDataset, narrow

__all__ = [
  "ClientLoader",
  "check_data_memory",
  "client_rows",
  "resident_bytes",
  "shard_clients",
  "to_device_sharded",
]


class ClientLoader:
  """A population whose clients' examples are read on demand.

  A process of a multi-process run (or a single process with a population
  larger than host memory at once) loads only the clients its devices hold.

  Args:
    counts: ``[num_clients]`` examples of every client (known up front: the
      shard assignment and sampling need them).
    load: ``load(clients) -> {feature: array}``, the examples of the given
      client indices (ascending int64 array) packed back to back in that
      order: ``counts[clients].sum()`` rows per feature.
  """

  def __init__(
    self, counts: Sequence[int], load: Callable[[np.ndarray], Mapping]
  ):
    counts = np.asarray(counts, np.int64).reshape(-1)
    if counts.size == 0 or np.any(counts <= 0):
      raise ValueError(
        "counts must list a positive number of examples for at least one "
        "client."
      )
    if not callable(load):
      raise TypeError(f"load must be callable, got {type(load).__name__}.")
    self.counts = counts
    self._load = load
    self._spec: dict | None = None  # feature -> (trailing shape, dtype)

  @property
  def num_clients(self) -> int:
    return int(self.counts.size)

  def rows(self, clients: np.ndarray) -> dict:
    """The packed examples of ``clients``, checked against ``counts``."""
    feats = dict(self._load(np.asarray(clients, np.int64)))
    want = int(self.counts[clients].sum())
    for k, v in feats.items():
      v = np.asarray(v)
      if v.shape[:1] != (want,):
        raise ValueError(
          f"ClientLoader: load() returned {v.shape[0]} rows of feature "
          f"{k!r} for {len(clients)} clients holding {want} examples; "
          "expected the clients' rows back to back, in the order asked."
        )
      feats[k] = narrow(v)
    if not feats:
      raise ValueError("ClientLoader: load() returned no features.")
    spec = {k: (v.shape[1:], v.dtype) for k, v in feats.items()}
    if self._spec is None:
      self._spec = spec
    elif spec != self._spec:
      raise ValueError(
        f"ClientLoader: load() returned features {_describe(spec)} for "
        f"clients {clients[:3].tolist()}..., but {_describe(self._spec)} "
        "before; expected the same features, per-example shapes and dtypes "
        "for every client."
      )
    return feats


def _describe(spec: dict) -> str:
  return (
    "{"
    + ", ".join(
      f"{k}: {np.dtype(d).name}{list(s)}" for k, (s, d) in sorted(spec.items())
    )
    + "}"
  )


def client_rows(
  source: FederatedDataset | ClientLoader, clients, out: dict | None = None
) -> dict:
  """``{feature: rows}`` of ``clients`` packed back to back in that order
  (written into the leading rows of ``out[feature]`` when given)."""
  clients = np.asarray(clients, np.int64).reshape(-1)
  if isinstance(source, ClientLoader):
    feats = source.rows(clients)
    if out is None:
      return feats
    for k, v in feats.items():
      out[k][: v.shape[0]] = v
    return {k: out[k][: v.shape[0]] for k, v in feats.items()}
  counts = source.counts[clients]
  local = np.cumsum(counts) - counts
  rows = np.repeat(source.offsets[clients] - local, counts) + np.arange(
    int(counts.sum())
  )
  if out is None:
    return {k: v[rows] for k, v in source.features.items()}
  return {
    k: np.take(v, rows, axis=0, out=out[k][: rows.size], mode="clip")
    for k, v in source.features.items()
  }


def shard_clients(
  counts: np.ndarray, bucket: np.ndarray, num_shards: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Balanced assignment of clients to ``num_shards`` devices.

  Returns:
    ``(owner, local_offsets, shard_rows)``: int32 ``[num_clients]`` device
    of each client, int64 ``[num_clients]`` first row of each client inside
    its shard (clients in index order), int64 ``[num_shards]`` rows held.
  """
  counts = np.asarray(counts, np.int64)
  bucket = np.asarray(bucket)
  nd = int(num_shards)
  owner = np.empty(counts.size, np.int32)
  rows = np.zeros(nd, np.int64)
  for j in np.unique(bucket)[::-1]:  # largest clients first
    idx = np.flatnonzero(bucket == j)
    order = idx[np.argsort(-counts[idx], kind="stable")]
    full = (order.size // nd) * nd
    # Whole rounds of nd clients in snake order from the lightest device,
    # then the remainder (the bucket's smallest) to the lightest devices.
    r = np.arange(full) % (2 * nd)
    lightest = np.argsort(rows, kind="stable")
    owner[order[:full]] = lightest[np.where(r < nd, r, 2 * nd - 1 - r)]
    rows += np.bincount(
      owner[order[:full]], weights=counts[order[:full]], minlength=nd
    ).astype(np.int64)
    rest = order[full:]
    owner[rest] = np.argsort(rows, kind="stable")[: rest.size]
    rows += np.bincount(owner[rest], weights=counts[rest], minlength=nd).astype(
      np.int64
    )
  local = np.empty(counts.size, np.int64)
  shard_rows = np.zeros(nd, np.int64)
  for d in range(nd):
    idx = np.flatnonzero(owner == d)
    c = counts[idx]
    local[idx] = np.cumsum(c) - c
    shard_rows[d] = c.sum()
  return owner, local, shard_rows


def _per_example_bytes(features: Mapping[str, Any]) -> int:
  return int(
    sum(
      math.prod(v.shape[1:]) * np.dtype(v.dtype).itemsize
      for v in features.values()
    )
  )


def check_data_memory(
  rows_per_device: Sequence[int],
  per_example: int,
  devices: Sequence[Any],
  *,
  what: str,
  available: int | None = None,
  source: str | None = None,
) -> int:
  """Raises MemoryError (saying how much is needed) when data cannot fit.

  CPU devices of one process share the host's memory, so their shares add
  up; an accelerator holds its own share.

  Returns:
    The bytes needed in the memory compared against.
  """
  rows = [int(r) for r in rows_per_device]
  devices = list(devices)
  if available is None:
    available, source = runtime.device_memory_bytes(devices[0])
  shared = devices[0].platform == "cpu"
  per_device = max(rows) * int(per_example)
  need = sum(rows) * int(per_example) if shared else per_device
  if available is not None and need > available:
    gib = 2.0**30
    where = (
      f"{len(devices)} CPU device(s) sharing {available / gib:.2f} GiB of "
      f"{source}"
      if shared
      else f"{available / gib:.2f} GiB per {devices[0].platform} device "
      f"({source})"
    )
    raise MemoryError(
      f"{what} needs {need / gib:.2f} GiB on this process's devices "
      f"({per_device / gib:.2f} GiB on the fullest device) but has only "
      f"{where}. Shard the clients over more devices or processes "
      "(placement='sharded', --processes), or use fewer clients."
    )
  return need


def to_device_sharded(
  dataset: FederatedDataset | ClientLoader,
  local_work: LocalWork,
  mesh: Mesh,
  buckets: int | str | Sequence[int] = "auto",
  *,
  axis: str = "clients",
) -> DeviceData:
  """Uploads a population split by client over the ``axis`` of ``mesh``.

  Every process computes the same assignment from the client sizes and
  builds only the shards of its own (addressable) devices, reading only
  those clients' examples from ``dataset``.

  Args:
    dataset: the packed population, or a :class:`ClientLoader`.
    local_work: local training spec (decides the size buckets).
    mesh: the engine's mesh; its ``axis`` is the client axis.
    buckets: ``"auto"``, a maximum number of buckets, or explicit limits.
    axis: the mesh axis the clients are split over.
  """
  checks.instance_of("dataset", dataset, (FederatedDataset, ClientLoader))
  if axis not in mesh.axis_names:
    raise ValueError(
      f"mesh must have an axis named {axis!r}, got {mesh.axis_names}."
    )
  counts = dataset.counts
  sizes, bucket = bucket_plan(counts, local_work, buckets)
  devices = np.asarray(mesh.devices).reshape(-1)
  nd = int(mesh.shape[axis])
  if devices.size != nd:
    raise ValueError(
      f"client-sharded data needs a 1-D mesh over {axis!r}; got mesh shape "
      f"{dict(mesh.shape)}."
    )
  owner, local, shard_rows = shard_clients(counts, bucket, nd)
  pad = int(max(sizes))
  length = int(shard_rows.max()) + pad
  mine = [
    d for d in range(nd) if devices[d].process_index == jax.process_index()
  ]
  held = [np.flatnonzero(owner == d) for d in range(nd)]
  # One client to learn the features' shapes: one of this process's own if
  # it holds any (its devices may hold none in a tiny population).
  probe = next((h[:1] for h in (held[d] for d in mine) if h.size), held[0][:0])
  if probe.size == 0:
    probe = np.zeros(1, np.int64)
  first = client_rows(dataset, probe)
  per_example = _per_example_bytes(first)
  check_data_memory(
    [length] * len(mine),
    per_example,
    [devices[d] for d in mine],
    what=f"client-sharded data ({dataset.num_clients} clients, "
    f"{per_example} bytes per example, {length} rows per device)",
  )
  if length >= 2**31:
    raise ValueError(
      f"a device shard of {length} rows; at most 2**31 - 1 are supported "
      "(shard the clients over more devices)."
    )
  shards: dict[str, list] = {k: [] for k in first}
  for d in mine:
    # The device's rows are written straight into its zero-padded block (no
    # intermediate copy of the shard on the host).
    blocks = {
      k: np.zeros((1, length) + v.shape[1:], v.dtype) for k, v in first.items()
    }
    if held[d].size:  # a device may hold no client at all
      client_rows(dataset, held[d], {k: b[0] for k, b in blocks.items()})
    for k, block in blocks.items():
      shards[k].append(jax.device_put(block, devices[d]))
    del blocks
  sharded = NamedSharding(mesh, P(axis))
  features = {
    k: jax.make_array_from_single_device_arrays(
      (nd, length) + tuple(parts[0].shape[2:]), sharded, parts
    )
    for k, parts in shards.items()
  }
  replicated = NamedSharding(mesh, P())
  return device_data(
    features,
    local,
    counts,
    sizes,
    bucket,
    lambda a: jax.device_put(a, replicated),
    owner=owner,
  )


def resident_bytes(data: DeviceData) -> dict:
  """Bytes of ``data`` resident on each of this process's devices.

  Returns:
    ``{"per_device": {device id: bytes}, "features_per_device": {...},
    "max": bytes, "total": bytes}`` over the addressable shards (features
    and the per-client vectors).
  """
  per_device: dict[int, int] = {}
  feats: dict[int, int] = {}
  for leaf_path, leaf in jax.tree_util.tree_flatten_with_path(data)[0]:
    is_feature = "features" in jax.tree_util.keystr(leaf_path)
    for shard in leaf.addressable_shards:
      n = int(shard.data.nbytes)
      dev = int(shard.device.id)
      per_device[dev] = per_device.get(dev, 0) + n
      if is_feature:
        feats[dev] = feats.get(dev, 0) + n
  return {
    "per_device": per_device,
    "features_per_device": feats,
    "max": max(per_device.values()),
    "total": sum(per_device.values()),
  }
