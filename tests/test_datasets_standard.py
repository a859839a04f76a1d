"""emnist / cifar100 / cifar10 on small files written here in each publisher's
exact format, with the publishers' preprocessing re-implemented in numpy.

* TFF HDF5 archives: ``<prefix>.tar.bz2`` holding ``<prefix>_train.h5`` and
  ``<prefix>_test.h5`` at the top (TFF's ``tf.keras.utils.get_file(...,
  extract=True)`` reads them next to the archive), groups
  ``/examples/<client>/<feature>``.
* FedJAX SQLite: ``federated_data(client_id, data, num_examples)`` with
  zlib(msgpack) blobs (the encoder of tests/test_loaders.py).
* CIFAR-10 binary: ``cifar-10-batches-bin/{data_batch_1..5,test_batch}.bin``
  in a ``.tar.gz``, records of 1 label byte + 3072 channel-major pixels.

The archives reach the loaders through ``fetch``: from a ``search`` folder, or
downloaded from a ``file://`` URL into the cache. Nothing touches the
internet.
"""

import hashlib
import io
import math
import tarfile
import zlib

import h5py
import jax
import numpy as np
import pytest

import fedjax_lite as fl
from fedjax_lite.datasets import cifar, download
from fedjax_lite.datasets.download import RemoteFile
from fedjax_lite.datasets.emnist import (
  FEDJAX_REMOTE_FILES,
  REMOTE_FILES,
  emnist,
)
from test_loaders import fedjax_pack, write_sqlite

NOWHERE = "http://127.0.0.1:9/unreachable"


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
  """No real cache folder (``~/.cache/fedjax``, ``$FEDJAX_LITE_DATA``)."""
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.delenv("FEDJAX_LITE_DATA", raising=False)
  monkeypatch.delenv("XDG_CACHE_HOME", raising=False)


def sha256(path):
  return hashlib.sha256(path.read_bytes()).hexdigest()


def write_h5(path, clients):
  with h5py.File(path, "w") as f:
    ex = f.create_group("examples")
    for cid, feats in clients.items():
      g = ex.create_group(cid)
      for name, arr in feats.items():
        g.create_dataset(name, data=arr)
  return path


def tar_files(archive, files, mode):
  with tarfile.open(archive, mode) as tar:
    for arcname, path in files.items():
      tar.add(path, arcname=arcname)
  return archive


def tff_archive(folder, prefix, train, test):
  """``<prefix>.tar.bz2`` as TFF publishes it: the two .h5 at the top."""
  work = folder / "work"
  work.mkdir(exist_ok=True)
  files = {
    f"{prefix}_{split}.h5": write_h5(work / f"{prefix}_{split}.h5", clients)
    for split, clients in (("train", train), ("test", test))
  }
  return tar_files(folder / f"{prefix}.tar.bz2", files, "w:bz2")


# ------------------------------------------------------------------ EMNIST
def emnist_clients(rng, ids, sizes, num_classes):
  return {
    cid: {
      "label": rng.integers(0, num_classes, n).astype(np.int32),
      "pixels": rng.random((n, 28, 28)).astype(np.float32),
    }
    for cid, n in zip(ids, sizes)
  }


def fedjax_emnist_reference(clients):
  """fedjax/datasets/emnist.py preprocess_batch: x = 1 - pixels[..., None]."""
  return {
    cid: {
      "x": (1.0 - c["pixels"].astype(np.float64))[..., None],
      "y": c["label"],
    }
    for cid, c in clients.items()
  }


def assert_dataset(ds, expected):
  assert ds.client_ids == tuple(expected)
  for k, cid in enumerate(expected):
    got = ds.client(k)
    assert sorted(got) == ["x", "y"]
    assert got["x"].dtype == np.float32 and got["y"].dtype == np.int32
    assert got["x"].shape == expected[cid]["x"].shape
    np.testing.assert_allclose(got["x"], expected[cid]["x"], atol=1e-6)
    np.testing.assert_array_equal(got["y"], expected[cid]["y"])


@pytest.mark.parametrize("only_digits", [False, True])
def test_emnist_tff_archive(tmp_path, rng, monkeypatch, only_digits):
  prefix = "fed_emnist_digitsonly" if only_digits else "fed_emnist"
  ids = ["f0002_17", "f0000_03", "f0001_41"]
  k = 10 if only_digits else 62
  train = emnist_clients(rng, ids, (3, 2, 4), k)
  test = emnist_clients(rng, ids, (1, 2, 1), k)
  downloads = tmp_path / "downloads"
  downloads.mkdir()
  archive = tff_archive(downloads, prefix, train, test)
  monkeypatch.setitem(
    REMOTE_FILES,
    prefix,
    RemoteFile(archive.name, NOWHERE, sha256(archive)),
  )
  cache = tmp_path / "cache"
  got_train, got_test = emnist(
    only_digits, data_dir=cache, search=[downloads], progress=False
  )
  order = sorted(ids)  # TFF lists clients in sorted order
  ref_train, ref_test = map(fedjax_emnist_reference, (train, test))
  assert_dataset(got_train, {c: ref_train[c] for c in order})
  assert_dataset(got_test, {c: ref_test[c] for c in order})
  assert got_train.features["x"].shape == (9, 28, 28, 1)
  assert (cache / prefix / f"{prefix}_train.h5").is_file()  # extracted once
  assert not (cache / archive.name).exists()  # read in the search folder


def test_emnist_tff_wrong_labels_and_features(tmp_path, rng, monkeypatch):
  train = emnist_clients(rng, ["f0000_00"], (3,), 62)
  train["f0000_00"]["label"][0] = 40
  test = emnist_clients(rng, ["f0000_00"], (1,), 10)
  archive = tff_archive(tmp_path, "fed_emnist_digitsonly", train, test)
  monkeypatch.setitem(
    REMOTE_FILES,
    "fed_emnist_digitsonly",
    RemoteFile(archive.name, NOWHERE, sha256(archive)),
  )
  with pytest.raises(
    ValueError, match=r"labels in \[\d+, 40\]; expected \[0, 10\)"
  ):
    emnist(True, data_dir=tmp_path / "c", search=tmp_path)
  bad = {"f0000_00": {"image": np.zeros((2, 28, 28), np.float32)}}
  (tmp_path / "bad").mkdir()
  archive = tff_archive(tmp_path / "bad", "fed_emnist", bad, bad)
  monkeypatch.setitem(
    REMOTE_FILES,
    "fed_emnist",
    RemoteFile(archive.name, NOWHERE, sha256(archive)),
  )
  with pytest.raises(
    ValueError, match=r"no feature\(s\) \['pixels', 'label'\]"
  ):
    emnist(data_dir=tmp_path / "c2", search=tmp_path / "bad")


def fedjax_sqlite(path, clients):
  rows = [
    (cid.encode(), zlib.compress(fedjax_pack(feats)), len(feats["label"]))
    for cid, feats in clients.items()
  ]
  return write_sqlite(path, rows)


def test_emnist_fedjax_sqlite(tmp_path, rng, monkeypatch):
  ids = ["0f1e2d3c4b5a6978:f0003_12", "00aa11bb22cc33dd:f0001_07"]
  train = emnist_clients(rng, ids, (2, 3), 62)
  test = emnist_clients(rng, ids, (1, 1), 62)
  folder = tmp_path / "fedjax"
  folder.mkdir()
  fedjax_sqlite(folder / "federated_emnist_train.sqlite", train)
  fedjax_sqlite(folder / "federated_emnist_test.sqlite", test)
  got_train, got_test = emnist(
    source="fedjax", data_dir=tmp_path / "cache", search=[folder]
  )
  assert_dataset(got_train, fedjax_emnist_reference(train))  # file order
  assert_dataset(got_test, fedjax_emnist_reference(test))
  # With a pinned RemoteFile the files are downloaded (here from file://).
  for split in ("train", "test"):
    name = f"federated_emnist_{split}.sqlite"
    p = folder / name
    monkeypatch.setitem(
      FEDJAX_REMOTE_FILES,
      name,
      RemoteFile(name, p.as_uri(), sha256(p)),
    )
  cache = tmp_path / "cache2"
  got_train, _ = emnist(source="fedjax", data_dir=cache, progress=False)
  assert (cache / "federated_emnist_train.sqlite").is_file()
  assert_dataset(got_train, fedjax_emnist_reference(train))
  with pytest.raises(FileNotFoundError, match="publishes no checksum"):
    emnist(True, source="fedjax", data_dir=cache)


def test_emnist_checks_arguments(tmp_path):
  with pytest.raises(ValueError, match="source must be one of"):
    emnist(source="leaf", data_dir=tmp_path)
  with pytest.raises(TypeError, match="only_digits must be True or False"):
    emnist("yes", data_dir=tmp_path)


# --------------------------------------------------------------- CIFAR-100
def tf_center_crop_standardize(image, crop):
  """tf.image.resize_with_crop_or_pad + per_image_standardization."""
  top = (32 - crop) // 2
  c = image[:, top : top + crop, top : top + crop, :].astype(np.float64)
  n = crop * crop * 3
  out = np.empty_like(c)
  for i in range(c.shape[0]):
    mean = c[i].mean()
    std = math.sqrt(((c[i] - mean) ** 2).mean())
    out[i] = (c[i] - mean) / max(std, 1.0 / math.sqrt(n))
  return out


def cifar100_clients(rng, ids, n):
  return {
    cid: {
      "coarse_label": rng.integers(0, 20, n).astype(np.int64),
      "image": rng.integers(0, 256, (n, 32, 32, 3)).astype(np.uint8),
      "label": rng.integers(0, 100, n).astype(np.int64),
    }
    for cid in ids
  }


@pytest.fixture
def cifar100_files(tmp_path, rng, monkeypatch):
  train = cifar100_clients(rng, ["0", "1", "10", "2"], 3)
  train["1"]["image"][0] = 77  # a constant image: std 0 -> 1/sqrt(N)
  test = cifar100_clients(rng, ["0", "1"], 2)
  downloads = tmp_path / "downloads"
  downloads.mkdir()
  archive = tff_archive(downloads, "fed_cifar100", train, test)
  monkeypatch.setitem(
    cifar.REMOTE_FILES,
    "fed_cifar100",
    RemoteFile(archive.name, NOWHERE, sha256(archive)),
  )
  return downloads, train, test


@pytest.mark.parametrize("crop", [24, 32])
def test_cifar100_central_crop_standardized(tmp_path, cifar100_files, crop):
  downloads, train, test = cifar100_files
  got_train, got_test = cifar.cifar100(
    data_dir=tmp_path / "cache", search=[downloads], progress=False, crop=crop
  )
  for got, raw in ((got_train, train), (got_test, test)):
    expected = {
      cid: {
        "x": tf_center_crop_standardize(raw[cid]["image"], crop),
        "y": raw[cid]["label"],
      }
      for cid in sorted(raw)
    }
    assert_dataset(got, expected)
  assert got_train.features["x"].shape == (12, crop, crop, 3)
  np.testing.assert_array_equal(got_train.client(1)["x"][0], 0.0)


def test_cifar100_distort_keeps_pixels(tmp_path, cifar100_files):
  downloads, train, _ = cifar100_files
  got, _ = cifar.cifar100(
    data_dir=tmp_path / "cache", search=downloads, progress=False, distort=True
  )
  for k, cid in enumerate(sorted(train)):
    x = got.client(k)["x"]
    assert x.dtype == np.float32 and x.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(x, train[cid]["image"])
  with pytest.raises(ValueError, match=r"crop must be an int in \[1, 32\]"):
    cifar.cifar100(data_dir=tmp_path, crop=40)
  with pytest.raises(TypeError, match="distort must be True or False"):
    cifar.cifar100(data_dir=tmp_path, distort=1)


@pytest.mark.parametrize("jit", [False, True])
def test_random_crop_windows_and_flips(rng, jit):
  images = rng.integers(0, 256, (64, 32, 32, 3)).astype(np.float32)
  fn = (
    jax.jit(cifar.random_crop, static_argnums=2) if jit else cifar.random_crop
  )
  out = np.asarray(fn(jax.random.PRNGKey(3), images, 24))
  assert out.shape == (64, 24, 24, 3)
  flips = 0
  for img, crop in zip(images, out):
    windows = [
      (t, l, f)
      for t in range(9)
      for l in range(9)
      for f in (False, True)
      if np.array_equal(
        crop,
        img[t : t + 24, l : l + 24][:, ::-1]
        if f
        else img[t : t + 24, l : l + 24],
      )
    ]
    assert len(windows) == 1  # each output is one window of its image
    flips += windows[0][2]
  assert 10 < flips < 54  # about half are mirrored
  no_flip = np.asarray(
    cifar.random_crop(jax.random.PRNGKey(3), images, 24, flip=False)
  )
  assert not np.array_equal(no_flip, out)


def test_with_random_crop_model(rng):
  model = fl.models.Model(
    init=lambda key: {}, apply=lambda p, b, rng=None, train=False: b["x"]
  )
  wrapped = cifar.with_random_crop(model, 24)
  x = rng.integers(0, 256, (5, 32, 32, 3)).astype(np.float32)
  evaluated = np.asarray(wrapped.apply({}, {"x": x}))
  np.testing.assert_allclose(
    evaluated, tf_center_crop_standardize(x, 24), atol=1e-5
  )
  trained = np.asarray(wrapped.apply({}, {"x": x}, jax.random.PRNGKey(0), True))
  assert trained.shape == (5, 24, 24, 3)
  np.testing.assert_allclose(trained.mean(axis=(1, 2, 3)), 0.0, atol=1e-5)
  np.testing.assert_allclose(trained.std(axis=(1, 2, 3)), 1.0, atol=1e-4)
  assert not np.allclose(trained, evaluated)
  with pytest.raises(TypeError, match="model must be a fedjax_lite Model"):
    cifar.with_random_crop(object())


def test_per_image_standardization_numpy_and_jax(rng):
  x = rng.integers(0, 256, (4, 24, 24, 3)).astype(np.uint8)
  expected = tf_center_crop_standardize(
    np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0))), 24
  )
  got_np = cifar.per_image_standardization(x)
  got_jax = np.asarray(cifar.per_image_standardization(jax.numpy.asarray(x)))
  assert got_np.dtype == np.float32
  np.testing.assert_allclose(got_np, expected, atol=1e-6)
  np.testing.assert_allclose(got_jax, expected, atol=1e-5)


# ---------------------------------------------------------------- CIFAR-10
def cifar10_records(rng, n):
  labels = rng.integers(0, 10, n).astype(np.uint8)
  chw = rng.integers(0, 256, (n, 3, 32, 32)).astype(np.uint8)
  raw = np.concatenate([labels[:, None], chw.reshape(n, -1)], axis=1)
  return raw.tobytes(), labels, chw


def decode_reference(raw):
  """The binary layout by hand: 1 label byte, then R, G, B planes."""
  rec = np.frombuffer(raw, np.uint8).reshape(-1, 3073)
  images = np.stack(
    [
      rec[:, 1 + 1024 * c : 1 + 1024 * (c + 1)].reshape(-1, 32, 32)
      for c in range(3)
    ],
    axis=-1,
  )
  return images, rec[:, 0].astype(np.int32)


@pytest.fixture
def cifar10_archive(tmp_path, rng, monkeypatch):
  raws = [cifar10_records(rng, 40)[0] for _ in range(5)]
  test_raw = cifar10_records(rng, 40)[0]
  archive = tmp_path / "cifar-10-binary.tar.gz"
  with tarfile.open(archive, "w:gz") as tar:
    named = [(f"data_batch_{i + 1}.bin", r) for i, r in enumerate(raws)]
    named += [("test_batch.bin", test_raw), ("batches.meta.txt", b"airplane\n")]
    for name, data in named:
      info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  monkeypatch.setitem(
    cifar.REMOTE_FILES,
    "cifar-10-binary",
    RemoteFile(
      archive.name, archive.as_uri(), sha256(archive), archive.stat().st_size
    ),
  )
  train_x, train_y = decode_reference(b"".join(raws))
  test_x, test_y = decode_reference(test_raw)
  return train_x, train_y, test_x, test_y


def pfl_normalize(train_x, x):
  """pfl's load_and_preprocess: per-channel mean/std of the train pixels."""
  t = train_x.astype(np.float64)
  return (x - t.mean(axis=(0, 1, 2))) / t.std(axis=(0, 1, 2))


def rows_of(ds, x_ref, y_ref, train_x):
  """Maps every example of ``ds`` back to its row in the reference arrays."""
  flat = pfl_normalize(train_x, x_ref).reshape(len(x_ref), -1)
  out = []
  for k in range(ds.num_clients):
    c = ds.client(k)
    for x, y in zip(c["x"], c["y"]):
      d = np.abs(flat - x.reshape(1, -1)).max(axis=1)
      i = int(np.argmin(d))
      assert d[i] < 1e-4 and y == y_ref[i]
      out.append(i)
  return out


def test_cifar10_iid(tmp_path, cifar10_archive):
  train_x, train_y, test_x, test_y = cifar10_archive
  cache = tmp_path / "cache"
  train, test = cifar.cifar10(10, data_dir=cache, progress=False)
  assert (cache / "cifar-10-binary.tar.gz").is_file()  # downloaded
  assert train.client_ids == tuple(str(k) for k in range(10))
  assert train.counts.tolist() == [20] * 10
  assert train.features["x"].dtype == np.float32
  assert train.features["y"].dtype == np.int32
  assert train.features["x"].shape == (200, 32, 32, 3)
  assert sorted(rows_of(train, train_x, train_y, train_x)) == list(range(200))
  assert test.client_ids == ("test",)
  np.testing.assert_allclose(
    test.features["x"], pfl_normalize(train_x, test_x), atol=1e-5
  )
  np.testing.assert_array_equal(test.features["y"], test_y)


def test_cifar10_dirichlet_and_cache(tmp_path, cifar10_archive, monkeypatch):
  train_x, train_y, test_x, test_y = cifar10_archive
  cache = tmp_path / "cache"
  kw = dict(
    partition="dirichlet", alpha=0.1, seed=1, data_dir=cache, progress=False
  )
  train, test = cifar.cifar10(10, central_test=False, **kw)
  assert train.counts.tolist() == [20] * 10
  rows = rows_of(train, train_x, train_y, train_x)
  assert len(set(rows)) == 200
  # Dir(0.1) class shares: clients see fewer classes than IID clients do.
  iid, _ = cifar.cifar10(10, data_dir=cache, progress=False)
  skew = fl.datasets.describe(train)
  assert (
    train.summary()["label_skew_tv"]["mean"]
    > iid.summary()["label_skew_tv"]["mean"]
  )
  assert "clients" in skew
  assert test.counts.tolist() == [20, 20]  # 40 test images // 20 per client
  assert sorted(rows_of(test, test_x, test_y, train_x)) == list(range(40))
  # The partition is cached: a second call does not partition again.
  monkeypatch.setattr(cifar, "_pfl_dirichlet", lambda *a: pytest.fail("again"))
  again, _ = cifar.cifar10(10, central_test=False, **kw)
  np.testing.assert_array_equal(again.features["x"], train.features["x"])


def test_cifar10_pfl_dirichlet_sizes_and_disjoint():
  labels = np.repeat(np.arange(10), 100)
  parts = cifar._pfl_dirichlet(labels, 20, 50, 0.1, np.random.default_rng(0))
  assert [p.size for p in parts] == [50] * 20
  assert np.unique(np.concatenate(parts)).size == 1000
  top_share = np.mean([np.bincount(labels[p]).max() / 50 for p in parts[:10]])
  assert top_share > 0.5  # early clients are dominated by one class


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(num_clients=0), "num_clients must be a positive int"),
    (dict(partition="shards"), "partition must be one of"),
    (dict(alpha=0.0), "alpha must be a positive finite number"),
    (dict(seed=-1), "seed must be an int >= 0"),
    (dict(central_test="no"), "central_test must be True or False"),
    (dict(num_clients=201), "num_clients must be at most the 200"),
  ],
)
def test_cifar10_checks_arguments(tmp_path, cifar10_archive, kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    cifar.cifar10(data_dir=tmp_path / "c", progress=False, **kwargs)


def test_read_cifar10_binary_rejects_other_files(tmp_path):
  p = tmp_path / "x.bin"
  p.write_bytes(b"\x00" * 100)
  with pytest.raises(ValueError, match="positive multiple of 3073"):
    cifar.read_cifar10_binary(p)
  p.write_bytes(bytes([42]) + b"\x00" * 3072)
  with pytest.raises(ValueError, match="expected 0..9"):
    cifar.read_cifar10_binary(p)


def test_download_is_reused_by_loaders(tmp_path, cifar10_archive, monkeypatch):
  cache = tmp_path / "cache"
  cifar.cifar10(10, data_dir=cache, progress=False)
  monkeypatch.setattr(
    download, "_download", lambda *a: pytest.fail("downloaded twice")
  )
  monkeypatch.setattr(
    download, "_unpack", lambda *a: pytest.fail("re-extracted")
  )
  cifar.cifar10(10, data_dir=cache, progress=False)
