r"""Synthetic federated classification data: FedProx and LEAF generators.

FedProx Synthetic(alpha, beta) and Synthetic-IID (Li et al. 2020, "Federated
Optimization in Heterogeneous Networks", arXiv:1812.06127, Sec. 5.1). For
client ``k`` (``N(m, s)`` below has standard deviation ``s``, as in the paper's
released generator):

.. math::
   n_k = \lfloor \mathrm{lognormal}(4, 2) \rfloor + 50,\quad
   u_k \sim N(0, \alpha),\quad W_k \sim N(u_k, 1)^{d \times C},\quad
   b_k \sim N(u_k, 1)^{C},

   B_k \sim N(0, \beta),\quad v_k \sim N(B_k, 1)^{d},\quad
   x \sim N(v_k, \Sigma),\ \Sigma = \mathrm{diag}((j+1)^{-1.2}),\quad
   y = \arg\max_c \mathrm{softmax}(x W_k + b_k)_c .

Synthetic-IID shares one ``W, b ~ N(0, 1)`` between all clients and uses
``v_k = 0``. Each client's examples are split into train (the first
``floor(0.9 n_k)``) and test (the rest), as in the paper's code.

LEAF Synthetic (Caldas et al. 2018, "LEAF: A Benchmark for Federated
Settings", arXiv:1812.01097, Sec. 3 and its released generator): a matrix
``Q ~ N(0, 1)^{(d+1) \times C \times s}`` and ``s`` cluster means
``mu_j ~ N(m_j, 1)^s`` with ``m_j ~ N(0, 1)``; client ``k`` draws a cluster
``c_k ~ Cat(p)``, a model ``u_k ~ N(mu_{c_k}, 0.1^2 I)``, ``w_k = Q u_k``
(a ``(d+1) x C`` matrix whose first row is a bias), inputs as in FedProx
(``B_k ~ N(0, 1)``, ``v_k ~ N(B_k, 1)^d``, ``x ~ N(v_k, Sigma)``) and labels

.. math:: y = \arg\max_c\ \mathrm{softmax}([1, x]\, w_k + \epsilon)_c,\quad
          \epsilon \sim N(0, 0.1^2)^{C},

with ``n_k = min(floor(lognormal(3, 2)) + 5, 1000)``.

Both generators are deterministic functions of their arguments (numpy
``default_rng(seed)``) and generate clients in chunks, so ``num_clients`` can be
a million (give a small fixed ``examples_per_client`` for such stress data).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fedjax_lite import checks
from fedjax_lite.data.federated_dataset import FederatedDataset

# Clients are generated in chunks of at most this many examples (bounds the
# float64 working memory to ~ _CHUNK_EXAMPLES * num_features * 8 bytes).
_CHUNK_EXAMPLES = 1 << 18


def _check_test_fraction(test_fraction: float) -> None:
  if not 0 <= test_fraction < 1:
    raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction!r}.")


def split_train_test(
  features: dict,
  counts: np.ndarray,
  test_fraction: float,
  client_ids: Sequence[str] | None = None,
) -> tuple[FederatedDataset, FederatedDataset | None]:
  """Per-client train/test split of client-contiguous packed arrays.

  Client ``k`` owns rows ``[o_k, o_k + n_k)``; its first
  ``n_train = floor((1 - test_fraction) n_k)`` rows (clipped to
  ``[1, n_k - 1]``) are train data and the rest test data. With
  ``test_fraction == 0`` the test set is None. Vectorised (no per-client
  Python work), so it handles millions of clients.
  """
  counts = np.asarray(counts, np.int64)
  if test_fraction > 0:
    if np.any(counts < 2):
      k = int(np.argmax(counts < 2))
      raise ValueError(
        f"client {k} has {int(counts[k])} example(s); a "
        "train/test split needs at least 2 per client. Use "
        "more examples per client or test_fraction=0."
      )
    n_train = (counts * (1.0 - test_fraction)).astype(np.int64)
    n_train = np.clip(n_train, 1, counts - 1)
  else:
    n_train = counts
  offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
  owner = np.repeat(np.arange(counts.size), counts)
  is_train = (np.arange(owner.size) - offsets[owner]) < n_train[owner]

  def pack(rows, sizes):
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    return FederatedDataset(
      {k: v[rows] for k, v in features.items()}, starts, sizes, client_ids
    )

  train = pack(is_train, n_train)
  if test_fraction == 0:
    return train, None
  return train, pack(~is_train, counts - n_train)


def _chunks(counts: np.ndarray):
  """Consecutive client ranges holding about ``_CHUNK_EXAMPLES`` examples."""
  ends = np.cumsum(counts)
  lo, start = 0, 0
  while lo < counts.size:
    hi = int(np.searchsorted(ends, start + _CHUNK_EXAMPLES, side="right"))
    hi = max(hi, lo + 1)
    yield lo, hi
    start = int(ends[hi - 1])
    lo = hi


def _per_client_logits(
  x: np.ndarray, n: np.ndarray, w: np.ndarray, b: np.ndarray
) -> np.ndarray:
  """``x_i W_k + b_k`` for client-contiguous rows (float64, ``[sum n, C]``)."""
  k, c = w.shape[0], w.shape[-1]
  if np.all(n == n[0]):  # equal sizes: one batched matmul
    return (np.matmul(x.reshape(k, int(n[0]), -1), w) + b[:, None]).reshape(
      -1, c
    )
  logits = np.empty((x.shape[0], c))
  ends = np.cumsum(n)
  for i, (s0, s1) in enumerate(zip(ends - n, ends)):
    logits[s0:s1] = x[s0:s1] @ w[i] + b[i]
  return logits


def fedprox_synthetic(
  alpha: float = 1.0,
  beta: float = 1.0,
  *,
  iid: bool = False,
  num_clients: int = 30,
  num_features: int = 60,
  num_classes: int = 10,
  examples_per_client: int | None = None,
  test_fraction: float = 0.1,
  seed: int = 0,
  return_params: bool = False,
):
  """Generates FedProx Synthetic(alpha, beta) (or Synthetic-IID).

  See the module docstring for the generative process.

  Args:
    alpha: standard deviation of the per-client model means ``u_k`` (model
      heterogeneity); the paper uses (0, 0), (0.5, 0.5) and (1, 1).
    beta: standard deviation of the per-client input means ``B_k`` (data
      heterogeneity).
    iid: Synthetic-IID (one shared ``W, b``; ``v_k = 0``; ignores alpha, beta).
    num_clients, num_features, num_classes: sizes (paper: 30, 60, 10).
    examples_per_client: a fixed client size instead of
      ``floor(lognormal(4, 2)) + 50`` (for large-population stress data).
    test_fraction: per-client share of examples held out as test data
      (paper: 0.1); 0 returns ``test=None``.
    seed: numpy seed; the output is a deterministic function of the args.
    return_params: also return the generative parameters (float64 ``w
      [K, d, C]``, ``b [K, C]``, ``v [K, d]``, ``u [K]``, ``big_b [K]``,
      ``counts [K]``); memory ``K d C`` floats, so only for small ``K``.

  Returns:
    ``(train, test)`` (or ``(train, test, params)``): federated datasets with
    features ``x`` (float32 ``[n, num_features]``) and ``y`` (int32 labels)
    and the same clients in the same order.
  """
  checks.positive_ints(
    num_clients=num_clients, num_features=num_features, num_classes=num_classes
  )
  if alpha < 0 or beta < 0:
    raise ValueError(
      f"alpha and beta are standard deviations and must be "
      f">= 0, got alpha={alpha!r}, beta={beta!r}."
    )
  _check_test_fraction(test_fraction)
  rng = np.random.default_rng(seed)
  if examples_per_client is None:
    counts = rng.lognormal(4, 2, num_clients).astype(np.int64) + 50
  else:
    checks.positive_ints(examples_per_client=examples_per_client)
    counts = np.full(num_clients, examples_per_client, np.int64)
  d, c = num_features, num_classes
  std = np.power(np.arange(1, d + 1, dtype=np.float64), -1.2) ** 0.5
  if iid:
    w_shared = rng.normal(0.0, 1.0, (d, c))
    b_shared = rng.normal(0.0, 1.0, c)
    u = np.zeros(num_clients)
    big_b = np.zeros(num_clients)
  else:
    u = rng.normal(0.0, alpha, num_clients)
    big_b = rng.normal(0.0, beta, num_clients)
  total = int(counts.sum())
  x = np.empty((total, d), np.float32)
  y = np.empty(total, np.int32)
  params = {"w": [], "b": [], "v": []} if return_params else None
  start = 0
  for lo, hi in _chunks(counts):
    k = hi - lo
    if iid:
      v = np.zeros((k, d))
      w = np.broadcast_to(w_shared, (k, d, c))
      b = np.broadcast_to(b_shared, (k, c))
    else:
      v = rng.normal(big_b[lo:hi, None], 1.0, (k, d))
      w = rng.normal(u[lo:hi, None, None], 1.0, (k, d, c))
      b = rng.normal(u[lo:hi, None], 1.0, (k, c))
    n = counts[lo:hi]
    owner = np.repeat(np.arange(k), n)
    # Labels are computed from the stored float32 inputs, so the rule
    # y = argmax(x W_k + b_k) holds exactly for the returned data.
    xx = (v[owner] + rng.standard_normal((owner.size, d)) * std).astype(
      np.float32
    )
    logits = _per_client_logits(xx.astype(np.float64), n, w, b)
    x[start : start + owner.size] = xx
    y[start : start + owner.size] = np.argmax(logits, axis=1)
    start += owner.size
    if return_params:
      params["w"].append(np.array(w))
      params["b"].append(np.array(b))
      params["v"].append(v)
  train, test = split_train_test({"x": x, "y": y}, counts, test_fraction)
  if not return_params:
    return train, test
  params = {k: np.concatenate(v) for k, v in params.items()}
  params.update(u=u, big_b=big_b, counts=counts)
  return train, test, params


def leaf_synthetic(
  num_clients: int = 1000,
  num_classes: int = 5,
  num_features: int = 60,
  *,
  prob_clusters: Sequence[float] = (1.0,),
  min_examples: int = 5,
  max_examples: int = 1000,
  examples_per_client: int | None = None,
  label_noise: float = 0.1,
  column_softmax: bool = False,
  test_fraction: float = 0.1,
  seed: int = 0,
  return_params: bool = False,
):
  """Generates LEAF's synthetic dataset (see the module docstring).

  Args:
    num_clients, num_classes, num_features: LEAF's ``-num-tasks``,
      ``-num-classes`` and ``-num-dim`` (its README: 1000, 5, 60).
    prob_clusters: cluster probabilities ``p`` (LEAF default: one cluster);
      the side-information dimension ``s`` is ``len(prob_clusters)``.
    min_examples, max_examples: ``n_k = min(floor(lognormal(3, 2)) +
      min_examples, max_examples)``.
    examples_per_client: a fixed client size instead (stress data).
    label_noise: standard deviation of the logit noise ``epsilon`` (0.1).
    column_softmax: LEAF's released generator normalises the softmax over a
      client's *examples* (axis 0) before the argmax over classes, i.e.
      ``y_i = argmax_c (z_ic - logsumexp_i z_ic)``; True reproduces that,
      False (default) uses the paper's per-example softmax
      (``y_i = argmax_c z_ic``).
    test_fraction: per-client share held out as test data (0: no test set).
    seed: numpy seed; the output is a deterministic function of the args.
    return_params: also return ``Q``, ``cluster_means [s', s]``, per-client
      ``cluster [K]``, ``u [K, s]``, ``w [K, d+1, C]`` and ``counts [K]``.

  Returns:
    ``(train, test)`` (or ``(train, test, params)``) with features ``x``
    (float32 ``[n, num_features]``, without the constant 1) and ``y`` (int32).
  """
  checks.positive_ints(
    num_clients=num_clients,
    num_features=num_features,
    num_classes=num_classes,
    min_examples=min_examples,
    max_examples=max_examples,
  )
  if max_examples < min_examples:
    raise ValueError(
      f"max_examples={max_examples} is smaller than "
      f"min_examples={min_examples}; expected min <= max."
    )
  p = np.asarray(prob_clusters, np.float64).reshape(-1)
  if p.size == 0 or np.any(p < 0) or not np.isclose(p.sum(), 1.0):
    raise ValueError(
      f"prob_clusters must be non-negative probabilities that "
      f"sum to 1, got {tuple(prob_clusters)!r}."
    )
  if label_noise < 0:
    raise ValueError(
      f"label_noise is a standard deviation and must be >= 0, "
      f"got {label_noise!r}."
    )
  _check_test_fraction(test_fraction)
  rng = np.random.default_rng(seed)
  d, c, s = num_features, num_classes, p.size
  q = rng.normal(0.0, 1.0, (d + 1, c, s))
  cluster_locs = rng.normal(0.0, 1.0, s)
  cluster_means = rng.normal(cluster_locs[:, None], 1.0, (s, s))
  if examples_per_client is None:
    counts = np.minimum(
      rng.lognormal(3, 2, num_clients).astype(np.int64) + min_examples,
      max_examples,
    )
  else:
    checks.positive_ints(examples_per_client=examples_per_client)
    counts = np.full(num_clients, examples_per_client, np.int64)
  cluster = rng.choice(s, size=num_clients, p=p / p.sum())
  u = rng.normal(cluster_means[cluster], 0.1)  # [K, s]
  big_b = rng.normal(0.0, 1.0, num_clients)
  std = np.power(np.arange(1, d + 1, dtype=np.float64), -1.2) ** 0.5
  total = int(counts.sum())
  x = np.empty((total, d), np.float32)
  y = np.empty(total, np.int32)
  ws = []
  start = 0
  for lo, hi in _chunks(counts):
    k = hi - lo
    w = np.einsum("icj,kj->kic", q, u[lo:hi])  # [k, d+1, C]
    v = rng.normal(big_b[lo:hi, None], 1.0, (k, d))
    n = counts[lo:hi]
    owner = np.repeat(np.arange(k), n)
    xx = (v[owner] + rng.standard_normal((owner.size, d)) * std).astype(
      np.float32
    )
    z = _per_client_logits(xx.astype(np.float64), n, w[:, 1:], w[:, 0])
    z = z + rng.normal(0.0, 1.0, z.shape) * label_noise
    if column_softmax:
      ends = np.cumsum(n)
      for s0, s1 in zip(ends - n, ends):
        zc = z[s0:s1]
        m = zc.max(axis=0, keepdims=True)
        z[s0:s1] = zc - (m + np.log(np.exp(zc - m).sum(axis=0, keepdims=True)))
    x[start : start + owner.size] = xx
    y[start : start + owner.size] = np.argmax(z, axis=1)
    start += owner.size
    if return_params:
      ws.append(w)
  train, test = split_train_test({"x": x, "y": y}, counts, test_fraction)
  if not return_params:
    return train, test
  params = {
    "Q": q,
    "cluster_means": cluster_means,
    "cluster": cluster,
    "u": u,
    "w": np.concatenate(ws),
    "counts": counts,
  }
  return train, test, params
