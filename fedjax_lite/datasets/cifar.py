r"""Federated CIFAR-100 (TFF's client split) and CIFAR-10 (pfl-research's
benchmark partitions), from the publishers' files.

CIFAR-100 (:func:`cifar100`)
  TensorFlow Federated's ``fed_cifar100.tar.bz2`` holds
  ``fed_cifar100_train.h5`` and ``fed_cifar100_test.h5`` with groups
  ``/examples/<client id>/{image, label, coarse_label}`` (``image`` uint8
  ``[100, 32, 32, 3]``, labels integers). 500 train clients (ids ``"0"`` ..
  ``"499"``) and 100 test clients (``"0"`` .. ``"99"``), 100 examples each,
  drawn from CIFAR-100 by a two-level (coarse, then fine label) Latent
  Dirichlet Allocation, Pachinko Allocation, with concentrations 0.1 and 10
  (TFF's ``tff.simulation.datasets.cifar100.load_data`` docstring). This is the
  CIFAR-100 task of Reddi et al. 2021, "Adaptive Federated Optimization"
  (arXiv:2003.00295).

  Preprocessing follows their research code (google-research/federated,
  ``utils/datasets/cifar100_dataset.py``, ``build_image_map``): the image is
  cropped to ``crop x crop`` (24 in the paper) and then standardised per
  image, as ``tf.image.per_image_standardization`` does:

  .. math:: x = \frac{c - \bar c}{\max(\sigma_c, 1/\sqrt{N})}

  where ``c`` is the cropped image as floats in ``[0, 255]``, ``\bar c`` and
  ``\sigma_c`` its mean and (population) standard deviation over all ``N =
  crop * crop * 3`` values. At evaluation the crop is the central one
  (``tf.image.resize_with_crop_or_pad``: offset ``(32 - crop) // 2``); at
  training time their code crops at a uniformly random offset in
  ``[0, 32 - crop]`` per image and flips left-right with probability 1/2
  (``tf.image.random_crop``, ``random_flip_left_right``), before the
  standardisation. Two ways to get it here:

  * ``distort=False`` (default): both splits hold the deterministic version
    (central crop, standardised), ``x`` float32 ``[n, crop, crop, 3]``; their
    code trains this way too when its datasets must be serialisable.
  * ``distort=True``: both splits hold the uncropped pixels, ``x`` float32
    ``[n, 32, 32, 3]`` in ``[0, 255]``, and :func:`with_random_crop` wraps the
    model so that a training call (``train=True`` with an ``rng``) draws a
    random crop and flip per example and an evaluation call takes the central
    crop, standardising both. :func:`random_crop`, :func:`center_crop` and
    :func:`per_image_standardization` are the pieces, usable on numpy or jax
    arrays inside any ``apply``.

CIFAR-10 (:func:`cifar10`)
  The binary release ``cifar-10-binary.tar.gz`` (Krizhevsky 2009) holds
  ``cifar-10-batches-bin/data_batch_{1..5}.bin`` (50,000 training images) and
  ``test_batch.bin`` (10,000): records of 3,073 bytes, one label byte
  (0..9) then 3,072 pixel bytes, channel-major (1,024 red, 1,024 green, 1,024
  blue, each 32 rows of 32). Images are transposed to ``[32, 32, 3]``.
  Clients follow pfl-research's CIFAR-10 benchmark (``benchmarks/dataset/
  cifar10/numpy.py``, ``benchmarks/image_classification/configs/
  baseline.yaml``: 50 images per user, so 1,000 users; ``partition_alpha``
  0.1):

  * ``partition="iid"``: a random permutation cut into ``num_clients``
    near-equal parts (:func:`fedjax_lite.datasets.iid_partition`; sizes
    ``50000 // num_clients`` or one more, every image used; pfl gives every
    user exactly the constant size, the last one the remainder).
  * ``partition="dirichlet"``: pfl's ``partition_by_dirichlet_class_
    distribution`` (Hsu et al. 2019, arXiv:1909.06335): every client ``k``
    draws class shares ``q_k ~ Dir(alpha 1_10)`` and then fills its
    ``s = 50000 // num_clients`` examples one at a time: a class ``c ~ q_k``
    is drawn and, if images of ``c`` remain, one of them (from a random
    permutation of the data) is taken; after every ``20 s`` draws
    ``q_k <- (q_k + 0.02) / sum(q_k + 0.02)`` so the last clients can fill up.
    This is not :func:`fedjax_lite.datasets.dirichlet_partition` (which splits
    every class over clients with ``Dir(alpha)`` shares and gives unequal
    client sizes). Differences from pfl: the random stream is
    ``numpy.random.default_rng(seed)`` (pfl draws from numpy's global state);
    the cumulative distribution's last entry is set to 1 after every
    re-spread (pfl sets the last *share* to 1 there, which inflates the last
    class in later re-spreads); exactly ``num_clients`` clients are made
    (pfl makes users until fewer than ``s`` images remain, which can be a
    few more).

  Pixels are normalised per channel as pfl does: ``x = (p - m_c) / s_c``
  with ``p`` in ``[0, 255]`` and ``m_c``, ``s_c`` the mean and population
  standard deviation of channel ``c`` over the 50,000 training images
  (also applied to the test images). pfl reshapes the python release's
  channel-major rows straight into ``[32, 32, 3]`` without transposing them,
  which scrambles the channels and pixels; here the images are proper
  ``[height, width, channel]`` arrays. The test set is one central client
  ``"test"`` (pfl's benchmark evaluates centrally), or with
  ``central_test=False`` it is partitioned like the training set into
  ``10000 // s`` clients (pfl's federated validation set).

  The client assignment is cached with :func:`fedjax_lite.datasets.download.
  cached` (keyed by the archive digest and the arguments).

Other files (tests, mirrors): the loaders read :data:`REMOTE_FILES` at call
time, so replacing an entry (e.g. with ``monkeypatch.setitem``) points them at
another :class:`RemoteFile`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Iterable

import numpy as np

from fedjax_lite import checks
from fedjax_lite.data.federated_dataset import FederatedDataset
from fedjax_lite.datasets import download
from fedjax_lite.datasets import partition as _partition
from fedjax_lite.datasets.download import RemoteFile
from fedjax_lite.datasets.loaders import load_tff_hdf5

# fed_cifar100: URL and SHA-256 from TensorFlow Federated,
# tensorflow_federated/python/simulation/datasets/cifar100.py (`load_data`,
# the tf.keras.utils.get_file call with hash_algorithm="sha256").
# cifar-10-binary: URL, size and SHA-256 from tensorflow-datasets,
# tensorflow_datasets/url_checksums/cifar10.txt.
REMOTE_FILES: dict[str, RemoteFile] = {
  "fed_cifar100": RemoteFile(
    "fed_cifar100.tar.bz2",
    "https://storage.googleapis.com/tff-datasets-public/fed_cifar100.tar.bz2",
    "e8575e22c038ecef1ce6c7d492d7abee7da13b1e1ba9b70a7fc18531ba7590de",
  ),
  "cifar-10-binary": RemoteFile(
    "cifar-10-binary.tar.gz",
    "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
    "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
    170052171,
  ),
}
"""The archives by name (``fed_cifar100``, ``cifar-10-binary``)."""

PARTITIONS = ("iid", "dirichlet")
IMAGE_SIZE = 32
_RECORD = 1 + 3 * IMAGE_SIZE * IMAGE_SIZE
_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
_TEST_FILE = "test_batch.bin"
_PARTITION_VERSION = 1


# ------------------------------------------------- image transformations
def _is_numpy(a) -> bool:
  return isinstance(a, (np.ndarray, np.generic))


def _check_crop(crop, size: int = IMAGE_SIZE) -> int:
  if not checks.is_int(crop) or not 1 <= crop <= size:
    raise ValueError(f"crop must be an int in [1, {size}], got {crop!r}.")
  return int(crop)


def center_crop(images, crop: int = 24):
  """The central ``crop x crop`` window of ``[..., H, W, C]`` images (offset
  ``(H - crop) // 2``, as ``tf.image.resize_with_crop_or_pad`` crops)."""
  h, w = images.shape[-3], images.shape[-2]
  crop = _check_crop(crop, min(h, w))
  top, left = (h - crop) // 2, (w - crop) // 2
  return images[..., top : top + crop, left : left + crop, :]


def per_image_standardization(images):
  r"""``(c - mean) / max(std, 1 / sqrt(N))`` over each image's ``N = H W C``
  values, as ``tf.image.per_image_standardization``; ``[..., H, W, C]`` ->
  float32 of the same shape (numpy in, numpy out; jax in, jax out)."""
  if _is_numpy(images):
    xp, x = np, np.asarray(images, np.float64)
  else:
    import jax.numpy as xp  # pylint: disable=g-import-not-at-top

    x = xp.asarray(images, xp.float32)
  n = x.shape[-3] * x.shape[-2] * x.shape[-1]
  mean = x.mean(axis=(-3, -2, -1), keepdims=True)
  std = x.std(axis=(-3, -2, -1), keepdims=True)
  out = (x - mean) / xp.maximum(std, 1.0 / math.sqrt(n))
  return out.astype(xp.float32)


def random_crop(rng, images, crop: int = 24, *, flip: bool = True):
  """Random ``crop x crop`` windows of ``[..., H, W, C]`` images (jax).

  Each image gets its own offset, uniform in ``[0, H - crop] x [0, W -
  crop]`` (``tf.image.random_crop``), and with ``flip`` is mirrored
  left-right with probability 1/2 (``tf.image.random_flip_left_right``).
  Jittable; returns float32 ``[..., crop, crop, C]`` (not standardised).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  images = jnp.asarray(images, jnp.float32)
  if images.ndim < 3:
    raise ValueError(
      f"images have shape {images.shape}; expected [..., height, width, "
      "channels]."
    )
  h, w, c = images.shape[-3:]
  crop = _check_crop(crop, min(h, w))
  lead = images.shape[:-3]
  flat = images.reshape((-1, h, w, c))
  k_y, k_x, k_f = jax.random.split(rng, 3)
  n = flat.shape[0]
  top = jax.random.randint(k_y, (n,), 0, h - crop + 1)
  left = jax.random.randint(k_x, (n,), 0, w - crop + 1)
  mirror = jax.random.bernoulli(k_f, 0.5, (n,)) & flip

  def one(img, t, l, m):
    out = jax.lax.dynamic_slice(img, (t, l, 0), (crop, crop, c))
    return jnp.where(m, out[:, ::-1, :], out)

  out = jax.vmap(one)(flat, top, left, mirror)
  return out.reshape(lead + (crop, crop, c))


def with_random_crop(model, crop: int = 24, *, flip: bool = True):
  """Wraps a :class:`fedjax_lite.models.Model` for ``cifar100(distort=True)``.

  Its inputs (``model.input_key``, float ``[b, 32, 32, 3]`` pixels) become
  ``per_image_standardization(random_crop(rng, x, crop, flip=flip))`` in a
  training call with an rng, and ``per_image_standardization(center_crop(x,
  crop))`` otherwise (evaluation); the model itself then sees ``[b, crop,
  crop, 3]``. Build the model with a ``[1, crop, crop, 3]`` sample input.
  """
  crop = _check_crop(crop)
  if not callable(getattr(model, "apply", None)):
    raise TypeError(
      f"model must be a fedjax_lite Model (with apply), got "
      f"{type(model).__name__}."
    )
  import jax  # pylint: disable=g-import-not-at-top

  inner = model.apply
  key = model.input_key

  def apply(params, batch, rng=None, train=False):
    x = batch[key]
    if train and rng is not None:
      crop_rng, rng = jax.random.split(rng)
      x = random_crop(crop_rng, x, crop, flip=flip)
    else:
      x = center_crop(x, crop)
    return inner(
      params, {**batch, key: per_image_standardization(x)}, rng, train
    )

  return dataclasses.replace(model, apply=apply)


# ------------------------------------------------------------ CIFAR-100
def _cifar100_transform(where: str, crop: int, distort: bool):
  def transform(cid, feats):
    missing = [k for k in ("image", "label") if k not in feats]
    if missing:
      raise ValueError(
        f"{where}, client {cid!r} has no feature(s) {missing}; expected "
        f"'image' [n, 32, 32, 3] uint8 and 'label' [n] (it has "
        f"{sorted(feats)})."
      )
    image = np.asarray(feats["image"])
    label = np.asarray(feats["label"])
    if image.ndim != 4 or image.shape[1:] != (32, 32, 3):
      raise ValueError(
        f"{where}, client {cid!r}: 'image' has shape {image.shape}; "
        "expected [n, 32, 32, 3]."
      )
    if not np.issubdtype(label.dtype, np.integer) or label.shape != (
      image.shape[0],
    ):
      raise ValueError(
        f"{where}, client {cid!r}: 'label' is {label.dtype} {label.shape}; "
        f"expected integer labels of shape ({image.shape[0]},)."
      )
    if distort:
      x = image.astype(np.float32)
    else:
      x = per_image_standardization(center_crop(image, crop))
    return {"x": x, "y": label.astype(np.int32)}

  return transform


def cifar100(
  *,
  data_dir: str | os.PathLike | None = None,
  search: Iterable[str | os.PathLike] = (),
  progress: bool = True,
  crop: int = 24,
  distort: bool = False,
) -> tuple[FederatedDataset, FederatedDataset]:
  """TFF's federated CIFAR-100 (500 train, 100 test clients of 100 images).

  Args:
    data_dir: the cache folder (see :func:`fedjax_lite.datasets.download.
      data_dir`).
    search: folders that may already hold ``fed_cifar100.tar.bz2``.
    progress: show a download progress bar.
    crop: the crop size, 1..32 (24 in Reddi et al. 2021; 32 = no crop).
    distort: keep uncropped pixels for random crops at training time (see
      the module docstring and :func:`with_random_crop`).

  Returns:
    ``(train, test)``; ``x`` float32 ``[n, crop, crop, 3]`` (central crop,
    per-image standardised) or, with ``distort``, ``[n, 32, 32, 3]`` pixels in
    ``[0, 255]``; ``y`` int32 fine labels in ``[0, 100)``; ``client_ids``
    TFF's (sorted as strings).
  """
  crop = _check_crop(crop)
  if not isinstance(distort, (bool, np.bool_)):
    raise TypeError(f"distort must be True or False, got {distort!r}.")
  cache = download.data_dir(data_dir)
  archive = download.fetch(
    REMOTE_FILES["fed_cifar100"], cache, search=search, progress=progress
  )
  folder = download.extract(archive, cache / "fed_cifar100")
  out = []
  for split in ("train", "test"):
    path = download.find_file(folder, f"fed_cifar100_{split}.h5")
    ds = load_tff_hdf5(
      path,
      transform=_cifar100_transform(
        f"TFF HDF5 file '{path}'", crop, bool(distort)
      ),
    )
    y = ds.features["y"]
    if y.min() < 0 or y.max() >= 100:
      raise ValueError(
        f"TFF HDF5 file '{path}' has labels in [{int(y.min())}, "
        f"{int(y.max())}]; expected CIFAR-100's [0, 100)."
      )
    out.append(ds)
  return out[0], out[1]


# ------------------------------------------------------------- CIFAR-10
def read_cifar10_binary(path) -> tuple[np.ndarray, np.ndarray]:
  """One CIFAR-10 binary batch: ``(images uint8 [n, 32, 32, 3], labels int32
  [n])`` from records of 1 label byte + 3,072 channel-major pixel bytes."""
  raw = np.fromfile(path, dtype=np.uint8)
  if raw.size == 0 or raw.size % _RECORD:
    raise ValueError(
      f"CIFAR-10 binary file '{path}' has {raw.size} bytes; expected a "
      f"positive multiple of {_RECORD} (1 label byte + 3072 pixel bytes "
      "per image)."
    )
  rec = raw.reshape(-1, _RECORD)
  labels = rec[:, 0].astype(np.int32)
  if labels.max() > 9:
    raise ValueError(
      f"CIFAR-10 binary file '{path}' has label {int(labels.max())}; "
      "expected 0..9 (is it the CIFAR-100 binary release?)."
    )
  images = rec[:, 1:].reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE)
  return np.ascontiguousarray(images.transpose(0, 2, 3, 1)), labels


def _channel_moments(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and population standard deviation of uint8 images
  ``[n, H, W, C]``, exact (from 256-bin histograms), as float32 ``[C]``."""
  values = np.arange(256, dtype=np.float64)
  mean, std = [], []
  for c in range(images.shape[-1]):
    hist = np.bincount(images[..., c].ravel(), minlength=256).astype(np.float64)
    m = (hist @ values) / hist.sum()
    mean.append(m)
    std.append(math.sqrt((hist @ (values - m) ** 2) / hist.sum()))
  return np.asarray(mean, np.float32), np.asarray(std, np.float32)


def _pfl_dirichlet(
  labels: np.ndarray,
  num_clients: int,
  size: int,
  alpha: float,
  rng: np.random.Generator,
) -> list[np.ndarray]:
  """pfl-research's per-user Dirichlet class sampling (see the module
  docstring): ``num_clients`` index arrays of ``size`` examples each."""
  num_classes = int(labels.max()) + 1
  order = rng.permutation(labels.size)
  pools = [list(order[labels[order] == c]) for c in range(num_classes)]
  spread_every = size * 20
  clients = []
  for _ in range(num_clients):
    prior = rng.dirichlet(np.full(num_classes, float(alpha)))
    if not np.all(np.isfinite(prior)) or prior.sum() <= 0:
      prior = np.eye(num_classes)[rng.integers(num_classes)]
    cdf = np.cumsum(prior)
    cdf[-1] = 1.0
    taken: list[int] = []
    draws = 1
    while len(taken) < size:
      c = int(np.searchsorted(cdf, rng.random(), side="right"))
      if pools[c]:
        taken.append(pools[c].pop())
      if draws % spread_every == 0:
        prior = prior + 0.02
        prior /= prior.sum()
        cdf = np.cumsum(prior)
        cdf[-1] = 1.0
      draws += 1
    clients.append(np.asarray(taken, np.int64))
  return clients


def _split(labels, num_clients, size, partition, alpha, seed):
  """Index arrays of ``num_clients`` clients of one split."""
  if partition == "iid":
    ds = _partition.iid_partition(
      {"i": np.arange(labels.size)}, num_clients, seed=seed
    )
    order, counts = ds.features["i"].astype(np.int64), ds.counts
    return np.split(order, np.cumsum(counts)[:-1])
  return _pfl_dirichlet(
    labels, num_clients, size, alpha, np.random.default_rng(seed)
  )


def _packed(parts) -> dict:
  return {
    "order": np.concatenate(parts).astype(np.int64),
    "counts": np.asarray([p.size for p in parts], np.int64),
  }


def cifar10(
  num_clients: int = 1000,
  partition: str = "iid",
  alpha: float = 0.1,
  seed: int = 0,
  *,
  data_dir: str | os.PathLike | None = None,
  search: Iterable[str | os.PathLike] = (),
  progress: bool = True,
  central_test: bool = True,
) -> tuple[FederatedDataset, FederatedDataset]:
  """CIFAR-10 partitioned as pfl-research's benchmark partitions it.

  Args:
    num_clients: training clients (1000 = pfl's 50 images per user).
    partition: ``"iid"`` or ``"dirichlet"`` (pfl's per-user ``Dir(alpha)``
      class shares; see the module docstring).
    alpha: the Dirichlet concentration (``"dirichlet"`` only; pfl's 0.1).
    seed: seeds the partition.
    data_dir: the cache folder (see :func:`fedjax_lite.datasets.download.
      data_dir`).
    search: folders that may already hold ``cifar-10-binary.tar.gz``.
    progress: show a download progress bar.
    central_test: one test client ``"test"`` with all 10,000 test images
      (default), or the test images partitioned like the training images
      into ``10000 // (50000 // num_clients)`` clients.

  Returns:
    ``(train, test)``; ``x`` float32 ``[n, 32, 32, 3]`` normalised per
    channel with the training set's mean and standard deviation, ``y`` int32
    in ``[0, 10)``; ``client_ids`` ``"0"``, ``"1"``, ...
  """
  checks.positive_int("num_clients", num_clients)
  if partition not in PARTITIONS:
    raise ValueError(
      f"partition must be one of {PARTITIONS}, got {partition!r}."
    )
  a = checks.as_real(alpha)
  if a is None or not math.isfinite(a) or a <= 0:
    raise ValueError(f"alpha must be a positive finite number, got {alpha!r}.")
  checks.int_at_least("seed", seed, 0)
  if not isinstance(central_test, (bool, np.bool_)):
    raise TypeError(
      f"central_test must be True or False, got {central_test!r}."
    )
  remote = REMOTE_FILES["cifar-10-binary"]
  cache = download.data_dir(data_dir)
  archive = download.fetch(remote, cache, search=search, progress=progress)
  folder = download.extract(archive, cache / "cifar-10-binary")
  batches = [
    read_cifar10_binary(download.find_file(folder, f)) for f in _TRAIN_FILES
  ]
  train_x = np.concatenate([b[0] for b in batches])
  train_y = np.concatenate([b[1] for b in batches])
  test_x, test_y = read_cifar10_binary(download.find_file(folder, _TEST_FILE))
  n = train_y.size
  if num_clients > n:
    raise ValueError(
      f"num_clients must be at most the {n} training images, got {num_clients}."
    )
  size = n // num_clients
  num_test = max(1, test_y.size // size)

  def build():
    train = _split(train_y, num_clients, size, partition, a, seed)
    out = {f"train_{k}": v for k, v in _packed(train).items()}
    if not central_test:
      test = _split(test_y, num_test, size, partition, a, seed + 1)
      out.update({f"test_{k}": v for k, v in _packed(test).items()})
    return out

  params = {
    "archive_sha256": remote.sha256,
    "num_clients": int(num_clients),
    "partition": partition,
    "alpha": a if partition == "dirichlet" else None,
    "seed": int(seed),
    "central_test": bool(central_test),
    "version": _PARTITION_VERSION,
  }
  parts = download.cached("cifar10_partition", params, build, cache)

  mean, std = _channel_moments(train_x)

  def normalise(x):
    return (x.astype(np.float32) - mean) / std

  def pack(x, y, order, counts):
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return FederatedDataset(
      {"x": normalise(x[order]), "y": y[order]},
      offsets,
      counts,
      tuple(str(k) for k in range(counts.size)),
    )

  train = pack(train_x, train_y, parts["train_order"], parts["train_counts"])
  if central_test:
    test = FederatedDataset(
      {"x": normalise(test_x), "y": test_y}, [0], [test_y.size], ("test",)
    )
  else:
    test = pack(test_x, test_y, parts["test_order"], parts["test_counts"])
  return train, test
