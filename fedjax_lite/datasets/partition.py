r"""Partitioners: split centralised data into a :class:`FederatedDataset`.

Each partitioner takes centralised features (``name -> [N, ...]``, the labels
int ``[N]`` under ``label_key``), a number of clients and a seed, and returns a
packed :class:`FederatedDataset` (client ids ``"0", "1", ...``). Call
``dataset.summary()`` for the number of clients, quantiles of examples per
client and the label-distribution skew (mean total-variation distance between
each client's label histogram and the global one), or :func:`describe` for
a printable line.

* :func:`iid_partition`: a random permutation cut into near-equal parts.
* :func:`dirichlet_partition`: label skew; for every class ``c`` a share
  vector ``q_c ~ Dir(alpha 1_K)`` over the ``K`` clients splits the class's
  examples (Yurochkin et al. 2019, arXiv:1905.12022; Li et al. 2022,
  "Federated Learning on Non-IID Data Silos", arXiv:2102.02079). Small
  ``alpha`` -> clients dominated by few classes; ``alpha -> inf`` -> IID.
* :func:`shard_partition`: pathological non-IID of the FedAvg paper (McMahan
  et al. 2017, arXiv:1602.05629): sort by label, cut into
  ``K * shards_per_client`` equal shards, give every client
  ``shards_per_client`` random shards, so each client sees at most that many
  classes when class sizes are multiples of the shard size.
* :func:`power_law_partition`: quantity skew with IID labels; client ``k`` of
  random rank ``r_k`` gets ``n_k = m + (N - K m) r_k^{-a} / \sum_r r^{-a}``
  examples (largest-remainder rounding, ``m`` = ``min_examples``).
* :func:`train_test_split`: a per-client train/test split of any dataset.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from fedjax_lite import checks
from fedjax_lite.data.federated_dataset import FederatedDataset


# ------------------------------------------------------------------ checks
def _num_examples(features: Mapping[str, np.ndarray]) -> int:
  if not isinstance(features, Mapping) or not features:
    raise TypeError(
      f"features must be a non-empty dict of arrays like "
      f"{{'x': x, 'y': y}}, got {type(features).__name__}."
    )
  lens = {}
  for k, v in features.items():
    a = np.asarray(v)
    if a.ndim == 0:
      raise ValueError(
        f"feature {k!r} is a scalar; expected an array with a "
        "leading example axis."
      )
    lens[k] = a.shape[0]
  if len(set(lens.values())) != 1:
    raise ValueError(
      f"features have different numbers of examples {lens}; "
      "expected one row per example in every feature."
    )
  return next(iter(lens.values()))


def _labels(features: Mapping[str, np.ndarray], label_key: str) -> np.ndarray:
  if label_key not in features:
    raise KeyError(
      f"label_key {label_key!r} is not a feature; features are "
      f"{sorted(features)}. Pass label_key=<name of the labels>."
    )
  y = np.asarray(features[label_key])
  if y.ndim != 1:
    raise ValueError(
      f"labels {label_key!r} have shape {y.shape}; expected "
      "int class indices of shape [num_examples] (convert "
      "one-hot labels with argmax(axis=1))."
    )
  if not np.issubdtype(y.dtype, np.integer):
    raise ValueError(
      f"labels {label_key!r} have dtype {y.dtype}; expected "
      "integer class indices (e.g. y.astype(np.int32))."
    )
  if y.size and y.min() < 0:
    raise ValueError(
      f"labels {label_key!r} contain {int(y.min())}; expected "
      "class indices >= 0."
    )
  return y


def _check_clients(num_clients, n: int, per_client: int = 1) -> None:
  checks.positive_int("num_clients", num_clients)
  if num_clients * per_client > n:
    raise ValueError(
      f"{n} examples cannot give {num_clients} clients "
      f"{per_client} example(s) each; use fewer clients."
    )


def _pack(features, parts) -> FederatedDataset:
  return FederatedDataset.from_partition(
    features, parts, [str(k) for k in range(len(parts))]
  )


# ------------------------------------------------------------ partitioners
def iid_partition(
  features: Mapping[str, np.ndarray], num_clients: int, *, seed: int = 0
) -> FederatedDataset:
  """Random, near-equal IID split (client sizes differ by at most one)."""
  n = _num_examples(features)
  _check_clients(num_clients, n)
  perm = np.random.default_rng(seed).permutation(n)
  return _pack(features, np.array_split(perm, num_clients))


def dirichlet_partition(
  features: Mapping[str, np.ndarray],
  num_clients: int,
  alpha: float,
  *,
  label_key: str = "y",
  min_examples: int = 1,
  max_tries: int = 1000,
  seed: int = 0,
) -> FederatedDataset:
  r"""Label-skewed split with per-class Dirichlet(alpha) client shares.

  For every class ``c`` with examples ``I_c`` (shuffled), draws
  ``q_c ~ Dir(alpha 1_K)`` and gives client ``k`` the next
  ``round(q_{c,k} |I_c|)`` of them (cumulative rounding, so every example is
  assigned). Draws are repeated until every client holds at least
  ``min_examples`` examples.

  Args:
    features: centralised arrays; ``features[label_key]`` int ``[N]``.
    num_clients: ``K``.
    alpha: Dirichlet concentration (> 0); 0.1 is strongly skewed, 100 is
      close to IID.
    label_key: the label feature.
    min_examples: minimum client size (>= 1).
    max_tries: redraws before giving up with an error.
    seed: numpy seed.
  """
  n = _num_examples(features)
  y = _labels(features, label_key)
  if not np.isfinite(alpha) or alpha <= 0:
    raise ValueError(f"alpha must be a positive finite number, got {alpha!r}.")
  checks.positive_int("min_examples", min_examples)
  _check_clients(num_clients, n, min_examples)
  rng = np.random.default_rng(seed)
  classes = np.unique(y)
  by_class = [rng.permutation(np.flatnonzero(y == c)) for c in classes]
  for _ in range(max_tries):
    parts = [[] for _ in range(num_clients)]
    for idx in by_class:
      q = rng.dirichlet(np.full(num_clients, float(alpha)))
      cuts = np.round(np.cumsum(q) * idx.size).astype(np.int64)[:-1]
      for k, piece in enumerate(np.split(idx, cuts)):
        parts[k].append(piece)
    parts = [np.concatenate(p) for p in parts]
    if min(p.size for p in parts) >= min_examples:
      return _pack(features, parts)
  raise ValueError(
    f"dirichlet_partition: after {max_tries} draws some client "
    f"still had fewer than {min_examples} examples "
    f"(alpha={alpha}, {num_clients} clients, {n} examples). "
    "Increase alpha, use fewer clients or lower min_examples."
  )


def shard_partition(
  features: Mapping[str, np.ndarray],
  num_clients: int,
  shards_per_client: int = 2,
  *,
  label_key: str = "y",
  seed: int = 0,
) -> FederatedDataset:
  """Pathological non-IID: each client gets ``shards_per_client`` label shards.

  Examples are shuffled, stably sorted by label and cut into
  ``num_clients * shards_per_client`` shards of equal size (the first
  ``N mod #shards`` shards get one extra example); shards are dealt to clients
  at random. FedAvg's MNIST setting is 100 clients x 2 shards of 300.
  """
  n = _num_examples(features)
  y = _labels(features, label_key)
  checks.positive_int("shards_per_client", shards_per_client)
  _check_clients(num_clients, n, shards_per_client)
  rng = np.random.default_rng(seed)
  perm = rng.permutation(n)
  order = perm[np.argsort(y[perm], kind="stable")]
  shards = np.array_split(order, num_clients * shards_per_client)
  deal = rng.permutation(len(shards)).reshape(num_clients, shards_per_client)
  return _pack(
    features, [np.concatenate([shards[s] for s in row]) for row in deal]
  )


def power_law_partition(
  features: Mapping[str, np.ndarray],
  num_clients: int,
  exponent: float = 1.0,
  *,
  min_examples: int = 1,
  seed: int = 0,
) -> FederatedDataset:
  r"""Quantity skew: client sizes follow a power law, labels stay IID.

  Client sizes are ``n_k = m + (N - K m) r_k^{-a} / \sum_{r=1}^K r^{-a}``
  (largest-remainder rounding so they sum to ``N``) for a random permutation
  ``r`` of the ranks ``1..K``; the examples are a random permutation cut at
  those sizes. ``exponent=0`` gives equal sizes.
  """
  n = _num_examples(features)
  if not np.isfinite(exponent) or exponent < 0:
    raise ValueError(
      f"exponent must be a finite number >= 0, got {exponent!r}."
    )
  checks.positive_int("min_examples", min_examples)
  _check_clients(num_clients, n, min_examples)
  rng = np.random.default_rng(seed)
  ranks = rng.permutation(num_clients) + 1
  share = ranks.astype(np.float64) ** (-float(exponent))
  share /= share.sum()
  free = n - num_clients * min_examples
  exact = share * free
  sizes = np.floor(exact).astype(np.int64)
  rest = free - int(sizes.sum())
  sizes[np.argsort(-(exact - sizes), kind="stable")[:rest]] += 1
  sizes += min_examples
  perm = rng.permutation(n)
  return _pack(features, np.split(perm, np.cumsum(sizes)[:-1]))


def train_test_split(
  dataset: FederatedDataset,
  test_fraction: float = 0.2,
  *,
  shuffle: bool = True,
  seed: int = 0,
) -> tuple[FederatedDataset, FederatedDataset]:
  """Splits every client's examples into train and test (same clients).

  Client ``k`` keeps ``floor((1 - test_fraction) n_k)`` examples (clipped to
  ``[1, n_k - 1]``) for training, after a per-client shuffle if ``shuffle``.

  Raises:
    ValueError: a client has fewer than 2 examples, or the fraction is not in
      (0, 1).
  """
  if not isinstance(dataset, FederatedDataset):
    raise TypeError(
      f"dataset must be a FederatedDataset, got {type(dataset).__name__}."
    )
  if not 0 < test_fraction < 1:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}.")
  counts = dataset.counts
  if np.any(counts < 2):
    k = int(np.argmax(counts < 2))
    name = dataset.client_ids[k] if dataset.client_ids else k
    raise ValueError(
      f"client {name!r} has {int(counts[k])} example; a "
      "train/test split needs at least 2 per client (partition "
      "with min_examples=2 or more)."
    )
  owner = np.repeat(np.arange(counts.size), counts)
  rows = np.concatenate(
    [np.arange(o, o + c) for o, c in zip(dataset.offsets, counts)]
  )
  if shuffle:
    keys = np.random.default_rng(seed).random(rows.size)
    rows = rows[np.lexsort((keys, owner))]
  n_train = np.clip(
    (counts * (1.0 - test_fraction)).astype(np.int64), 1, counts - 1
  )
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  is_train = (np.arange(rows.size) - starts[owner]) < n_train[owner]

  def pack(sel, sizes):
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return FederatedDataset(
      {k: v[rows[sel]] for k, v in dataset.features.items()},
      offsets,
      sizes,
      dataset.client_ids,
    )

  return pack(is_train, n_train), pack(~is_train, counts - n_train)


def describe(dataset: FederatedDataset, label_key: str = "y") -> str:
  """One line: clients, examples per client (min/median/max), label skew."""
  s = dataset.summary(label_key)
  e = s["examples_per_client"]
  out = (
    f"{s['num_clients']} clients, {s['num_examples']} examples; per "
    f"client min {e['min']} / p10 {e['p10']:g} / median {e['median']:g} "
    f"/ p90 {e['p90']:g} / max {e['max']}"
  )
  if "label_skew_tv" in s:
    out += (
      f"; classes per client {s['classes_per_client']['mean']:.2f} of "
      f"{s['num_classes']}; label skew (TV to global) mean "
      f"{s['label_skew_tv']['mean']:.3f}"
    )
  return out
