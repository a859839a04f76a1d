"""File loaders on small files written here in each format, plus bad files.

The files are written with the formats' own primitives (json, sqlite3 +
zlib + msgpack extension types, h5py groups), independently of the loaders.
"""

import json
import sqlite3
import zlib

import h5py
import msgpack
import numpy as np
import pytest

import fedjax_lite as fl
from fedjax_lite.datasets import loaders

LEAF = fl.datasets.LEAF_VOCAB


def client_arrays(rng, sizes=(3, 5, 2)):
  return [
    {
      "pixels": rng.random((n, 4, 4)).astype(np.float32),
      "label": rng.integers(0, 10, n).astype(np.int32),
    }
    for n in sizes
  ]


def assert_clients(ds, ids, clients, rename=None):
  rename = rename or {}
  assert ds.client_ids == tuple(ids)
  for k, want in enumerate(clients):
    got = ds.client(k)
    assert sorted(got) == sorted(rename.get(n, n) for n in want)
    for name, arr in want.items():
      np.testing.assert_array_equal(got[rename.get(name, name)], arr)


# ---------------------------------------------------------------- LEAF JSON
def write_leaf(path, users, xs, ys, **extra):
  obj = {
    "users": users,
    "num_samples": [len(y) for y in ys],
    "user_data": {u: {"x": x, "y": y} for u, x, y in zip(users, xs, ys)},
  }
  obj.update(extra)
  path.write_text(json.dumps(obj))
  return path


def test_leaf_json_numeric_files_and_directory(tmp_path, rng):
  xs = [rng.random((n, 6)).round(4).tolist() for n in (2, 4, 3)]
  ys = [rng.integers(0, 5, len(x)).tolist() for x in xs]
  write_leaf(
    tmp_path / "a.json", ["u0", "u1"], xs[:2], ys[:2], hierarchies=["h", "h"]
  )
  write_leaf(tmp_path / "b.json", ["u2"], xs[2:], ys[2:])
  want = [
    {"x": np.asarray(x, np.float32), "y": np.asarray(y, np.int32)}
    for x, y in zip(xs, ys)
  ]
  for arg in (tmp_path, [tmp_path / "a.json", tmp_path / "b.json"]):
    ds = loaders.load_leaf_json(arg)
    assert_clients(ds, ["u0", "u1", "u2"], want)
  one = loaders.load_leaf_json(tmp_path / "b.json")
  assert one.client_ids == ("u2",)


def test_leaf_json_shakespeare_strings_map_to_vocabulary(tmp_path):
  x = ["To be, or not", "ot to be: tha"]
  y = ["t", "t"]
  write_leaf(tmp_path / "s.json", ["HAMLET"], [x], [y])
  ds = loaders.load_leaf_json(tmp_path / "s.json")
  c = ds.client(0)
  assert c["x"].dtype == np.uint8 and c["x"].shape == (2, 13)
  assert "".join(LEAF[i] for i in c["x"][0]) == x[0]
  np.testing.assert_array_equal(c["y"], [LEAF.index("t")] * 2)


def test_leaf_json_transform_and_empty_users(tmp_path):
  write_leaf(tmp_path / "t.json", ["a", "b"], [[[1, 2]], []], [[1], []])
  ds = loaders.load_leaf_json(
    tmp_path / "t.json", transform=lambda cid, f: {"x": f["x"] * 2, "y": f["y"]}
  )
  assert ds.client_ids == ("a",)  # b has no examples
  np.testing.assert_array_equal(ds.client(0)["x"], [[2, 4]])


@pytest.mark.parametrize(
  "content, match",
  [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "holds a list"),
    (json.dumps({"users": [], "num_samples": []}), "no 'user_data' key"),
    (
      json.dumps({"users": ["a"], "num_samples": [], "user_data": {}}),
      "1 users but 0 num_samples",
    ),
    (
      json.dumps({"users": ["a"], "num_samples": [1], "user_data": {}}),
      "missing from 'user_data'",
    ),
    (
      json.dumps(
        {
          "users": ["a"],
          "num_samples": [2],
          "user_data": {"a": {"x": [[1], [2]], "y": [0]}},
        }
      ),
      "num_samples says 2",
    ),
    (
      json.dumps(
        {
          "users": ["a"],
          "num_samples": [2],
          "user_data": {"a": {"x": [[1], [2, 3]], "y": [0, 1]}},
        }
      ),
      "ragged",
    ),
    (
      json.dumps(
        {
          "users": ["a"],
          "num_samples": [1],
          "user_data": {"a": {"pixels": [[1]], "y": [0]}},
        }
      ),
      "'x' and 'y' lists",
    ),
    (
      json.dumps(
        {
          "users": ["a", "b"],
          "num_samples": [1, 1],
          "user_data": {
            "a": {"x": [[1]], "y": [0]},
            "b": {"x": [[1, 2]], "y": [0]},
          },
        }
      ),
      "different per-example shapes",
    ),
    (
      json.dumps(
        {
          "users": ["a"],
          "num_samples": [1],
          "user_data": {"a": {"x": [["id", 3]], "y": [0]}},
        }
      ),
      "transform",
    ),
    (
      json.dumps(
        {
          "users": ["a"],
          "num_samples": [0],
          "user_data": {"a": {"x": [], "y": []}},
        }
      ),
      "no client with examples",
    ),
  ],
)
def test_leaf_json_malformed(tmp_path, content, match):
  path = tmp_path / "bad.json"
  path.write_text(content)
  with pytest.raises(ValueError, match=match) as info:
    loaders.load_leaf_json(path)
  assert "bad.json" in str(info.value)


def test_leaf_json_missing_paths(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such file"):
    loaders.load_leaf_json(tmp_path / "nope.json")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no .json files"):
    loaders.load_leaf_json(tmp_path / "empty")


def test_leaf_json_duplicate_user_across_files(tmp_path):
  write_leaf(tmp_path / "a.json", ["u"], [[[1]]], [[0]])
  write_leaf(tmp_path / "b.json", ["u"], [[[2]]], [[1]])
  with pytest.raises(ValueError, match="appears twice"):
    loaders.load_leaf_json(tmp_path)


# ------------------------------------------------------------ FedJAX SQLite
def fedjax_pack(obj) -> bytes:
  """msgpack with FedJAX's extension types (1: ndarray, 4: bytes ndarray)."""

  def default(x):
    if isinstance(x, np.ndarray) and x.dtype == object:
      return msgpack.ExtType(
        4, msgpack.packb((x.shape, list(x.reshape(-1))), use_bin_type=True)
      )
    if isinstance(x, np.ndarray):
      return msgpack.ExtType(
        1,
        msgpack.packb(
          (x.shape, x.dtype.name, x.tobytes("C")), use_bin_type=True
        ),
      )
    raise TypeError(type(x))

  return msgpack.packb(obj, default=default, strict_types=True)


def write_sqlite(path, rows, table="federated_data"):
  conn = sqlite3.connect(path)
  with conn:
    conn.execute(
      f"CREATE TABLE {table} (client_id BLOB NOT NULL PRIMARY KEY,"
      " data BLOB NOT NULL, num_examples INTEGER NOT NULL);"
    )
    for cid, data, n in rows:
      conn.execute(f"INSERT INTO {table} VALUES (?, ?, ?);", [cid, data, n])
  conn.close()
  return path


def test_fedjax_sqlite_round_trip(tmp_path, rng):
  clients = client_arrays(rng)
  ids = [f"{i:04x}".encode() for i in range(3)]
  path = write_sqlite(
    tmp_path / "d.sqlite",
    [
      (cid, zlib.compress(fedjax_pack(c)), len(c["label"]))
      for cid, c in zip(ids, clients)
    ],
  )
  ds = loaders.load_fedjax_sqlite(path)
  assert_clients(ds, ["0000", "0001", "0002"], clients)
  only = loaders.load_fedjax_sqlite(path, features=["label"])
  assert only.feature_names == ("label",)


def test_fedjax_sqlite_bytes_feature_needs_transform(tmp_path):
  snippets = np.array([b"to be", b"or not"], dtype=object)
  path = write_sqlite(
    tmp_path / "s.sqlite",
    [(b"\xff\x01", zlib.compress(fedjax_pack({"snippets": snippets})), 2)],
  )
  with pytest.raises(ValueError, match="snippets.*transform"):
    loaders.load_fedjax_sqlite(path)
  ds = loaders.load_fedjax_sqlite(
    path,
    transform=lambda cid, f: {
      "length": np.array([len(s) for s in f["snippets"]])
    },
  )
  assert ds.client_ids == ("ff01",)  # non-UTF-8 ids become hex
  np.testing.assert_array_equal(ds.client(0)["length"], [5, 6])


def test_fedjax_sqlite_malformed(tmp_path, rng):
  good = zlib.compress(fedjax_pack(client_arrays(rng, (2,))[0]))
  cases = {
    "not_db.sqlite": ("text", "not an SQLite database"),
    "no_table.sqlite": ("other", "no table 'federated_data'"),
    "not_zlib.sqlite": ([(b"a", b"plain bytes", 1)], "not zlib-compressed"),
    "not_msgpack.sqlite": (
      [(b"a", zlib.compress(b"\xc1\xc1"), 1)],
      "not a msgpack message",
    ),
    "not_dict.sqlite": (
      [(b"a", zlib.compress(msgpack.packb([1, 2])), 2)],
      "decodes to a list",
    ),
    "bad_count.sqlite": ([(b"a", good, 3)], "num_examples is 3"),
    "bad_ext.sqlite": (
      [(b"a", zlib.compress(msgpack.packb({"x": msgpack.ExtType(9, b"")})), 1)],
      "extension type 9",
    ),
  }
  for name, (rows, match) in cases.items():
    path = tmp_path / name
    if rows == "text":
      path.write_text("hello, I am not a database" * 20)
    elif rows == "other":
      write_sqlite(path, [(b"a", good, 2)], table="examples")
    else:
      write_sqlite(path, rows)
    with pytest.raises(ValueError, match=match) as info:
      loaders.load_fedjax_sqlite(path)
    assert name in str(info.value), name
  with pytest.raises(FileNotFoundError, match="no such file"):
    loaders.load_fedjax_sqlite(tmp_path / "missing.sqlite")
  assert not (tmp_path / "missing.sqlite").exists()  # never created


def test_fedjax_sqlite_wrong_columns(tmp_path):
  path = tmp_path / "cols.sqlite"
  conn = sqlite3.connect(path)
  with conn:
    conn.execute("CREATE TABLE federated_data (client_id BLOB, blob BLOB)")
  conn.close()
  with pytest.raises(
    ValueError, match="expected \\['client_id', 'data', 'num_examples'\\]"
  ):
    loaders.load_fedjax_sqlite(path)


# ---------------------------------------------------------------- TFF HDF5
def write_h5(path, clients):
  with h5py.File(path, "w") as f:
    ex = f.create_group("examples")
    for cid, feats in clients.items():
      g = ex.create_group(cid)
      for name, arr in feats.items():
        g.create_dataset(name, data=arr)
  return path


def test_tff_hdf5_round_trip_sorted_ids(tmp_path, rng):
  clients = client_arrays(rng)
  ids = ["f0002_17", "f0000_03", "f0001_41"]
  path = write_h5(tmp_path / "e.h5", dict(zip(ids, clients)))
  ds = loaders.load_tff_hdf5(path)
  order = np.argsort(ids)
  assert_clients(ds, sorted(ids), [clients[i] for i in order])


def test_tff_hdf5_strings_need_transform(tmp_path):
  path = tmp_path / "s.h5"
  with h5py.File(path, "w") as f:
    f.create_dataset(
      "examples/alice/snippets",
      data=np.array([b"to be", b"or"], dtype=h5py.string_dtype()),
    )
  with pytest.raises(ValueError, match="snippets.*transform"):
    loaders.load_tff_hdf5(path)
  ds = loaders.load_tff_hdf5(
    path,
    transform=lambda cid, f: {"n": np.array([len(s) for s in f["snippets"]])},
  )
  np.testing.assert_array_equal(ds.client(0)["n"], [5, 2])


def test_tff_hdf5_malformed(tmp_path, rng):
  text = tmp_path / "text.h5"
  text.write_text("not hdf5")
  with pytest.raises(ValueError, match="not a readable HDF5 file"):
    loaders.load_tff_hdf5(text)
  nogroup = tmp_path / "nogroup.h5"
  with h5py.File(nogroup, "w") as f:
    f.create_dataset("pixels", data=np.zeros(3))
  with pytest.raises(ValueError, match="no 'examples' group"):
    loaders.load_tff_hdf5(nogroup)
  flat = tmp_path / "flat.h5"
  with h5py.File(flat, "w") as f:
    f.create_dataset("examples/alice", data=np.zeros(3))
  with pytest.raises(ValueError, match="is a dataset; expected a group"):
    loaders.load_tff_hdf5(flat)
  ragged = write_h5(
    tmp_path / "ragged.h5",
    {"a": {"pixels": np.zeros((3, 2)), "label": np.zeros(2, np.int32)}},
  )
  with pytest.raises(ValueError, match="example counts"):
    loaders.load_tff_hdf5(ragged)
  mixed = write_h5(
    tmp_path / "mixed.h5",
    {
      "a": {"pixels": np.zeros((2, 2)), "label": np.zeros(2, np.int32)},
      "b": {"pixels": np.zeros((2, 2))},
    },
  )
  with pytest.raises(ValueError, match="same features as the first client"):
    loaders.load_tff_hdf5(mixed)
  with pytest.raises(ValueError, match="no feature\\(s\\) \\['label'\\]"):
    loaders.load_tff_hdf5(mixed, features=["label"])
  with pytest.raises(FileNotFoundError):
    loaders.load_tff_hdf5(tmp_path / "missing.h5")
  with pytest.raises(ValueError, match="is a directory"):
    loaders.load_tff_hdf5(tmp_path)


def test_fedjax_sqlite_malformed_array_payload(tmp_path):
  payload = msgpack.packb(((4,), "float32", b"\x00" * 12), use_bin_type=True)
  blob = zlib.compress(msgpack.packb({"x": msgpack.ExtType(1, payload)}))
  path = write_sqlite(tmp_path / "short.sqlite", [(b"a", blob, 4)])
  with pytest.raises(ValueError, match="array payload is malformed"):
    loaders.load_fedjax_sqlite(path)
