r"""Federated EMNIST (Caldas et al. 2018, LEAF, arXiv:1812.01097; Cohen et al.
2017, EMNIST), one client per writer, with the publisher's train/test split.

Every writer's examples are split by the publisher into a train part and a
test part (each writer has at least one of each); writers with fewer than two
examples are absent. Sizes (from TFF's ``tff.simulation.datasets.emnist``
docstring):

* ``only_digits=True``: 3,383 writers, 10 classes; 341,873 train and 40,832
  test examples.
* ``only_digits=False``: 3,400 writers, 62 classes (0-9 digits, 10-35
  upper-case ``A``-``Z``, 36-61 lower-case ``a``-``z``); 671,585 train and
  77,483 test examples.

Sources (``source=``):

* ``"tff"`` (default): TensorFlow Federated's HDF5 archives
  ``fed_emnist.tar.bz2`` / ``fed_emnist_digitsonly.tar.bz2``, each holding
  ``<prefix>_train.h5`` and ``<prefix>_test.h5`` with groups
  ``/examples/<writer id>/{pixels, label}`` (``pixels`` float32 ``[n, 28, 28]``
  in ``[0, 1]`` with 1.0 the background, ``label`` integer ``[n]``). Writer
  ids look like ``f0000_14``. The URLs and SHA-256 digests are the ones TFF
  pinned (see :data:`REMOTE_FILES`).
* ``"fedjax"``: FedJAX's SQLite files ``federated_emnist_{train,test}.sqlite``
  (``federated_emnist_digitsonly_*`` for digits): table
  ``federated_data(client_id, data, num_examples)`` with zlib+msgpack blobs of
  ``pixels`` float32 ``[n, 28, 28]`` and ``label`` int32 ``[n]``; client ids
  are ``<16 hex digits>:<writer id>``. FedJAX publishes no checksum for these
  files, so they are not downloaded here: they are read where they are
  (``search`` folders, the cache folder, or FedJAX's own cache
  ``~/.cache/fedjax``) unless :data:`FEDJAX_REMOTE_FILES` holds a
  :class:`RemoteFile` (with a digest) for them.

Preprocessing (FedJAX, ``fedjax/datasets/emnist.py``, ``preprocess_batch``):

.. math:: x = 1 - \text{pixels}[..., \text{newaxis}], \qquad y = \text{label}

so ``x`` is float32 ``[n, 28, 28, 1]`` with 0.0 the background and ``y`` is
int32 in ``[0, 62)`` (``[0, 10)`` with ``only_digits``). FedJAX also adds a
per-writer ``domain_id``; it is not included here.

Other files (tests, mirrors): the loaders read :data:`REMOTE_FILES` and
:data:`FEDJAX_REMOTE_FILES` at call time, so replacing an entry (e.g. with
``monkeypatch.setitem``) points them at another :class:`RemoteFile`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np

from fedjax_lite.data.federated_dataset import FederatedDataset
from fedjax_lite.datasets import download
from fedjax_lite.datasets.download import RemoteFile
from fedjax_lite.datasets.loaders import load_fedjax_sqlite, load_tff_hdf5

SOURCES = ("tff", "fedjax")
NUM_CLASSES = {False: 62, True: 10}

# URLs and SHA-256 digests from TensorFlow Federated,
# tensorflow_federated/python/simulation/datasets/emnist/load_data.py
# (`load_data`, the tf.keras.utils.get_file call with hash_algorithm="sha256").
_TFF_URL = "https://storage.googleapis.com/tff-datasets-public/"
REMOTE_FILES: dict[str, RemoteFile] = {
  "fed_emnist": RemoteFile(
    "fed_emnist.tar.bz2",
    _TFF_URL + "fed_emnist.tar.bz2",
    "fe1ed5a502cea3a952eb105920bff8cffb32836b5173cb18a57a32c3606f3ea0",
  ),
  "fed_emnist_digitsonly": RemoteFile(
    "fed_emnist_digitsonly.tar.bz2",
    _TFF_URL + "fed_emnist_digitsonly.tar.bz2",
    "55333deb8546765427c385710ca5e7301e16f4ed8b60c1dc5ae224b42bd5b14b",
  ),
}
"""TFF's HDF5 archives by prefix (``fed_emnist``, ``fed_emnist_digitsonly``)."""

# URLs from FedJAX, fedjax/datasets/emnist.py (`load_split`); FedJAX's
# fedjax/datasets/downloads.py checks no digest for them.
FEDJAX_URL = "https://storage.googleapis.com/gresearch/fedjax/emnist/"
FEDJAX_REMOTE_FILES: dict[str, RemoteFile] = {}
"""FedJAX SQLite files by file name, for those whose digest is known (none
is published; a user who verified a copy may add one here)."""


def _check_bool(name: str, value) -> bool:
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be True or False, got {value!r}.")
  return bool(value)


def preprocess(where: str, features: dict) -> dict:
  """FedJAX's EMNIST preprocessing of one client's raw features.

  ``{"pixels": [n, 28, 28], "label": [n]}`` ->
  ``{"x": 1 - pixels[..., None] (float32), "y": label (int32)}``.
  """
  missing = [k for k in ("pixels", "label") if k not in features]
  if missing:
    raise ValueError(
      f"{where} has no feature(s) {missing}; expected 'pixels' "
      f"[n, 28, 28] and 'label' [n] (it has {sorted(features)})."
    )
  pixels = np.asarray(features["pixels"], np.float32)
  label = np.asarray(features["label"])
  if pixels.ndim != 3 or pixels.shape[1:] != (28, 28):
    raise ValueError(
      f"{where}: 'pixels' has shape {pixels.shape}; expected [n, 28, 28]."
    )
  if not np.issubdtype(label.dtype, np.integer) or label.shape != (
    pixels.shape[0],
  ):
    raise ValueError(
      f"{where}: 'label' is {label.dtype} {label.shape}; expected integer "
      f"labels of shape ({pixels.shape[0]},)."
    )
  return {
    "x": (np.float32(1.0) - pixels)[..., np.newaxis],
    "y": label.astype(np.int32),
  }


def _check_labels(ds: FederatedDataset, only_digits: bool, source: str):
  y = ds.features["y"]
  k = NUM_CLASSES[only_digits]
  if y.size and (y.min() < 0 or y.max() >= k):
    raise ValueError(
      f"{source} has labels in [{int(y.min())}, {int(y.max())}]; expected "
      f"[0, {k}) for only_digits={only_digits}. Is it the "
      f"{'digits-only' if only_digits else 'full'} file?"
    )
  return ds


def _fedjax_file(
  filename: str, cache: Path, search: list, progress: bool
) -> Path:
  remote = FEDJAX_REMOTE_FILES.get(filename)
  if remote is not None:
    return download.fetch(remote, cache, search=search, progress=progress)
  folders = [
    *download.search_folders(search),
    cache,
    Path("~/.cache/fedjax").expanduser(),
  ]
  for folder in folders:
    if (folder / filename).is_file():
      return folder / filename
  raise FileNotFoundError(
    f"FedJAX's {filename} is not in {[str(f) for f in folders]}. FedJAX "
    "publishes no checksum for it, so it is not downloaded here: download "
    f"{FEDJAX_URL}{filename} by hand and pass search=[<its folder>], or use "
    "source='tff' (pinned SHA-256)."
  )


def emnist(
  only_digits: bool = False,
  *,
  source: str = "tff",
  data_dir: str | os.PathLike | None = None,
  search: Iterable[str | os.PathLike] = (),
  progress: bool = True,
) -> tuple[FederatedDataset, FederatedDataset]:
  """Federated EMNIST with the publisher's writers and train/test split.

  Args:
    only_digits: the 10-class digits-only files instead of the 62-class ones.
    source: ``"tff"`` (TFF's HDF5 archives, downloaded and verified) or
      ``"fedjax"`` (FedJAX's SQLite files, see the module docstring).
    data_dir: the cache folder (default ``$FEDJAX_LITE_DATA`` or
      ``~/.cache/fedjax_lite``; see :func:`fedjax_lite.datasets.download.data_dir`).
    search: folders that may already hold the archive or SQLite files.
    progress: show a download progress bar.

  Returns:
    ``(train, test)`` :class:`FederatedDataset` s; ``x`` float32
    ``[n, 28, 28, 1]`` (``1 - pixels``, 0.0 = background), ``y`` int32;
    ``client_ids`` the writer ids (TFF: sorted ``f0000_14``-style ids;
    FedJAX: its ``<hash>:<writer>`` ids in file order).

  Raises:
    DownloadError: the archive is not cached and there is no network.
    FileNotFoundError: ``source="fedjax"`` and a SQLite file is missing.
    ValueError: an unknown source, or files that do not hold EMNIST.
  """
  only_digits = _check_bool("only_digits", only_digits)
  if source not in SOURCES:
    raise ValueError(f"source must be one of {SOURCES}, got {source!r}.")
  _check_bool("progress", progress)
  cache = download.data_dir(data_dir)
  search = download.search_folders(search)
  if source == "tff":
    prefix = "fed_emnist_digitsonly" if only_digits else "fed_emnist"
    archive = download.fetch(
      REMOTE_FILES[prefix], cache, search=search, progress=progress
    )
    folder = download.extract(archive, cache / prefix)
    paths = [
      download.find_file(folder, f"{prefix}_{split}.h5")
      for split in ("train", "test")
    ]
    load, kind = load_tff_hdf5, "TFF HDF5 file"
  else:
    name = "federated_emnist_digitsonly" if only_digits else "federated_emnist"
    paths = [
      _fedjax_file(f"{name}_{split}.sqlite", cache, search, progress)
      for split in ("train", "test")
    ]
    load, kind = load_fedjax_sqlite, "FedJAX SQLite file"
  where = [f"{kind} '{p}'" for p in paths]
  loaded = [
    load(p, transform=lambda cid, f, w=w: preprocess(f"{w}, client {cid!r}", f))
    for p, w in zip(paths, where)
  ]
  train, test = (
    _check_labels(ds, only_digits, w) for ds, w in zip(loaded, where)
  )
  return train, test
