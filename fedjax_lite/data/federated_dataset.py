"""Packed federated datasets: every client's examples in one array per feature.

A :class:`FederatedDataset` stores all clients' examples back to back
(``features[name]`` has shape ``[total_examples, ...]``) plus per-client
``offsets`` and ``counts``. A million clients with a few examples each cost one
array per feature and two integer vectors, not a million Python objects.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

Features = Mapping[str, np.ndarray]


def _as_array(name: str, value: Any) -> np.ndarray:
  arr = np.asarray(value)
  if arr.dtype == object:
    raise TypeError(
      f"feature {name!r} has dtype object; expected a numeric "
      "array (ragged per-example data must be padded first)."
    )
  if arr.ndim == 0:
    raise ValueError(
      f"feature {name!r} is a scalar; expected an array with a "
      "leading example axis."
    )
  return narrow(arr)


def narrow(arr: np.ndarray) -> np.ndarray:
  """float64 -> float32 and int64 -> int32 (what devices hold); others as
  they are."""
  if arr.dtype == np.float64:
    return arr.astype(np.float32)
  if arr.dtype == np.int64:
    return arr.astype(np.int32)
  return arr


def _num_rows(feats: Mapping[str, np.ndarray]) -> int:
  """The examples every (non-empty) feature array holds: the same number."""
  lens = {k: v.shape[0] for k, v in feats.items()}
  if len(set(lens.values())) != 1:
    raise ValueError(
      f"features have different numbers of examples {lens}; "
      "expected one row per example in every feature."
    )
  return next(iter(lens.values()))


def _check_finite(name: str, arr: np.ndarray, where: str) -> None:
  if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
    bad = np.argwhere(~np.isfinite(arr.reshape(arr.shape[0], -1)))[0]
    raise ValueError(
      f"{where}: feature {name!r} contains NaN or inf (first at "
      f"example {int(bad[0])}); expected finite values. Clean or "
      "impute the data before building the dataset."
    )


@dataclasses.dataclass(frozen=True)
class FederatedDataset:
  """All clients' examples packed into one array per feature.

  Attributes:
    features: name -> array ``[total_examples, ...]``; client ``k`` owns rows
      ``offsets[k] : offsets[k] + counts[k]``.
    offsets: int64 ``[num_clients]`` start row of each client.
    counts: int64 ``[num_clients]`` number of examples of each client (> 0).
    client_ids: optional names of the clients, ``len == num_clients``.
  """

  features: Mapping[str, np.ndarray]
  offsets: np.ndarray
  counts: np.ndarray
  client_ids: tuple | None = None

  def __post_init__(self):
    feats = {k: _as_array(k, v) for k, v in dict(self.features).items()}
    if not feats:
      raise ValueError(
        "features is empty; expected at least one feature array "
        "such as {'x': ..., 'y': ...}."
      )
    offsets = np.asarray(self.offsets, dtype=np.int64).reshape(-1)
    counts = np.asarray(self.counts, dtype=np.int64).reshape(-1)
    if offsets.shape != counts.shape:
      raise ValueError(
        f"offsets has {offsets.size} entries but counts has "
        f"{counts.size}; expected one of each per client."
      )
    if counts.size == 0:
      raise ValueError("the dataset has no clients; expected at least one.")
    if np.any(counts <= 0):
      k = int(np.argmax(counts <= 0))
      raise ValueError(
        f"client {self._name(k)} has {int(counts[k])} examples; "
        "expected every client to hold at least one example. "
        "Drop empty clients before packing."
      )
    n = _num_rows(feats)
    if np.any(offsets < 0) or np.any(offsets + counts > n):
      raise ValueError(
        f"client rows exceed the {n} packed examples; offsets "
        "and counts must index inside the feature arrays."
      )
    for k, v in feats.items():
      _check_finite(k, v, "FederatedDataset")
    ids = None if self.client_ids is None else tuple(self.client_ids)
    if ids is not None and len(ids) != counts.size:
      raise ValueError(
        f"client_ids has {len(ids)} names for {counts.size} "
        "clients; expected one name per client."
      )
    object.__setattr__(self, "features", feats)
    object.__setattr__(self, "offsets", offsets)
    object.__setattr__(self, "counts", counts)
    object.__setattr__(self, "client_ids", ids)

  def _name(self, k: int) -> str:
    if self.client_ids is not None:
      return f"{self.client_ids[k]!r} (index {k})"
    return str(k)

  # ---------------------------------------------------------------- builders
  @classmethod
  def from_clients(
    cls, clients: Mapping[Any, Features] | Sequence[Features]
  ) -> "FederatedDataset":
    """Packs per-client feature dicts.

    Args:
      clients: ``{client_id: {"x": array, "y": array}}`` or a list of such
        dicts (client ids are then their positions).

    Raises:
      ValueError: a client has mismatched feature lengths, no examples, a
        feature the others lack, or NaN values.
    """
    if isinstance(clients, Mapping):
      ids = list(clients.keys())
      items = [clients[k] for k in ids]
    else:
      items = list(clients)
      ids = None
    if not items:
      raise ValueError("clients is empty; expected at least one client.")
    names = None
    arrays: dict[str, list[np.ndarray]] = {}
    counts = []
    for i, client in enumerate(items):
      label = repr(ids[i]) if ids is not None else str(i)
      if not isinstance(client, Mapping):
        raise TypeError(
          f"client {label} is a {type(client).__name__}; expected "
          "a dict of feature arrays like {'x': ..., 'y': ...}."
        )
      if names is None:
        names = list(client.keys())
        if not names:
          raise ValueError(f"client {label} has no features.")
      elif set(client.keys()) != set(names):
        raise ValueError(
          f"client {label} has features {sorted(client)}; "
          f"expected the same features as client 0: "
          f"{sorted(names)}."
        )
      lengths = {}
      for k in names:
        a = _as_array(k, client[k])
        lengths[k] = a.shape[0]
        arrays.setdefault(k, []).append(a)
      if len(set(lengths.values())) != 1:
        raise ValueError(
          f"client {label} has mismatched feature lengths "
          f"{lengths}; expected every feature to have one row "
          "per example."
        )
      n = next(iter(lengths.values()))
      if n == 0:
        raise ValueError(
          f"client {label} has 0 examples; expected at least one. "
          "Drop empty clients before packing."
        )
      counts.append(n)
    feats = {}
    for k, parts in arrays.items():
      shapes = {p.shape[1:] for p in parts}
      if len(shapes) != 1:
        raise ValueError(
          f"feature {k!r} has different per-example shapes "
          f"across clients: {sorted(shapes)}."
        )
      feats[k] = np.concatenate(parts, axis=0)
    counts = np.asarray(counts, np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    return cls(
      feats,
      offsets,
      counts,
      tuple(str(i) for i in ids) if ids is not None else None,
    )

  @classmethod
  def from_partition(
    cls,
    features: Features,
    partition: Sequence[Iterable[int]],
    client_ids: Sequence[str] | None = None,
  ) -> "FederatedDataset":
    """Builds a dataset from centralised arrays and per-client row indices.

    Args:
      features: name -> array ``[num_examples, ...]``.
      partition: one sequence of row indices per client.
      client_ids: optional client names.
    """
    feats = {k: _as_array(k, v) for k, v in dict(features).items()}
    if not feats:
      raise ValueError("features is empty.")
    n = _num_rows(feats)
    parts = [
      np.asarray(
        list(p) if not isinstance(p, np.ndarray) else p, dtype=np.int64
      ).reshape(-1)
      for p in partition
    ]
    if not parts:
      raise ValueError(
        "partition is empty; expected one index list per client."
      )
    for i, p in enumerate(parts):
      if p.size == 0:
        raise ValueError(
          f"partition[{i}] is empty; expected every client to "
          "receive at least one example."
        )
      if p.min() < 0 or p.max() >= n:
        raise ValueError(f"partition[{i}] indexes rows outside [0, {n}).")
    order = np.concatenate(parts)
    counts = np.asarray([p.size for p in parts], np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    packed = {k: v[order] for k, v in feats.items()}
    return cls(packed, offsets, counts, client_ids)

  # -------------------------------------------------------------- accessors
  @property
  def num_clients(self) -> int:
    return int(self.counts.size)

  @property
  def num_examples(self) -> int:
    return int(self.counts.sum())

  @property
  def feature_names(self) -> tuple:
    return tuple(self.features)

  def __len__(self) -> int:
    return self.num_clients

  def client(self, k: int) -> dict:
    """Feature arrays of client ``k`` (views, not copies)."""
    if not 0 <= k < self.num_clients:
      raise IndexError(
        f"client index {k} out of range [0, {self.num_clients})."
      )
    s, n = int(self.offsets[k]), int(self.counts[k])
    return {name: v[s : s + n] for name, v in self.features.items()}

  def subset(self, clients: Sequence[int]) -> "FederatedDataset":
    """A new dataset holding only the given clients (re-packed)."""
    idx = np.asarray(clients, np.int64).reshape(-1)
    if idx.size == 0:
      raise ValueError("subset needs at least one client index.")
    if idx.min() < 0 or idx.max() >= self.num_clients:
      raise IndexError(f"client indices must lie in [0, {self.num_clients}).")
    parts = [
      np.arange(self.offsets[k], self.offsets[k] + self.counts[k]) for k in idx
    ]
    ids = None if self.client_ids is None else [self.client_ids[k] for k in idx]
    return FederatedDataset.from_partition(self.features, parts, ids)

  def concatenate(self) -> dict:
    """All examples as centralised arrays (client order)."""
    return dict(self.features)

  def summary(self, label_key: str | None = "y") -> dict:
    """Clients, example-count quantiles and (if labels) label skew."""
    q = np.quantile(self.counts, [0.0, 0.1, 0.5, 0.9, 1.0])
    out = {
      "num_clients": self.num_clients,
      "num_examples": self.num_examples,
      "examples_per_client": {
        "min": int(q[0]),
        "p10": float(q[1]),
        "median": float(q[2]),
        "p90": float(q[3]),
        "max": int(q[4]),
        "mean": float(self.counts.mean()),
      },
    }
    if label_key is not None and label_key in self.features:
      y = self.features[label_key]
      if np.issubdtype(y.dtype, np.integer) and y.ndim == 1:
        num_classes = int(y.max()) + 1
        owner = np.repeat(np.arange(self.num_clients), self.counts)
        hist = np.zeros((self.num_clients, num_classes))
        # Index rows through offsets so any packing layout is handled.
        rows = np.concatenate(
          [np.arange(o, o + c) for o, c in zip(self.offsets, self.counts)]
        )
        np.add.at(hist, (owner, y[rows]), 1.0)
        p_client = hist / hist.sum(1, keepdims=True)
        p_global = hist.sum(0) / hist.sum()
        tv = 0.5 * np.abs(p_client - p_global[None]).sum(1)
        out["num_classes"] = num_classes
        out["classes_per_client"] = {
          "mean": float((hist > 0).sum(1).mean()),
          "min": int((hist > 0).sum(1).min()),
          "max": int((hist > 0).sum(1).max()),
        }
        out["label_skew_tv"] = {
          "mean": float(tv.mean()),
          "max": float(tv.max()),
        }
    return out

  def __repr__(self) -> str:
    shapes = {k: (v.dtype.name, v.shape[1:]) for k, v in self.features.items()}
    return (
      f"FederatedDataset(num_clients={self.num_clients}, "
      f"num_examples={self.num_examples}, features={shapes})"
    )
