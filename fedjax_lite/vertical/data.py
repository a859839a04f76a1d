"""Vertically partitioned data: parties that share samples, not features.

In vertical FL (Yang et al. 2019, arXiv:1902.04885) every party holds some
feature columns of (partly) the same individuals, e.g. a bank and a retailer
with common customers. Each :class:`Party` keeps its own sample ids, in its own
row order; exactly one party, the *guest* (active party), holds the labels.
Training needs the rows of all parties aligned on the common ids, which the
parties find without revealing the rest of their ids by private set
intersection (:mod:`fedjax_lite.vertical.psi`); :meth:`VerticalDataset.align`
runs it and returns :class:`AlignedData` in the order the PSI agreed on.

:func:`split_vertical` turns a centralized table into such parties (random
per-party sample subsets so the ids overlap partly, shuffled rows, per-party
standardization); :func:`breast_cancer_vertical` and :func:`digits_vertical`
apply it to the two datasets that ship with scikit-learn.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from fedjax_lite import checks
from fedjax_lite._optional import require


def id_kind(ids: np.ndarray, where: str) -> str:
  """``"str"`` or ``"int"`` for a 1-D id array; a clear error otherwise."""
  ids = np.asarray(ids)
  if ids.ndim != 1:
    raise ValueError(f"{where}: ids must be 1-D, got shape {ids.shape}.")
  if np.issubdtype(ids.dtype, np.integer):
    return "int"
  if ids.dtype.kind in "US":
    return "str"
  if ids.dtype == object and all(isinstance(i, str) for i in ids):
    return "str"
  if ids.dtype == object and all(
    isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in ids
  ):
    return "int"
  sample = ids[:3].tolist()
  raise TypeError(
    f"{where}: ids must be all strings or all integers, got "
    f"dtype {ids.dtype} (e.g. {sample}). Convert them with "
    "ids.astype(str) or ids.astype(np.int64)."
  )


@dataclasses.dataclass(frozen=True)
class Party:
  """One party's private table.

  Attributes:
    name: the party's name (e.g. ``"bank"``).
    ids: ``[n]`` sample ids (all ``str`` or all ``int``), unique.
    x: ``[n, d]`` float32 feature columns, row ``i`` belongs to ``ids[i]``.
    y: ``[n]`` labels (only the guest has them), or None.
  """

  name: str
  ids: np.ndarray
  x: np.ndarray
  y: np.ndarray | None = None

  def __post_init__(self):
    ids = np.asarray(self.ids)
    id_kind(ids, f"party {self.name!r}")
    x = np.asarray(self.x, np.float32)
    if x.ndim != 2:
      raise ValueError(
        f"party {self.name!r}: x must be [n, d], got shape "
        f"{x.shape}. Reshape with x.reshape(len(x), -1)."
      )
    if x.shape[0] != ids.shape[0]:
      raise ValueError(
        f"party {self.name!r}: x has {x.shape[0]} rows but ids "
        f"has {ids.shape[0]} entries; expected one id per row."
      )
    uniq, counts = np.unique(ids, return_counts=True)
    if uniq.size != ids.size:
      dup = uniq[counts > 1][:3].tolist()
      raise ValueError(
        f"party {self.name!r}: duplicate sample ids {dup} "
        f"({ids.size - uniq.size} duplicates); every row needs "
        "its own id, or alignment would be ambiguous. "
        "Deduplicate the table first."
      )
    if not np.all(np.isfinite(x)):
      raise ValueError(f"party {self.name!r}: x has non-finite values.")
    object.__setattr__(self, "ids", ids)
    object.__setattr__(self, "x", x)
    if self.y is not None:
      y = np.asarray(self.y)
      if y.shape != (ids.shape[0],):
        raise ValueError(
          f"party {self.name!r}: y has shape {y.shape}, "
          f"expected ({ids.shape[0]},) (one label per row)."
        )
      object.__setattr__(self, "y", y)

  @property
  def num_examples(self) -> int:
    return int(self.ids.shape[0])

  @property
  def num_features(self) -> int:
    return int(self.x.shape[1])


@dataclasses.dataclass(frozen=True)
class AlignedData:
  """Parties' rows in one common order (the output of PSI alignment).

  Attributes:
    xs: per party ``[n, d_k]`` float32 features, row ``i`` is the same sample
      for every party.
    y: ``[n]`` the guest's labels in that order.
    ids: the common ids in that order (held by every party after PSI).
    names: the parties' names.
    guest: index of the label holder.
  """

  xs: tuple[np.ndarray, ...]
  y: np.ndarray
  ids: np.ndarray
  names: tuple[str, ...]
  guest: int = 0

  def __post_init__(self):
    n = self.y.shape[0]
    for name, x in zip(self.names, self.xs):
      if x.shape[0] != n:
        raise ValueError(
          f"party {name!r} has {x.shape[0]} aligned rows, the "
          f"labels have {n}: the rows are misaligned."
        )

  @property
  def num_examples(self) -> int:
    return int(self.y.shape[0])

  @property
  def feature_dims(self) -> tuple[int, ...]:
    return tuple(int(x.shape[1]) for x in self.xs)

  def joined(self) -> np.ndarray:
    """``[n, sum d_k]`` the centralized table (for references only)."""
    return np.concatenate(self.xs, axis=1)

  def take(self, idx: np.ndarray) -> "AlignedData":
    """The aligned rows ``idx`` (integers in ``[0, n)``; a negative one
    would silently wrap to another row, so it is a ``ValueError``)."""
    idx = checks.index_array(
      "idx", idx, self.num_examples, what="row", of="the aligned data"
    )
    return dataclasses.replace(
      self, xs=tuple(x[idx] for x in self.xs), y=self.y[idx], ids=self.ids[idx]
    )

  def split(
    self, test_fraction: float = 0.2, seed: int = 0
  ) -> tuple["AlignedData", "AlignedData"]:
    """Random train/test split of the aligned rows (the guest draws it and
    announces the row indices)."""
    if not 0.0 < test_fraction < 1.0:
      raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
    perm = np.random.default_rng(seed).permutation(self.num_examples)
    num_test = max(1, int(round(test_fraction * self.num_examples)))
    return self.take(np.sort(perm[num_test:])), self.take(
      np.sort(perm[:num_test])
    )


@dataclasses.dataclass(frozen=True)
class VerticalDataset:
  """Parties over (partly) the same samples; ``parties[guest]`` has labels.

  Raises ValueError for: fewer than two parties, a guest without labels
  (``require_labels``), labels on a non-guest party, or parties whose ids mix
  strings and integers (they could never match).
  """

  parties: tuple[Party, ...]
  guest: int = 0
  require_labels: bool = True

  def __post_init__(self):
    parties = tuple(self.parties)
    object.__setattr__(self, "parties", parties)
    if len(parties) < 2:
      raise ValueError(
        f"a VerticalDataset needs at least 2 parties, got {len(parties)}."
      )
    if not all(isinstance(p, Party) for p in parties):
      raise TypeError("parties must be vertical.Party objects.")
    names = [p.name for p in parties]
    if len(set(names)) != len(names):
      raise ValueError(f"party names must be unique, got {names}.")
    if not 0 <= self.guest < len(parties):
      raise ValueError(
        f"guest={self.guest} is not a party index in [0, {len(parties)})."
      )
    g = parties[self.guest]
    if self.require_labels and g.y is None:
      raise ValueError(
        f"the guest party {g.name!r} (index {self.guest}) has "
        "no label column (y=None); the guest must hold the "
        "labels. Pass Party(..., y=labels) or set guest= to the "
        "label holder."
      )
    for i, p in enumerate(parties):
      if i != self.guest and p.y is not None:
        raise ValueError(
          f"party {p.name!r} is not the guest but holds labels; "
          "only one party (the guest) may hold them. Drop its y "
          "or make it the guest."
        )
    kinds = {p.name: id_kind(p.ids, f"party {p.name!r}") for p in parties}
    if len(set(kinds.values())) > 1:
      raise TypeError(
        f"parties use different id types {kinds}; ids match "
        "only when every party uses the same type (e.g. all "
        "str). Convert with ids.astype(str)."
      )

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(p.name for p in self.parties)

  def align(self, *, seed: int | None = None):
    """Runs ECDH PSI and returns ``(AlignedData, PsiResult)``.

    Raises ValueError when the parties share no ids.
    """
    from fedjax_lite.vertical import psi as _psi  # pylint: disable=g-import-not-at-top

    result = _psi.ecdh_psi(
      [p.ids for p in self.parties],
      names=self.names,
      guest=self.guest,
      seed=seed,
    )
    return align_rows(self, result.rows), result


def align_rows(ds: VerticalDataset, rows: Sequence[np.ndarray]) -> AlignedData:
  """Gathers every party's rows ``rows[k]`` (one common order) and checks that
  the ids agree row by row (a failing check means a broken alignment)."""
  if len(rows) != len(ds.parties):
    raise ValueError(
      f"got row indices for {len(rows)} parties, the dataset "
      f"has {len(ds.parties)}."
    )
  lengths = {p.name: len(r) for p, r in zip(ds.parties, rows)}
  if len(set(lengths.values())) != 1:
    raise ValueError(
      f"aligned row counts differ between parties {lengths}; "
      "every party must keep the same samples."
    )
  ids = [p.ids[np.asarray(r, np.int64)] for p, r in zip(ds.parties, rows)]
  for p, i in zip(ds.parties, ids):
    if not np.array_equal(i, ids[0]):
      raise ValueError(
        f"party {p.name!r}'s aligned ids differ from "
        f"{ds.parties[0].name!r}'s: misaligned rows."
      )
  g = ds.parties[ds.guest]
  return AlignedData(
    xs=tuple(p.x[np.asarray(r, np.int64)] for p, r in zip(ds.parties, rows)),
    y=g.y[np.asarray(rows[ds.guest], np.int64)],
    ids=ids[0],
    names=ds.names,
    guest=ds.guest,
  )


def split_vertical(
  x: np.ndarray,
  y: np.ndarray,
  *,
  feature_splits: Sequence[Sequence[int]] | int = 2,
  keep: float | Sequence[float] = 0.9,
  names: Sequence[str] | None = None,
  guest: int = 0,
  id_type: str = "str",
  standardize: bool = True,
  seed: int = 0,
) -> VerticalDataset:
  """Splits a centralized table into parties with partly overlapping ids.

  Party ``k`` gets the columns ``feature_splits[k]`` (an int ``m`` splits the
  columns into ``m`` contiguous nearly equal blocks) of an independent random
  ``keep[k]`` share of the rows, in its own random order; only the guest keeps
  ``y``. With ``keep = 0.9`` for two parties about 81% of the samples are
  common. ``standardize`` z-scores each party's columns with that party's own
  rows (what each party can do alone).

  Args:
    x: ``[n, d]`` (or ``[n, ...]``, flattened) features.
    y: ``[n]`` labels.
    feature_splits: column indices per party, or the number of parties.
    keep: share of rows each party holds (one value or one per party).
    names: party names (default ``party0``, ``party1``, ...).
    guest: the index of the label holder.
    id_type: ``"str"`` (ids like ``"u000123"``) or ``"int"``.
    standardize: per-party z-scoring of the columns.
    seed: seeds the row subsets and orders.
  """
  x = np.asarray(x, np.float32).reshape(len(x), -1)
  y = np.asarray(y)
  n, d = x.shape
  if isinstance(feature_splits, int):
    feature_splits = [
      b.tolist() for b in np.array_split(np.arange(d), feature_splits)
    ]
  cols = [np.asarray(c, np.int64) for c in feature_splits]
  num_parties = len(cols)
  if any(c.size == 0 or c.min() < 0 or c.max() >= d for c in cols):
    raise ValueError(
      f"feature_splits must be non-empty column indices in "
      f"[0, {d}), got {[c.tolist() for c in cols]}."
    )
  keeps = np.broadcast_to(np.asarray(keep, np.float64), (num_parties,))
  if np.any(keeps <= 0) or np.any(keeps > 1):
    raise ValueError(f"keep must be in (0, 1], got {keep}.")
  names = (
    tuple(names)
    if names is not None
    else tuple(f"party{k}" for k in range(num_parties))
  )
  if len(names) != num_parties:
    raise ValueError(f"{len(names)} names for {num_parties} parties.")
  if id_type == "str":
    all_ids = np.asarray([f"u{i:06d}" for i in range(n)])
  elif id_type == "int":
    all_ids = np.arange(n, dtype=np.int64) * 7919 + 100003
  else:
    raise ValueError(f"id_type must be 'str' or 'int', got {id_type!r}.")
  rng = np.random.default_rng(seed)
  parties = []
  for k in range(num_parties):
    m = max(1, int(round(keeps[k] * n)))
    rows = rng.permutation(n)[:m]  # own subset, own order
    xk = x[rows][:, cols[k]]
    if standardize:
      mu, sd = xk.mean(0), xk.std(0)
      xk = (xk - mu) / np.where(sd > 0, sd, 1.0)
    parties.append(
      Party(
        names[k],
        all_ids[rows],
        xk.astype(np.float32),
        y[rows] if k == guest else None,
      )
    )
  return VerticalDataset(tuple(parties), guest=guest)


def breast_cancer_vertical(
  num_parties: int = 2, keep: float = 0.9, seed: int = 0, **kw
) -> VerticalDataset:
  """Wisconsin breast cancer (569 x 30, binary; ships with scikit-learn),
  columns split into ``num_parties`` blocks; labels ``y`` in {0, 1}."""
  sklearn_datasets = require("sklearn.datasets", "vertical")
  b = sklearn_datasets.load_breast_cancer()
  return split_vertical(
    b.data,
    b.target.astype(np.int32),
    feature_splits=num_parties,
    keep=keep,
    seed=seed,
    **kw,
  )


def digits_vertical(
  num_parties: int = 2,
  keep: float = 0.9,
  seed: int = 0,
  binary: bool = False,
  **kw,
) -> VerticalDataset:
  """8x8 digits (1797 x 64; ships with scikit-learn), pixel columns split
  into ``num_parties`` blocks (with 2: left and right image halves). Labels
  are the digit, or with ``binary`` whether the digit is >= 5."""
  sklearn_datasets = require("sklearn.datasets", "vertical")
  b = sklearn_datasets.load_digits()
  y = b.target.astype(np.int32)
  if binary:
    y = (y >= 5).astype(np.int32)
  if num_parties == 2 and "feature_splits" not in kw:
    cols = np.arange(64).reshape(8, 8)
    kw["feature_splits"] = [
      cols[:, :4].ravel().tolist(),
      cols[:, 4:].ravel().tolist(),
    ]
  else:
    kw.setdefault("feature_splits", num_parties)
  return split_vertical(
    b.data / 16.0, y, keep=keep, seed=seed, standardize=False, **kw
  )
