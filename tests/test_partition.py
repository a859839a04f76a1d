"""Partitioners: every example once, seeded, the advertised skew, errors."""

import numpy as np
import pytest

import fedjax_lite as fl
from fedjax_lite.datasets import partition as part


def centralised(num_classes=10, per_class=30, seed=0):
  """``id`` tracks every example through a partition."""
  y = np.repeat(np.arange(num_classes), per_class).astype(np.int32)
  perm = np.random.default_rng(seed).permutation(y.size)
  return {
    "id": np.arange(y.size),
    "x": np.random.default_rng(seed)
    .normal(size=(y.size, 3))
    .astype(np.float32),
    "y": y[perm],
  }


def ids_per_client(ds):
  return [ds.client(k)["id"] for k in range(ds.num_clients)]


PARTITIONERS = {
  "iid": lambda f, s: part.iid_partition(f, 12, seed=s),
  "dirichlet": lambda f, s: part.dirichlet_partition(f, 12, 0.3, seed=s),
  "shards": lambda f, s: part.shard_partition(f, 12, 2, seed=s),
  "power_law": lambda f, s: part.power_law_partition(f, 12, 1.2, seed=s),
}


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
def test_every_example_exactly_once_and_rows_consistent(name):
  f = centralised()
  ds = PARTITIONERS[name](f, 0)
  assert isinstance(ds, fl.FederatedDataset) and ds.num_clients == 12
  assert ds.client_ids == tuple(str(k) for k in range(12))
  ids = np.concatenate(ids_per_client(ds))
  np.testing.assert_array_equal(np.sort(ids), np.arange(f["y"].size))
  for k in range(ds.num_clients):  # features stay aligned with their ids
    c = ds.client(k)
    np.testing.assert_array_equal(c["y"], f["y"][c["id"]])
    np.testing.assert_array_equal(c["x"], f["x"][c["id"]])


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
def test_seeded(name):
  f = centralised()
  a, b, c = (PARTITIONERS[name](f, s) for s in (1, 1, 2))
  for u, v in zip(ids_per_client(a), ids_per_client(b)):
    np.testing.assert_array_equal(u, v)
  assert any(
    not np.array_equal(u, v)
    for u, v in zip(ids_per_client(a), ids_per_client(c))
  )


def label_hist(ds, num_classes):
  return np.stack(
    [
      np.bincount(ds.client(k)["y"], minlength=num_classes)
      for k in range(ds.num_clients)
    ]
  )


def test_iid_sizes_and_labels():
  ds = part.iid_partition(centralised(per_class=100), 10, seed=0)
  assert ds.counts.max() - ds.counts.min() <= 1
  assert ds.summary()["label_skew_tv"]["mean"] < 0.25


def test_dirichlet_alpha_controls_label_skew():
  f = centralised(per_class=200)
  skew = {
    a: part.dirichlet_partition(f, 20, a, seed=0).summary()
    for a in (0.05, 1.0, 1000.0)
  }
  tv = {a: s["label_skew_tv"]["mean"] for a, s in skew.items()}
  assert tv[0.05] > tv[1.0] > tv[1000.0]
  assert tv[1000.0] < 0.15 and tv[0.05] > 0.6
  assert skew[0.05]["classes_per_client"]["mean"] < 5


def test_dirichlet_shares_match_the_dirichlet_mean():
  # E[share of class c on client k] = 1/K for Dir(alpha 1_K): averaged over
  # classes and seeds every client gets about N/K examples.
  f = centralised(num_classes=10, per_class=100)
  sizes = np.mean(
    [part.dirichlet_partition(f, 5, 0.5, seed=s).counts for s in range(40)],
    axis=0,
  )
  np.testing.assert_allclose(sizes, f["y"].size / 5, rtol=0.15)


def test_dirichlet_min_examples_honoured():
  ds = part.dirichlet_partition(centralised(), 15, 0.1, min_examples=5, seed=3)
  assert ds.counts.min() >= 5


def test_dirichlet_gives_up_with_a_clear_error():
  with pytest.raises(ValueError, match="fewer than 25 examples"):
    part.dirichlet_partition(
      centralised(), 12, 0.01, min_examples=25, max_tries=3
    )


def test_shards_give_each_client_at_most_k_classes():
  f = centralised(num_classes=10, per_class=30)  # 30 shards of 10
  ds = part.shard_partition(f, 15, 2, seed=4)
  assert np.all(ds.counts == 20)
  hist = label_hist(ds, 10)
  assert ((hist > 0).sum(1) <= 2).all()
  assert ((hist > 0).sum(1) >= 1).all()
  assert ds.summary()["label_skew_tv"]["mean"] > 0.7


def test_power_law_sizes_match_float64_reference():
  f = centralised(per_class=100)
  n, k, a, m = f["y"].size, 9, 1.5, 3
  ds = part.power_law_partition(f, k, a, min_examples=m, seed=0)
  exact = m + (n - k * m) * np.arange(1, k + 1) ** -a / np.sum(
    np.arange(1, k + 1, dtype=np.float64) ** -a
  )
  got = np.sort(ds.counts)[::-1]
  assert got.sum() == n and got.min() >= m
  assert np.abs(got - exact).max() < 1.0
  assert np.ptp(part.power_law_partition(f, k, 0.0).counts) <= 1


def test_train_test_split_per_client():
  ds = part.dirichlet_partition(centralised(), 6, 1.0, min_examples=2, seed=0)
  train, test = part.train_test_split(ds, 0.25, seed=1)
  assert train.client_ids == test.client_ids == ds.client_ids
  np.testing.assert_array_equal(
    train.counts, np.clip(np.floor(0.75 * ds.counts), 1, ds.counts - 1)
  )
  for k in range(ds.num_clients):
    a, b = train.client(k)["id"], test.client(k)["id"]
    assert not set(a) & set(b)
    np.testing.assert_array_equal(
      np.sort(np.concatenate([a, b])), np.sort(ds.client(k)["id"])
    )


def test_describe_mentions_clients_sizes_and_skew():
  ds = part.shard_partition(centralised(), 10, 1, seed=0)
  text = part.describe(ds)
  assert text.startswith("10 clients, 300 examples")
  assert "label skew" in text and "median 30" in text


# ---------------------------------------------------------- malformed input
BAD = [
  (lambda: part.iid_partition({}, 3), TypeError, "non-empty dict"),
  (lambda: part.iid_partition([1, 2, 3], 3), TypeError, "non-empty dict"),
  (
    lambda: part.iid_partition({"x": np.zeros(5), "y": np.zeros(4)}, 2),
    ValueError,
    "different numbers of examples",
  ),
  (
    lambda: part.iid_partition({"x": np.zeros(5)}, 6),
    ValueError,
    "cannot give 6 clients",
  ),
  (
    lambda: part.iid_partition({"x": np.zeros(5)}, 0),
    ValueError,
    "num_clients must be a positive int",
  ),
  (
    lambda: part.dirichlet_partition({"x": np.zeros(5)}, 2, 1.0),
    KeyError,
    "label_key 'y' is not a feature",
  ),
  (
    lambda: part.dirichlet_partition({"y": np.zeros(6)}, 2, 1.0),
    ValueError,
    "integer class indices",
  ),
  (
    lambda: part.dirichlet_partition({"y": np.zeros((6, 2), int)}, 2, 1.0),
    ValueError,
    "shape",
  ),
  (
    lambda: part.dirichlet_partition({"y": -np.ones(6, int)}, 2, 1.0),
    ValueError,
    ">= 0",
  ),
  (
    lambda: part.dirichlet_partition({"y": np.zeros(6, int)}, 2, 0.0),
    ValueError,
    "alpha must be a positive",
  ),
  (
    lambda: part.dirichlet_partition(
      {"y": np.zeros(6, int)}, 2, 1.0, min_examples=0
    ),
    ValueError,
    "min_examples",
  ),
  (
    lambda: part.shard_partition({"y": np.zeros(6, int)}, 2, 0),
    ValueError,
    "shards_per_client",
  ),
  (
    lambda: part.shard_partition({"y": np.zeros(6, int)}, 4, 2),
    ValueError,
    "cannot give 4 clients 2",
  ),
  (
    lambda: part.power_law_partition({"y": np.zeros(6, int)}, 2, -1.0),
    ValueError,
    "exponent",
  ),
  (
    lambda: part.power_law_partition(
      {"y": np.zeros(6, int)}, 3, 1.0, min_examples=3
    ),
    ValueError,
    "cannot give 3 clients 3",
  ),
  (
    lambda: part.train_test_split(
      part.iid_partition({"y": np.zeros(3, int)}, 3), 0.5
    ),
    ValueError,
    "at least 2",
  ),
  (
    lambda: part.train_test_split(
      part.iid_partition({"y": np.zeros(6, int)}, 3), 1.5
    ),
    ValueError,
    "test_fraction",
  ),
]


@pytest.mark.parametrize("call, exc, match", BAD)
def test_malformed_input_has_clear_errors(call, exc, match):
  with pytest.raises(exc, match=match):
    call()
