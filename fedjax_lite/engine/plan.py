"""The round's host-side block plan and memory checks.

A round processes each size bucket ``j`` of the data in blocks of
``nd x B_j`` clients (``B_j`` clients per device). The plan fixes every
``B_j`` on the host, once per data layout (bucket sizes, population, number
of pooled runs, model and client-state shapes), before the round is traced;
it never changes while tracing.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from fedjax_lite.data.batching import DeviceData, LocalWork
from fedjax_lite.runtime import device_memory_bytes

PyTree = Any


def tree_bytes(tree) -> int:
  """Bytes of a pytree of arrays or ``ShapeDtypeStruct``."""
  return int(
    sum(
      math.prod(x.shape) * np.dtype(x.dtype).itemsize
      for x in jax.tree.leaves(tree)
    )
  )


def auto_block_size(
  per_client_bytes: int, clients_per_device: int, platform: str
) -> int:
  """Clients per device per block.

  On CPU a block should stay within a core's share of the caches (about
  8 MiB of per-client working memory; measured on mlp100: 2-4 clients per
  block beat 1 by ~10% and 10 lose ~20%): a big model trains a few clients at
  a time per core, a tiny one hundreds. On accelerators blocks use up to 2 GiB.
  """
  target = (8 << 20) if platform == "cpu" else (2 << 30)
  b = int(max(1, min(target // max(1, per_client_bytes), clients_per_device)))
  # Same number of blocks, evenly filled: less padding in the last block.
  num_blocks = math.ceil(clients_per_device / b)
  return int(math.ceil(clients_per_device / num_blocks))


def expected_clients(
  data: DeviceData,
  bucket: int,
  clients_per_round: int,
  sampling: str,
  replace: bool,
) -> float:
  """Expected number of a round's clients that fall in ``bucket``."""
  if data.bucket_clients is None:
    return float(clients_per_round)
  if sampling == "weighted":
    share = data.bucket_examples[bucket] / max(1, sum(data.bucket_examples))
  else:
    share = data.bucket_clients[bucket] / max(1, sum(data.bucket_clients))
  return min(
    float(data.bucket_clients[bucket])
    if not replace
    else float(clients_per_round),
    clients_per_round * share,
  )


@dataclasses.dataclass(frozen=True)
class BlockPlan:
  """Static block layout of a round (hashable; fixed per data layout).

  Attributes:
    bucket_sizes: ``L_j``, the padded client size of every bucket.
    block_sizes: ``B_j``, clients per device per block of every bucket.
    num_devices: ``nd``.
    num_runs: ``R`` pooled runs sharing the blocks.
  """

  bucket_sizes: tuple
  block_sizes: tuple
  num_devices: int
  num_runs: int

  @property
  def as_dict(self) -> dict:
    """``{bucket size: clients per device per block}``."""
    return dict(zip(self.bucket_sizes, self.block_sizes))

  @property
  def pad(self) -> int:
    """Slots appended to the sample so a block never reads out of range."""
    return self.num_devices * max(self.block_sizes)


def make_plan(
  data: DeviceData,
  local_work: LocalWork,
  *,
  clients_per_round: int,
  sampling: str,
  replace: bool,
  block_size: int | None,
  num_devices: int,
  platform: str,
  broadcast_spec: PyTree,
  client_state_spec: PyTree,
  num_runs: int,
) -> BlockPlan:
  """Chooses every bucket's block size (host side, from shapes only).

  Args:
    data: the device data (only its static layout is read).
    local_work: local training (steps and batch per bucket).
    clients_per_round, sampling, replace: the round's sampling.
    block_size: a fixed block size, or None (automatic).
    num_devices, platform: the mesh.
    broadcast_spec: shapes of what one client receives.
    client_state_spec: shapes of ONE client's persistent state, or None.
    num_runs: pooled runs sharing the blocks.
  """
  sizes = []
  lead = 2 if data.sharded else 1  # sharded: [devices, rows, ...]
  per_example = sum(
    math.prod(v.shape[lead:]) * np.dtype(v.dtype).itemsize
    for v in data.features.values()
  )
  one_state = 0 if client_state_spec is None else tree_bytes(client_state_spec)
  for j, bucket_size in enumerate(data.bucket_sizes):
    if block_size is not None:
      sizes.append(int(block_size))
      continue
    steps, b = local_work.plan(bucket_size)
    # params + update + gradient + optimizer state, plus the gathered data.
    per_client = (
      4 * tree_bytes(broadcast_spec) + steps * b * per_example + 2 * one_state
    )
    # A block holds about the bucket's expected share of the round (never
    # the whole round for a rarely sampled bucket: that block would be
    # mostly padding).
    per_device = max(
      1,
      math.ceil(
        num_runs
        * expected_clients(data, j, clients_per_round, sampling, replace)
        / num_devices
      ),
    )
    sizes.append(auto_block_size(per_client, per_device, platform))
  return BlockPlan(
    bucket_sizes=tuple(int(s) for s in data.bucket_sizes),
    block_sizes=tuple(sizes),
    num_devices=int(num_devices),
    num_runs=int(num_runs),
  )


# ------------------------------------------------------------------ memory
def check_materialized_memory(
  name: str,
  *,
  num_slots: int,
  one_update: int,
  num_runs: int,
  num_devices: int,
  device,
  available: int | None = None,
  source: str | None = None,
) -> int:
  """Raises if a materialized aggregator's buffers cannot fit in memory.

  Every device keeps ``num_slots x one_update x num_runs`` bytes; on CPU the
  devices share the host's memory, so their buffers add up.

  Returns:
    The bytes the buffers need in the memory compared against.
  """
  per_device = int(num_slots) * int(one_update) * int(num_runs)
  shared = device.platform == "cpu"
  need = per_device * (num_devices if shared else 1)
  if available is None:
    available, source = device_memory_bytes(device)
  if available is not None and need > available:
    gib = 2.0**30
    where = (
      f"{num_devices} CPU devices sharing {available / gib:.2f} GiB of {source}"
      if shared
      else f"{available / gib:.2f} GiB per {device.platform} device ({source})"
    )
    raise MemoryError(
      f"aggregator {name} keeps every client's update: "
      f"clients_per_round={num_slots} x {one_update} bytes per update x "
      f"{num_runs} run(s) = {per_device / gib:.2f} GiB per device "
      f"({need / gib:.2f} GiB in all) but only {where}. Use fewer clients "
      "per round or runs, a smaller model, or a streaming aggregator "
      "(weighted_mean, clipped(...))."
    )
  return need
