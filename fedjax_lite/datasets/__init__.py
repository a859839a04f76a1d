"""Federated datasets: generators, real data, partitioners and file loaders.

The standard benchmark datasets (``emnist``, ``cifar10``, ``cifar100``,
``stackoverflow``, ``shakespeare(source="tff")``) download once into
``$FEDJAX_LITE_DATA`` (default ``~/.cache/fedjax_lite``), check the
publisher's SHA-256, resume interrupted downloads and take ``search=[folder]``
for files a user already has (:mod:`.download`).
"""

from fedjax_lite.datasets.cifar import (
  center_crop,
  cifar10,
  cifar100,
  per_image_standardization,
  random_crop,
  read_cifar10_binary,
  with_random_crop,
)
from fedjax_lite.datasets.digits import digits, load_digits_arrays
from fedjax_lite.datasets.download import (
  DownloadError,
  RemoteFile,
  cached,
  data_dir,
  extract,
  fetch,
)
from fedjax_lite.datasets.emnist import emnist
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
from fedjax_lite.datasets.stackoverflow import (
  stackoverflow,
  stackoverflow_special_tokens,
  stackoverflow_split,
  stackoverflow_vocab,
)
from fedjax_lite.datasets.synthetic import (
  fedprox_synthetic,
  leaf_synthetic,
  split_train_test,
)
