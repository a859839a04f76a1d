"""Data placement: a federated dataset onto a mesh's devices.

``"replicated"``: every device holds every client (small populations);
``"sharded"``: each device holds ~1/nd of the clients and trains the sampled
clients it holds (see :mod:`fedjax_lite.data.sharding`). The engine takes
the placed :class:`~fedjax_lite.data.DeviceData` (``Engine.put_data`` calls
:func:`put_data` with its mesh and local work).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedjax_lite import checks
from fedjax_lite.data.batching import DeviceData, LocalWork, to_device
from fedjax_lite.data.federated_dataset import FederatedDataset
from fedjax_lite.data.sharding import (
  ClientLoader,
  check_data_memory,
  to_device_sharded,
)

PLACEMENTS = ("replicated", "sharded")


def put_replicated(
  dataset: FederatedDataset,
  local_work: LocalWork,
  mesh: Mesh,
  buckets: int | str | Sequence[int] = "auto",
) -> DeviceData:
  """Every device of ``mesh`` holds every client (after a memory check)."""
  checks.instance_of("dataset", dataset, FederatedDataset)
  local = [
    d
    for d in mesh.devices.reshape(-1)
    if d.process_index == jax.process_index()
  ]
  check_data_memory(
    [dataset.num_examples + int(dataset.counts.max())] * len(local),
    sum(v[:1].nbytes for v in dataset.features.values()),
    local,
    what=f"replicated data ({dataset.num_clients} clients, "
    f"{dataset.num_examples} examples on each of {len(local)} devices)",
  )
  return to_device(
    dataset, local_work, buckets, sharding=NamedSharding(mesh, P())
  )


def put_data(
  dataset: FederatedDataset | ClientLoader,
  local_work: LocalWork,
  mesh: Mesh,
  buckets: int | str | Sequence[int] = "auto",
  *,
  model: Any = None,
  placement: str = "replicated",
  axis: str = "clients",
) -> DeviceData:
  """Uploads a dataset to the devices of ``mesh``.

  Args:
    dataset: the packed federated dataset (or, with
      ``placement="sharded"``, a :class:`~fedjax_lite.data.ClientLoader`
      that reads clients' examples on demand).
    local_work: local training (decides the padding plan).
    mesh: the devices; sharded data is split over its ``axis``.
    buckets: size buckets (``"auto"``, a maximum count, or explicit limits).
    model: if given, its input and label features are checked (present,
      integer class labels in range) before upload.
    placement: ``"replicated"`` or ``"sharded"`` (see the module docstring);
      results equal replicated data up to float summation order.
    axis: the mesh axis of the clients.

  Raises:
    MemoryError: the data cannot fit in the devices' memory (the message
      says how much it needs).
  """
  if placement not in PLACEMENTS:
    raise ValueError(
      f"placement must be one of {PLACEMENTS}, got {placement!r}."
    )
  if isinstance(dataset, ClientLoader) and placement != "sharded":
    raise TypeError(
      "a ClientLoader reads clients on demand for placement='sharded'; "
      "pack a FederatedDataset for replicated data."
    )
  if model is not None and isinstance(dataset, FederatedDataset):
    checks.model_features(model, dataset.features, "dataset")
  if placement == "sharded":
    return to_device_sharded(dataset, local_work, mesh, buckets, axis=axis)
  return put_replicated(dataset, local_work, mesh, buckets)
