"""scikit-learn's bundled handwritten digits (8x8), partitioned into clients.

The UCI optical-recognition digits (1797 images, 10 classes, pixel values
0..16; Alpaydin & Kaynak 1998) ship inside scikit-learn, so this real image
dataset needs no download. Images are scaled to ``[0, 1]`` and shaped
``[8, 8, 1]`` (channels last, for the CNN) and split into clients by one of the
partitioners of :mod:`fedjax_lite.datasets.partition`, then every client's
examples are split into train and test.
"""

from __future__ import annotations

import numpy as np

from fedjax_lite._optional import require
from fedjax_lite.data.federated_dataset import FederatedDataset
from fedjax_lite.datasets import partition as _partition

PARTITIONS = ("iid", "dirichlet", "shards", "power_law")


def load_digits_arrays() -> dict:
  """Centralised digits: ``x`` float32 ``[1797, 8, 8, 1]`` in [0, 1], ``y``."""
  sklearn_datasets = require("sklearn.datasets", "data")
  bunch = sklearn_datasets.load_digits()
  x = (np.asarray(bunch.images, np.float32) / 16.0)[..., None]
  return {"x": x, "y": np.asarray(bunch.target, np.int32)}


def digits(
  num_clients: int = 20,
  partition: str = "dirichlet",
  *,
  alpha: float = 0.5,
  shards_per_client: int = 2,
  exponent: float = 1.0,
  test_fraction: float = 0.2,
  seed: int = 0,
) -> tuple[FederatedDataset, FederatedDataset]:
  """Federated 8x8 digits.

  Args:
    num_clients: number of clients.
    partition: ``"iid"``, ``"dirichlet"`` (label skew, ``alpha``),
      ``"shards"`` (``shards_per_client`` label shards per client) or
      ``"power_law"`` (quantity skew, ``exponent``).
    alpha, shards_per_client, exponent: partition parameters.
    test_fraction: per-client share of examples held out for testing.
    seed: seeds the partition and the per-client split.

  Returns:
    ``(train, test)`` with the same clients; ``x`` float32 ``[n, 8, 8, 1]``,
    ``y`` int32 in ``[0, 10)``.
  """
  data = load_digits_arrays()
  if partition == "iid":
    ds = _partition.iid_partition(data, num_clients, seed=seed)
  elif partition == "dirichlet":
    ds = _partition.dirichlet_partition(
      data, num_clients, alpha, min_examples=2, seed=seed
    )
  elif partition == "shards":
    ds = _partition.shard_partition(
      data, num_clients, shards_per_client, seed=seed
    )
  elif partition == "power_law":
    ds = _partition.power_law_partition(
      data, num_clients, exponent, min_examples=2, seed=seed
    )
  else:
    raise ValueError(
      f"partition must be one of {PARTITIONS}, got {partition!r}."
    )
  return _partition.train_test_split(ds, test_fraction, seed=seed + 1)
