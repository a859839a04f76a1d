"""Synthetic generators (FedProx, LEAF) and the digits dataset.

Statistics are checked against the generative process written out in float64
numpy (CDFs, label rules, moments) on fresh draws.
"""

import math

import numpy as np
import pytest

import fedjax_lite as fl
from fedjax_lite.datasets import synthetic


def _norm_cdf(z):
  return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def _clients(ds):
  return [ds.client(k) for k in range(ds.num_clients)]


def _assert_same(a, b):
  assert a.num_clients == b.num_clients
  np.testing.assert_array_equal(a.counts, b.counts)
  for k in a.features:
    np.testing.assert_array_equal(a.features[k], b.features[k])


# -------------------------------------------------------------- FedProx
@pytest.mark.parametrize("iid", [False, True])
def test_fedprox_deterministic_under_seed(iid):
  a = synthetic.fedprox_synthetic(0.5, 0.5, iid=iid, num_clients=6, seed=3)
  b = synthetic.fedprox_synthetic(0.5, 0.5, iid=iid, num_clients=6, seed=3)
  c = synthetic.fedprox_synthetic(0.5, 0.5, iid=iid, num_clients=6, seed=4)
  for x, y in zip(a, b):
    _assert_same(x, y)
  assert not np.array_equal(a[0].features["x"][:10], c[0].features["x"][:10])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("iid", [False, True])
def test_fedprox_labels_follow_argmax_rule_on_fresh_draws(seed, iid):
  train, test, p = synthetic.fedprox_synthetic(
    1.0, 1.0, iid=iid, num_clients=12, seed=seed, return_params=True
  )
  for ds in (train, test):
    for k, c in enumerate(_clients(ds)):
      logits = c["x"].astype(np.float64) @ p["w"][k] + p["b"][k]
      np.testing.assert_array_equal(c["y"], np.argmax(logits, axis=1))
  if iid:  # one shared model, v_k = 0
    assert np.all(p["w"] == p["w"][:1]) and np.all(p["b"] == p["b"][:1])
    assert np.all(p["v"] == 0)


def test_fedprox_sample_counts_follow_lognormal_plus_50():
  _, _, p = synthetic.fedprox_synthetic(
    num_clients=3000,
    num_features=2,
    num_classes=2,
    test_fraction=0.0,
    seed=5,
    return_params=True,
  )
  n = p["counts"]
  assert n.min() >= 50
  # P(floor(L) + 50 <= m) = P(L < m - 49) = Phi((ln(m - 49) - 4) / 2).
  for m in (55, 70, 100, 200, 500, 2000, 20000):
    want = _norm_cdf((math.log(m - 49) - 4.0) / 2.0)
    assert abs(np.mean(n <= m) - want) < 0.03, m


def test_fedprox_generative_moments():
  alpha, beta, d = 0.5, 2.0, 20
  train, _, p = synthetic.fedprox_synthetic(
    alpha,
    beta,
    num_clients=1500,
    num_features=d,
    num_classes=5,
    examples_per_client=40,
    test_fraction=0.0,
    seed=7,
    return_params=True,
  )
  k = p["u"].size
  # u_k ~ N(0, alpha), B_k ~ N(0, beta) (standard deviations).
  assert abs(p["u"].std() - alpha) < 4 * alpha / math.sqrt(2 * k)
  assert abs(p["big_b"].std() - beta) < 4 * beta / math.sqrt(2 * k)
  # W_k, b_k ~ N(u_k, 1) share u_k; v_k ~ N(B_k, 1).
  w_mean = p["w"].reshape(k, -1).mean(1)
  assert np.abs(w_mean - p["u"]).max() < 5 / math.sqrt(d * 5)
  assert np.corrcoef(p["b"].mean(1), p["u"])[0, 1] > 0.5
  assert np.abs(p["v"].mean(1) - p["big_b"]).max() < 5 / math.sqrt(d)
  # x ~ N(v_k, Sigma), Sigma_jj = (j + 1)^-1.2.
  x = train.features["x"].astype(np.float64).reshape(k, 40, d)
  var = ((x - p["v"][:, None]) ** 2).reshape(-1, d).mean(0)
  want = np.arange(1, d + 1, dtype=np.float64) ** -1.2
  np.testing.assert_allclose(var, want, rtol=0.05)


def test_fedprox_split_is_first_90_percent_of_each_client():
  full, none = synthetic.fedprox_synthetic(
    num_clients=8, test_fraction=0.0, seed=2
  )
  assert none is None
  train, test = synthetic.fedprox_synthetic(num_clients=8, seed=2)
  n = full.counts
  np.testing.assert_array_equal(train.counts, np.floor(0.9 * n))
  np.testing.assert_array_equal(train.counts + test.counts, n)
  for k in range(8):
    both = np.concatenate([train.client(k)["x"], test.client(k)["x"]])
    np.testing.assert_array_equal(both, full.client(k)["x"])


def test_iid_and_non_iid_differ_in_label_skew():
  skew = {}
  for iid in (False, True):
    train, _ = synthetic.fedprox_synthetic(
      1.0, 1.0, iid=iid, num_clients=60, seed=1
    )
    skew[iid] = train.summary()["label_skew_tv"]["mean"]
  assert skew[False] > 2 * skew[True]
  assert skew[False] > 0.4


def test_fedprox_scales_to_many_clients():
  train, test = synthetic.fedprox_synthetic(
    num_clients=200_000,
    num_features=3,
    num_classes=2,
    examples_per_client=2,
    seed=0,
  )
  assert train.num_clients == test.num_clients == 200_000
  assert np.all(train.counts == 1) and np.all(test.counts == 1)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(alpha=-1.0), "alpha and beta"),
    (dict(num_clients=0), "num_clients"),
    (dict(num_features=2.5), "num_features"),
    (dict(test_fraction=1.0), "test_fraction"),
    (dict(examples_per_client=1), "at least 2"),
  ],
)
def test_fedprox_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    synthetic.fedprox_synthetic(**kwargs)


# ----------------------------------------------------------------- LEAF
def test_leaf_deterministic_under_seed():
  a = synthetic.leaf_synthetic(20, seed=9)
  b = synthetic.leaf_synthetic(20, seed=9)
  for x, y in zip(a, b):
    _assert_same(x, y)


@pytest.mark.parametrize("seed", [0, 1])
def test_leaf_labels_follow_rule_without_noise(seed):
  train, test, p = synthetic.leaf_synthetic(
    30,
    4,
    7,
    prob_clusters=(0.3, 0.7),
    label_noise=0.0,
    seed=seed,
    return_params=True,
  )
  np.testing.assert_allclose(p["w"], np.einsum("icj,kj->kic", p["Q"], p["u"]))
  assert np.abs(p["u"] - p["cluster_means"][p["cluster"]]).max() < 0.6
  for ds in (train, test):
    for k, c in enumerate(_clients(ds)):
      xt = np.concatenate(
        [np.ones((c["x"].shape[0], 1)), c["x"].astype(np.float64)], axis=1
      )
      np.testing.assert_array_equal(c["y"], np.argmax(xt @ p["w"][k], 1))


def test_leaf_noise_flips_few_labels():
  train, _, p = synthetic.leaf_synthetic(100, seed=4, return_params=True)
  agree = []
  for k, c in enumerate(_clients(train)):
    z = c["x"].astype(np.float64) @ p["w"][k][1:] + p["w"][k][0]
    agree.append(np.argmax(z, 1) == c["y"])
  assert 0.8 < np.concatenate(agree).mean() < 1.0


def test_leaf_column_softmax_reproduces_released_generator():
  full, _, p = synthetic.leaf_synthetic(
    10,
    3,
    5,
    label_noise=0.0,
    column_softmax=True,
    test_fraction=0.0,
    seed=2,
    return_params=True,
  )
  for k, c in enumerate(_clients(full)):
    z = c["x"].astype(np.float64) @ p["w"][k][1:] + p["w"][k][0]
    prob = np.exp(z) / np.exp(z).sum(axis=0, keepdims=True)  # over examples
    np.testing.assert_array_equal(c["y"], np.argmax(prob, axis=1))


def test_leaf_sample_counts():
  _, _, p = synthetic.leaf_synthetic(
    4000, 2, 2, test_fraction=0.0, seed=6, return_params=True
  )
  n = p["counts"]
  assert n.min() >= 5 and n.max() <= 1000
  for m in (6, 10, 30, 100, 500):
    want = _norm_cdf((math.log(m - 4) - 3.0) / 2.0)
    assert abs(np.mean(n <= m) - want) < 0.03, m
  want_cap = 1 - _norm_cdf((math.log(995) - 3.0) / 2.0)
  assert abs(np.mean(n == 1000) - want_cap) < 0.02


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(prob_clusters=(0.5, 0.6)), "sum to 1"),
    (dict(min_examples=10, max_examples=5), "smaller than"),
    (dict(label_noise=-0.1), "label_noise"),
    (dict(num_classes=0), "num_classes"),
  ],
)
def test_leaf_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    synthetic.leaf_synthetic(5, **kwargs)


# --------------------------------------------------------------- digits
@pytest.mark.parametrize(
  "partition", ["iid", "dirichlet", "shards", "power_law"]
)
def test_digits_partitions_every_image_once(partition):
  train, test = fl.datasets.digits(10, partition, seed=1)
  assert train.client_ids == test.client_ids and train.num_clients == 10
  assert train.features["x"].shape[1:] == (8, 8, 1)
  assert train.num_examples + test.num_examples == 1797
  ref = fl.datasets.load_digits_arrays()
  key = lambda x: np.round(x.reshape(x.shape[0], -1) * 16).astype(np.int64)
  both = np.concatenate([train.features["x"], test.features["x"]])
  got = np.unique(
    np.concatenate(
      [
        key(both),
        np.concatenate([train.features["y"], test.features["y"]])[:, None],
      ],
      1,
    ),
    axis=0,
  )
  want = np.unique(
    np.concatenate([key(ref["x"]), ref["y"][:, None]], 1), axis=0
  )
  np.testing.assert_array_equal(got, want)


def test_digits_unknown_partition():
  with pytest.raises(ValueError, match="partition must be one of"):
    fl.datasets.digits(5, "zipf")
