"""Loaders for the on-disk federated formats users already have.

* LEAF JSON (Caldas et al. 2018, arXiv:1812.01097): one or more JSON files
  ``{"users": [u, ...], "num_samples": [n_u, ...], "user_data": {u: {"x":
  [...], "y": [...]}}}`` (an optional ``"hierarchies"`` list is ignored).
  Character data (LEAF Shakespeare: ``x`` strings of 80 characters, ``y``
  single characters) is mapped to LEAF's 80-character vocabulary.
* FedJAX SQLite (``fedjax.core.SQLiteFederatedData``): a table
  ``federated_data(client_id BLOB, data BLOB, num_examples INTEGER)`` whose
  ``data`` is ``zlib.compress(msgpack(dict of numpy arrays))``; arrays are
  msgpack extension type 1 holding ``msgpack((shape, dtype_name, C-order
  bytes))`` (type 3: a numpy scalar in the same encoding; type 4: an array of
  bytes objects, ``msgpack((shape, [bytes, ...]))``).
* TensorFlow Federated HDF5 (``tff.simulation.datasets.HDF5ClientData``, used
  by TFF's EMNIST, Shakespeare, CIFAR-100 and Stack Overflow downloads): groups
  ``/examples/<client_id>/<feature>``, one dataset per feature with a leading
  example axis; clients in sorted id order.

Every loader returns a :class:`FederatedDataset` with ``client_ids`` set.
Features that are not numeric (byte strings, text) need a ``transform(
client_id, features) -> features`` that turns them into numeric arrays;
``features=[...]`` keeps only the named features. Clients with no examples are
skipped. Unreadable or malformed files raise ``ValueError`` (or
``FileNotFoundError``) naming the file, what was expected and what was found.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import msgpack
import numpy as np

from fedjax_lite._optional import require
from fedjax_lite.data.federated_dataset import FederatedDataset

Transform = Callable[[str, dict], Mapping[str, Any]]


# ----------------------------------------------------------------- shared
def _existing_file(path) -> Path:
  p = Path(path)
  if not p.exists():
    raise FileNotFoundError(f"no such file: '{p}'.")
  if not p.is_file():
    kind = "directory" if p.is_dir() else "special file"
    raise ValueError(f"'{p}' is a {kind}; expected a data file.")
  return p


def _numeric(where: str, name: str, value: Any) -> np.ndarray:
  arr = np.asarray(value)
  if arr.dtype == object or arr.dtype.kind in "SUV":
    first = arr.reshape(-1)[:1].tolist()
    raise ValueError(
      f"{where}: feature {name!r} holds {arr.dtype} values "
      f"(e.g. {first}); expected a numeric array. Pass "
      "transform=fn(client_id, features) that turns "
      f"{name!r} into numbers, or features=[...] without it."
    )
  return arr


def _build(
  clients: Iterable[tuple[str, dict]],
  source: str,
  features: Sequence[str] | None,
  transform: Transform | None,
) -> FederatedDataset:
  """Packs ``(client_id, feature dict)`` pairs, validating as it goes."""
  packed: dict[str, dict] = {}
  names = None
  for cid, feats in clients:
    where = f"{source}, client {cid!r}"
    if transform is not None:
      feats = transform(cid, dict(feats))
      if not isinstance(feats, Mapping):
        raise TypeError(
          f"{where}: transform returned a "
          f"{type(feats).__name__}; expected a dict of arrays."
        )
    if features is not None:
      missing = [f for f in features if f not in feats]
      if missing:
        raise ValueError(
          f"{where} has no feature(s) {missing}; it has {sorted(feats)}."
        )
      feats = {f: feats[f] for f in features}
    arrays = {k: _numeric(where, k, v) for k, v in feats.items()}
    if names is None:
      names = sorted(arrays)
    elif sorted(arrays) != names:
      raise ValueError(
        f"{where} has features {sorted(arrays)}; expected the "
        f"same features as the first client: {names}."
      )
    lens = {k: (a.shape[0] if a.ndim else None) for k, a in arrays.items()}
    if None in lens.values() or len(set(lens.values())) != 1:
      raise ValueError(
        f"{where}: features have example counts {lens}; "
        "expected arrays with the same leading example axis."
      )
    if next(iter(lens.values()), 0) == 0:
      continue
    if cid in packed:
      raise ValueError(
        f"{source}: client {cid!r} appears twice; expected unique client ids."
      )
    packed[cid] = arrays
  if not packed:
    raise ValueError(
      f"{source} holds no client with examples; expected at least one."
    )
  try:
    return FederatedDataset.from_clients(packed)
  except (ValueError, TypeError) as e:
    raise ValueError(f"{source}: {e}") from e


# --------------------------------------------------------------- LEAF JSON
def _leaf_files(paths) -> list[Path]:
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  files: list[Path] = []
  for p in paths:
    p = Path(p)
    if p.is_dir():
      found = sorted(q for q in p.iterdir() if q.suffix == ".json")
      if not found:
        raise FileNotFoundError(
          f"directory '{p}' has no .json files; expected "
          "LEAF JSON files (e.g. data/train/*.json)."
        )
      files.extend(found)
    else:
      files.append(_existing_file(p))
  if not files:
    raise ValueError("no LEAF JSON files given.")
  return files


def _leaf_column(
  where: str, key: str, values: list, is_label: bool
) -> np.ndarray:
  # pylint: disable=g-import-not-at-top
  from fedjax_lite.datasets.shakespeare import text_to_indices

  if values and isinstance(values[0], str):
    if not all(isinstance(v, str) for v in values):
      raise ValueError(
        f"{where}: {key!r} mixes strings and other values; "
        "expected all strings (characters) or all numbers."
      )
    lens = {len(v) for v in values}
    if len(lens) != 1:
      raise ValueError(
        f"{where}: {key!r} strings have lengths {sorted(lens)}; "
        "expected equal-length character sequences."
      )
    out = text_to_indices("".join(values)).reshape(len(values), -1)
    return out[:, 0].astype(np.int32) if lens == {1} and is_label else out
  try:
    arr = np.asarray(values)
  except ValueError as e:  # ragged nested lists
    raise ValueError(
      f"{where}: {key!r} is ragged ({e}); expected every "
      "example to have the same shape."
    ) from None
  if arr.dtype == object:
    raise ValueError(
      f"{where}: {key!r} has ragged or mixed-type examples; "
      "expected a rectangular numeric list (pass transform= to "
      "convert other data)."
    )
  return arr


def _leaf_clients(files: list[Path], x_key: str, y_key: str):
  for f in files:
    try:
      with open(f, "r", encoding="utf-8") as fh:
        obj = json.load(fh)
    except json.JSONDecodeError as e:
      raise ValueError(
        f"LEAF JSON file '{f}' is not valid JSON ({e.msg} at "
        f"line {e.lineno}, column {e.colno})."
      ) from None
    except UnicodeDecodeError as e:
      raise ValueError(
        f"LEAF JSON file '{f}' is not UTF-8 text ({e})."
      ) from None
    if not isinstance(obj, dict):
      raise ValueError(
        f"LEAF JSON file '{f}' holds a {type(obj).__name__}; "
        "expected an object with keys users, num_samples, "
        "user_data."
      )
    for key in ("users", "num_samples", "user_data"):
      if key not in obj:
        raise ValueError(
          f"LEAF JSON file '{f}' has no {key!r} key; expected "
          f"keys users, num_samples, user_data (found "
          f"{sorted(obj)})."
        )
    users, nums, data = obj["users"], obj["num_samples"], obj["user_data"]
    if (
      not isinstance(users, list)
      or not isinstance(nums, list)
      or (not isinstance(data, dict))
    ):
      raise ValueError(
        f"LEAF JSON file '{f}': expected 'users' and "
        "'num_samples' lists and a 'user_data' object."
      )
    if len(users) != len(nums):
      raise ValueError(
        f"LEAF JSON file '{f}' lists {len(users)} users but "
        f"{len(nums)} num_samples; expected one count per user."
      )
    for u, n in zip(users, nums):
      where = f"LEAF JSON file '{f}', user {u!r}"
      if u not in data:
        raise ValueError(
          f"{where} is listed in 'users' but missing from 'user_data'."
        )
      ud = data[u]
      if not isinstance(ud, dict) or x_key not in ud or y_key not in ud:
        raise ValueError(
          f"{where}: expected user_data[{u!r}] to be an object "
          f"with {x_key!r} and {y_key!r} lists."
        )
      xs, ys = ud[x_key], ud[y_key]
      if not isinstance(xs, list) or not isinstance(ys, list):
        raise ValueError(f"{where}: {x_key!r} and {y_key!r} must be lists.")
      if not len(xs) == len(ys) == n:
        raise ValueError(
          f"{where} has {len(xs)} {x_key!r} and {len(ys)} "
          f"{y_key!r} entries but num_samples says {n}; "
          "expected all three to agree."
        )
      if n == 0:
        yield str(u), {"x": np.zeros((0,)), "y": np.zeros((0,))}
        continue
      yield (
        str(u),
        {
          "x": _leaf_column(where, x_key, xs, False),
          "y": _leaf_column(where, y_key, ys, True),
        },
      )


def load_leaf_json(
  paths,
  *,
  x_key: str = "x",
  y_key: str = "y",
  features: Sequence[str] | None = None,
  transform: Transform | None = None,
) -> FederatedDataset:
  """Loads LEAF JSON file(s) (a file, a directory of ``*.json``, or a list).

  Each user becomes a client with features ``x`` and ``y`` (numbers become
  numeric arrays; equal-length strings become ``uint8`` LEAF-vocabulary
  indices, single-character labels int32). Users are merged over files in
  file order.

  Raises:
    FileNotFoundError: a path does not exist.
    ValueError: invalid JSON, missing keys, counts that disagree with the
      data, ragged examples, or a user appearing twice.
  """
  files = _leaf_files(paths)
  source = (
    f"LEAF JSON file '{files[0]}'"
    if len(files) == 1
    else f"LEAF JSON files {[str(f) for f in files]}"
  )
  return _build(_leaf_clients(files, x_key, y_key), source, features, transform)


# ---------------------------------------------------------- FedJAX SQLite
_EXT_NDARRAY, _EXT_COMPLEX, _EXT_NPSCALAR, _EXT_BYTES_NDARRAY = 1, 2, 3, 4


class _ExtensionError(ValueError):
  """An extension payload this loader cannot decode (message kept as is)."""


def _dtype(name) -> np.dtype:
  name = name.decode() if isinstance(name, bytes) else str(name)
  if name == "bfloat16":
    import ml_dtypes  # pylint: disable=g-import-not-at-top

    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


def _decode_ndarray(payload: bytes) -> np.ndarray:
  shape, dtype_name, buf = msgpack.unpackb(payload, raw=True)
  dtype = _dtype(dtype_name)
  arr = np.frombuffer(buf, dtype=dtype).reshape(shape)
  return arr.astype(np.float32) if dtype.name == "bfloat16" else arr.copy()


def _ext_hook(code: int, payload: bytes):
  if code in (_EXT_NDARRAY, _EXT_NPSCALAR):
    try:
      arr = _decode_ndarray(payload)
    except Exception as e:  # bad dtype name, size/shape mismatch, ...
      raise _ExtensionError(
        f"an array payload is malformed ({type(e).__name__}: {e}); "
        "expected msgpack((shape, dtype_name, C-order bytes))."
      ) from None
    return arr if code == _EXT_NDARRAY else arr[()]
  if code == _EXT_BYTES_NDARRAY:
    shape, flat = msgpack.unpackb(payload, raw=True)
    out = np.empty(len(flat), dtype=object)
    out[:] = flat
    return out.reshape(shape)
  if code == _EXT_COMPLEX:
    re_, im = msgpack.unpackb(payload)
    return complex(re_, im)
  raise _ExtensionError(
    f"unknown msgpack extension type {code}; expected 1 "
    "(ndarray), 2 (complex), 3 (numpy scalar) or 4 (bytes "
    "ndarray) as written by fedjax.serialization."
  )


def decode_fedjax_blob(blob: bytes) -> dict:
  """Decodes one FedJAX client blob: ``zlib`` + msgpack -> dict of arrays."""
  try:
    raw = zlib.decompress(blob)
  except zlib.error as e:
    raise ValueError(
      f"data is not zlib-compressed ({e}); expected "
      "zlib.compress(msgpack bytes) as FedJAX writes."
    ) from None
  try:
    obj = msgpack.unpackb(raw, ext_hook=_ext_hook, raw=False)
  except _ExtensionError:
    raise
  except Exception as e:  # msgpack and numpy raise several unrelated types
    raise ValueError(
      f"data is not a msgpack message ({type(e).__name__}: {e})."
    ) from None
  if not isinstance(obj, dict):
    raise ValueError(
      f"data decodes to a {type(obj).__name__}; expected a dict "
      "of feature arrays."
    )
  return obj


def load_fedjax_sqlite(
  path,
  *,
  features: Sequence[str] | None = None,
  transform: Transform | None = None,
  table: str = "federated_data",
) -> FederatedDataset:
  """Loads a FedJAX SQLite federated dataset (clients in ``rowid`` order).

  Client ids are the ``client_id`` blobs decoded as UTF-8 (hex if they are
  not text). The stored ``num_examples`` must match the decoded arrays.

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: not an SQLite database, no ``federated_data`` table, a blob
      that is not zlib/msgpack, or counts that disagree with the data.
  """
  p = _existing_file(path)
  source = f"FedJAX SQLite file '{p}'"
  if not table.isidentifier():
    raise ValueError(f"table must be a plain SQL identifier, got {table!r}.")
  conn = sqlite3.connect(p.resolve().as_uri() + "?mode=ro", uri=True)
  try:
    try:
      tables = [
        r[0]
        for r in conn.execute(
          "SELECT name FROM sqlite_master WHERE type='table'"
        )
      ]
    except sqlite3.DatabaseError as e:
      raise ValueError(f"{source} is not an SQLite database ({e}).") from None
    if table not in tables:
      raise ValueError(
        f"{source} has no table {table!r} (tables: {tables}); "
        f"expected CREATE TABLE {table}(client_id BLOB, data "
        "BLOB, num_examples INTEGER) as FedJAX writes."
      )
    cols = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
    need = ("client_id", "data", "num_examples")
    if any(c not in cols for c in need):
      raise ValueError(
        f"{source}: table {table!r} has columns {cols}; expected {list(need)}."
      )
    rows = conn.execute(
      f"SELECT client_id, data, num_examples FROM {table} ORDER BY rowid"
    )

    def clients():
      for cid, blob, n in rows:
        name = (
          cid.decode("utf-8", errors="strict")
          if isinstance(cid, bytes) and _is_utf8(cid)
          else cid.hex()
          if isinstance(cid, bytes)
          else str(cid)
        )
        if not isinstance(blob, bytes):
          raise ValueError(
            f"{source}, client {name!r}: data is a "
            f"{type(blob).__name__}; expected a BLOB."
          )
        try:
          feats = decode_fedjax_blob(blob)
        except ValueError as e:
          raise ValueError(f"{source}, client {name!r}: {e}") from None
        for k, v in feats.items():
          a = np.asarray(v)
          if a.ndim == 0 or a.shape[0] != n:
            raise ValueError(
              f"{source}, client {name!r}: feature {k!r} has "
              f"shape {a.shape} but num_examples is {n}; "
              "expected a leading axis of num_examples."
            )
        yield name, feats

    return _build(clients(), source, features, transform)
  finally:
    conn.close()


def _is_utf8(b: bytes) -> bool:
  try:
    b.decode("utf-8")
    return True
  except UnicodeDecodeError:
    return False


# ------------------------------------------------------------ TFF HDF5
@contextlib.contextmanager
def tff_examples(path, source: str, hint: str = ""):
  """Opens TFF HDF5 file ``path`` and yields its ``/examples`` group (the
  file stays open inside the ``with`` block).

  Raises:
    ValueError: not an HDF5 file, or no ``examples`` group (messages start
      with ``source``; ``hint`` follows the expected layout).
  """
  h5py = require("h5py", "data")
  try:
    fh = h5py.File(path, "r")
  except OSError as e:
    raise ValueError(f"{source} is not a readable HDF5 file ({e}).") from None
  with fh:
    group = fh.get("examples")
    if not isinstance(group, h5py.Group):
      raise ValueError(
        f"{source} has no 'examples' group (top-level keys: "
        f"{sorted(fh.keys())}); expected /examples/<client_id>/"
        f"<feature>{hint}."
      )
    yield group


def load_tff_hdf5(
  path,
  *,
  features: Sequence[str] | None = None,
  transform: Transform | None = None,
) -> FederatedDataset:
  """Loads a TensorFlow Federated HDF5 client-data file.

  Reads ``/examples/<client_id>/<feature>`` for every client (sorted ids, as
  TFF lists them). Byte-string features (e.g. TFF Shakespeare's
  ``snippets``) need ``transform`` or ``features=[...]`` without them.

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: not an HDF5 file, no ``examples`` group, a client that is not
      a group of datasets, or features of different lengths.
  """
  h5py = require("h5py", "data")

  p = _existing_file(path)
  source = f"TFF HDF5 file '{p}'"
  with tff_examples(p, source, " as TFF's HDF5ClientData writes") as group:

    def members(g, path: str, kind, expected: str):
      # ``(name, member)`` of HDF5 group ``g`` by sorted name, each checked
      # to be a ``kind`` (h5py.Group or h5py.Dataset).
      for name in sorted(g.keys()):
        m = g[name]
        if not isinstance(m, kind):
          other = "dataset" if kind is h5py.Group else "group"
          raise ValueError(
            f"{source}: {path}/{name} is a {other}; expected {expected}."
          )
        yield name, m

    def clients():
      for cid, g in members(
        group,
        "/examples",
        h5py.Group,
        "a group holding one dataset per feature",
      ):
        feats = members(
          g,
          f"/examples/{cid}",
          h5py.Dataset,
          "a dataset (one array per feature)",
        )
        yield cid, {name: ds[()] for name, ds in feats}

    return _build(clients(), source, features, transform)
