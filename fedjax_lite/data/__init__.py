"""Federated data: packed datasets, padding plans, sampling, device gathering."""

from fedjax_lite.data.batching import (
  ClientData,
  DeviceData,
  LocalWork,
  choose_buckets,
  gather_client,
  padding_report,
  sample_clients,
  to_device,
)
from fedjax_lite.data.federated_dataset import FederatedDataset
from fedjax_lite.data.sharding import (
  ClientLoader,
  client_rows,
  resident_bytes,
  shard_clients,
  to_device_sharded,
)
