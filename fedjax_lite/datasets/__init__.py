"""Federated datasets: generators, real data, partitioners and file loaders."""

from fedjax_lite.datasets.digits import digits, load_digits_arrays
from fedjax_lite.datasets.loaders import (
  decode_fedjax_blob,
  load_fedjax_sqlite,
  load_leaf_json,
  load_tff_hdf5,
)
from fedjax_lite.datasets.partition import (
  describe,
  dirichlet_partition,
  iid_partition,
  power_law_partition,
  shard_partition,
  train_test_split,
)
from fedjax_lite.datasets.shakespeare import (
  LEAF_VOCAB,
  shakespeare,
  text_to_indices,
)
from fedjax_lite.datasets.synthetic import (
  fedprox_synthetic,
  leaf_synthetic,
  split_train_test,
)
