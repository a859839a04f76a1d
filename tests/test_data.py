"""Packed datasets, padding buckets, sampling and device-side gathering."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_lite as fl
from fedjax_lite.data import batching


def clients_of(rng, sizes, d=3):
  return [
    {
      "x": rng.standard_normal((n, d)).astype(np.float32),
      "y": rng.integers(0, 4, n).astype(np.int32),
    }
    for n in sizes
  ]


# ------------------------------------------------------------ FederatedDataset
def test_from_clients_packs_and_roundtrips(rng):
  clients = clients_of(rng, [3, 1, 5])
  ds = fl.FederatedDataset.from_clients(clients)
  assert ds.num_clients == 3 and ds.num_examples == 9
  np.testing.assert_array_equal(ds.counts, [3, 1, 5])
  np.testing.assert_array_equal(ds.offsets, [0, 3, 4])
  for k, c in enumerate(clients):
    np.testing.assert_array_equal(ds.client(k)["x"], c["x"])
    np.testing.assert_array_equal(ds.client(k)["y"], c["y"])
  named = fl.FederatedDataset.from_clients(
    {"alice": clients[0], "bob": clients[1]}
  )
  assert named.client_ids == ("alice", "bob")


def test_from_partition_and_subset(rng):
  x = np.arange(20, dtype=np.float32).reshape(10, 2)
  y = np.arange(10) % 3
  ds = fl.FederatedDataset.from_partition(
    {"x": x, "y": y}, [[9, 0], [3], [4, 5, 6]]
  )
  np.testing.assert_array_equal(ds.client(0)["x"], x[[9, 0]])
  np.testing.assert_array_equal(ds.client(2)["y"], y[[4, 5, 6]])
  sub = ds.subset([2, 0])
  np.testing.assert_array_equal(sub.client(0)["x"], x[[4, 5, 6]])
  np.testing.assert_array_equal(sub.counts, [3, 2])


def test_summary_reports_quantiles_and_label_skew():
  x = np.zeros((8, 1), np.float32)
  y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
  ds = fl.FederatedDataset.from_partition(
    {"x": x, "y": y}, [[0, 1], [2, 3], [4, 5, 6, 7]]
  )
  s = ds.summary()
  assert s["examples_per_client"]["max"] == 4
  assert s["classes_per_client"]["max"] == 1
  # Each client holds one class of two equally likely ones: TV distance 0.5.
  np.testing.assert_allclose(s["label_skew_tv"]["mean"], 0.5)


@pytest.mark.parametrize(
  "bad,match",
  [
    (
      [{"x": np.zeros((3, 2)), "y": np.zeros(2, int)}],
      "mismatched feature lengths",
    ),
    ([{"x": np.zeros((0, 2)), "y": np.zeros(0, int)}], "0 examples"),
    (
      [{"x": np.zeros((2, 2)), "y": np.zeros(2, int)}, {"x": np.zeros((2, 2))}],
      "features",
    ),
    ([{"x": np.array([[1.0, np.nan]]), "y": np.zeros(1, int)}], "NaN"),
    ([], "empty"),
  ],
)
def test_bad_clients_get_clear_errors(bad, match):
  with pytest.raises(ValueError, match=match):
    fl.FederatedDataset.from_clients(bad)


def test_bad_partition_errors():
  x = np.zeros((4, 1), np.float32)
  with pytest.raises(ValueError, match="partition\\[1\\] is empty"):
    fl.FederatedDataset.from_partition({"x": x}, [[0], []])
  with pytest.raises(ValueError, match="outside"):
    fl.FederatedDataset.from_partition({"x": x}, [[0, 7]])
  with pytest.raises(ValueError, match="different numbers of examples"):
    fl.FederatedDataset.from_partition({"x": x, "y": np.zeros(3)}, [[0]])


def test_non_integer_labels_rejected_by_model():
  model = fl.models.logistic_regression(2, 3)
  with pytest.raises(ValueError, match="integer class indices"):
    model.validate_labels(np.array([0.0, 1.5]))
  with pytest.raises(ValueError, match=r"expected values in \[0, 3\)"):
    model.validate_labels(np.array([0, 3]))


# ------------------------------------------------------------------ LocalWork
def test_local_work_plans_and_validation():
  assert fl.LocalWork(batch_size=10, num_epochs=2).plan(25) == (6, 10)
  assert fl.LocalWork(batch_size=None, num_epochs=3).plan(25) == (3, 25)
  assert fl.LocalWork(batch_size=4, num_steps=7).plan(25) == (7, 4)
  with pytest.raises(ValueError, match="batch_size"):
    fl.LocalWork(batch_size=0)
  with pytest.raises(ValueError, match="num_epochs"):
    fl.LocalWork(num_epochs=0)


# -------------------------------------------------------------------- buckets
def test_buckets_cut_padding_waste_on_power_law_sizes():
  rng = np.random.default_rng(1)
  counts = np.minimum((rng.pareto(1.2, 3000) + 1) * 5, 5000).astype(int)
  work = fl.LocalWork(batch_size=10, num_epochs=1)
  sizes = fl.data.choose_buckets(counts, work)
  report = fl.data.padding_report(counts, work, sizes)
  assert report["waste_one_bucket"] > 0.99
  assert report["waste"] < report["waste_one_bucket"] / 3
  assert len(sizes) <= 8 and sizes[-1] == counts.max()
  # Waste never grows with more buckets.
  wastes = [
    fl.data.padding_report(
      counts, work, fl.data.choose_buckets(counts, work, k)
    )["waste"]
    for k in (1, 2, 4, 8)
  ]
  assert all(a >= b - 1e-12 for a, b in zip(wastes, wastes[1:]))


def test_bucket_choice_is_optimal_by_brute_force():
  import itertools

  rng = np.random.default_rng(2)
  counts = rng.choice(
    [3, 5, 8, 13, 21, 34, 55, 89, 144],
    200,
    p=[0.3, 0.2, 0.15, 0.1, 0.08, 0.07, 0.05, 0.03, 0.02],
  )
  work = fl.LocalWork(batch_size=4, num_epochs=1)
  uniq = np.unique(counts)
  for k in (2, 3):
    best = min(
      fl.data.padding_report(counts, work, tuple(c) + (uniq[-1],))["waste"]
      for c in itertools.combinations(uniq[:-1], k - 1)
    )
    got = fl.data.padding_report(
      counts, work, fl.data.choose_buckets(counts, work, k)
    )
    np.testing.assert_allclose(got["waste"], best, rtol=1e-12)


def test_explicit_buckets_validated(rng):
  ds = fl.FederatedDataset.from_clients(clients_of(rng, [2, 9]))
  with pytest.raises(ValueError, match="ascending"):
    fl.data.to_device(ds, fl.LocalWork(), buckets=(4, 8))


# ------------------------------------------------------------------ gathering
@pytest.mark.parametrize("shuffle", [True, False])
def test_gather_epochs_visits_every_example_once_per_epoch(rng, shuffle):
  sizes = [7, 3, 12]
  clients = clients_of(rng, sizes)
  for c in clients:  # make rows identifiable
    c["x"][:, 0] = np.arange(c["x"].shape[0])
  ds = fl.FederatedDataset.from_clients(clients)
  work = fl.LocalWork(batch_size=4, num_epochs=2, shuffle=shuffle)
  data = fl.data.to_device(ds, work, buckets=(12,))
  for k, n in enumerate(sizes):
    cd = fl.data.gather_client(
      data, jnp.int32(k), jax.random.PRNGKey(k), work, 12
    )
    assert cd.mask.shape == (6, 4)
    rows = np.asarray(cd.batches["x"][..., 0]).reshape(2, 12)
    mask = np.asarray(cd.mask).reshape(2, 12)
    for e in range(2):
      got = np.sort(rows[e][mask[e]])
      np.testing.assert_array_equal(got, np.arange(n))
      if not shuffle:
        np.testing.assert_array_equal(rows[e][:n], np.arange(n))
    assert int(cd.num_examples) == n


def test_gather_fixed_steps_cycles_through_data(rng):
  clients = clients_of(rng, [5])
  clients[0]["x"][:, 0] = np.arange(5)
  ds = fl.FederatedDataset.from_clients(clients)
  work = fl.LocalWork(batch_size=3, num_steps=4, shuffle=False)
  data = fl.data.to_device(ds, work)
  cd = fl.data.gather_client(data, jnp.int32(0), jax.random.PRNGKey(0), work, 5)
  assert cd.batches["x"].shape == (4, 3) + clients[0]["x"].shape[1:]
  assert cd.batches["y"].shape == (4, 3) and cd.mask.shape == (4, 3)
  np.testing.assert_array_equal(
    np.asarray(cd.batches["x"][..., 0]), (np.arange(12) % 5).reshape(4, 3)
  )
  assert bool(np.asarray(cd.mask).all())
  # Full batch for a fixed number of steps: every step sees all 5 examples.
  full = fl.LocalWork(batch_size=None, num_steps=2, shuffle=False)
  cd = fl.data.gather_client(
    fl.data.to_device(ds, full), jnp.int32(0), jax.random.PRNGKey(0), full, 5
  )
  assert cd.batches["x"].shape == (2, 5) + clients[0]["x"].shape[1:]
  np.testing.assert_array_equal(
    np.asarray(cd.batches["x"][..., 0]), np.tile(np.arange(5), (2, 1))
  )


def test_random_order_matches_argsort():
  keys = jax.random.uniform(jax.random.PRNGKey(0), (5, 40))
  keys = keys.at[0, 3].set(keys[0, 7])  # a tie
  np.testing.assert_array_equal(
    np.asarray(batching._random_order(keys)),  # pylint: disable=protected-access
    np.argsort(np.asarray(keys), axis=-1, kind="stable"),
  )


# ------------------------------------------------------------------- sampling
def test_uniform_sampling_without_replacement():
  ids = np.asarray(fl.data.sample_clients(jax.random.PRNGKey(0), 50, 20))
  assert len(set(ids.tolist())) == 20 and ids.min() >= 0 and ids.max() < 50
  counts = np.zeros(10)
  for s in range(400):
    counts[
      np.asarray(fl.data.sample_clients(jax.random.PRNGKey(s), 10, 3))
    ] += 1
  # Each client is chosen with probability 3/10 each round.
  assert np.all(np.abs(counts / 400 - 0.3) < 0.08)


def test_weighted_sampling_follows_weights():
  w = jnp.asarray([1.0, 1.0, 1.0, 7.0])
  first = np.zeros(4)
  for s in range(1000):
    ids = np.asarray(fl.data.sample_clients(jax.random.PRNGKey(s), 4, 2, w))
    assert len(set(ids.tolist())) == 2
    first[ids[0]] += 1
  # Gumbel-top-k: the first pick is drawn proportionally to the weights.
  np.testing.assert_allclose(first / 1000, np.asarray(w) / 10, atol=0.04)


def test_too_many_clients_per_round_errors(rng):
  ds = fl.FederatedDataset.from_clients(clients_of(rng, [2, 3]))
  model = fl.models.logistic_regression(3, 4)
  import optax

  engine = fl.Engine(fl.fed_avg(model, optax.sgd(0.1)), fl.RoundConfig(5))
  data = engine.put_data(ds)
  with pytest.raises(
    ValueError, match="clients_per_round=5 is larger than the population of 2"
  ):
    engine.round(engine.init(model.init(jax.random.PRNGKey(0))), data)
  with pytest.raises(ValueError, match="larger than the population"):
    fl.data.sample_clients(jax.random.PRNGKey(0), 2, 5)
