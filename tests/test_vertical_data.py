"""Vertical datasets: splitting, PSI alignment, clear errors for bad input."""

import numpy as np
import pytest

from fedjax_lite import vertical as fv


def test_split_and_align_recovers_the_centralized_rows():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(120, 7)).astype(np.float32)
  y = rng.integers(0, 2, 120)
  ds = fv.split_vertical(
    x,
    y,
    feature_splits=[[0, 1, 2], [3, 4], [5, 6]],
    keep=[0.9, 0.8, 0.85],
    standardize=False,
    seed=1,
  )
  assert [p.y is not None for p in ds.parties] == [True, False, False]
  orders = [p.ids[:5].tolist() for p in ds.parties]
  assert orders[0] != orders[1]  # each party has its own order
  aligned, res = ds.align(seed=0)
  truth = set(ds.parties[0].ids).intersection(
    ds.parties[1].ids, ds.parties[2].ids
  )
  assert aligned.num_examples == res.size == len(truth)
  rows = np.asarray([int(i[1:]) for i in aligned.ids])
  np.testing.assert_array_equal(aligned.joined(), x[rows])
  np.testing.assert_array_equal(aligned.y, y[rows])
  train, test = aligned.split(0.25, seed=0)
  assert train.num_examples + test.num_examples == aligned.num_examples
  assert not set(train.ids.tolist()) & set(test.ids.tolist())


def test_int_ids_and_loaders():
  ds = fv.breast_cancer_vertical(2, keep=0.9, seed=0, id_type="int")
  assert ds.parties[0].ids.dtype == np.int64
  assert ds.parties[0].num_features + ds.parties[1].num_features == 30
  dg = fv.digits_vertical(2, binary=True)
  assert dg.parties[0].num_features == 32
  assert set(np.unique(dg.parties[0].y).tolist()) == {0, 1}


def _party(name, ids, d=2, y=None):
  return fv.Party(name, np.asarray(ids), np.ones((len(ids), d)), y)


def test_no_overlap_is_an_error():
  ds = fv.VerticalDataset(
    (_party("g", ["a", "b"], y=[0, 1]), _party("h", ["c", "d"]))
  )
  with pytest.raises(ValueError, match="share no sample ids"):
    ds.align(seed=0)


def test_duplicate_ids_are_an_error():
  with pytest.raises(
    ValueError, match=r"party 'h': duplicate sample ids \['a'\]"
  ):
    _party("h", ["a", "b", "a"])


def test_guest_without_labels_is_an_error():
  with pytest.raises(ValueError, match="has no label column"):
    fv.VerticalDataset((_party("g", ["a"]), _party("h", ["a"])))
  with pytest.raises(ValueError, match="not the guest but holds labels"):
    fv.VerticalDataset((_party("g", ["a"], y=[1]), _party("h", ["a"], y=[0])))


def test_mismatched_row_counts_are_errors():
  with pytest.raises(ValueError, match="x has 3 rows but ids has 2"):
    fv.Party("h", np.asarray(["a", "b"]), np.ones((3, 2)))
  with pytest.raises(ValueError, match=r"y has shape \(3,\)"):
    fv.Party("g", np.asarray(["a", "b"]), np.ones((2, 2)), np.zeros(3))
  with pytest.raises(ValueError, match="misaligned"):
    fv.AlignedData(
      xs=(np.ones((3, 2)), np.ones((2, 2))),
      y=np.zeros(3),
      ids=np.arange(3),
      names=("g", "h"),
    )


def test_mixed_id_types_are_an_error():
  with pytest.raises(TypeError, match="different id types"):
    fv.VerticalDataset((_party("g", ["1"], y=[1]), _party("h", [1])))


def test_aligned_take_checks_row_indices():
  aligned, _ = fv.breast_cancer_vertical(2, keep=0.9, seed=0).align(seed=0)
  n = aligned.num_examples
  assert aligned.take([0, n - 1]).num_examples == 2
  with pytest.raises(
    ValueError,
    match=rf"idx has row -1 at position 1; expected rows in "
    rf"\[0, {n}\) \(the {n} rows of the aligned data\)",
  ):
    aligned.take([0, -1])
  with pytest.raises(ValueError, match=r"idx must be 1-D integer row indices"):
    aligned.take(np.ones(n, bool))
