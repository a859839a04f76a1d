r"""FedProx Synthetic(alpha, beta) and Synthetic-IID (Li et al. 2020, arXiv:1812.06127).

For client ``k`` (following the FedProx paper's generator; ``N(m, s)`` below
has standard deviation ``s``, as in the paper's released code):

.. math::
   u_k \sim N(0, \alpha),\quad W_k \sim N(u_k, 1)^{d \times C},\quad
   b_k \sim N(u_k, 1)^{C},\quad B_k \sim N(0, \beta),\quad
   v_k \sim N(B_k, 1)^{d},\quad x \sim N(v_k, \Sigma),\
   \Sigma_{jj} = (j+1)^{-1.2},\quad y = \arg\max \mathrm{softmax}(x W_k + b_k)

with ``n_k = floor(lognormal(4, 2)) + 50`` examples. Synthetic-IID uses one
shared ``W, b ~ N(0, 1)`` and ``v_k = 0``. Each client's examples are split
90/10 into train/test (train first), giving two :class:`FederatedDataset`
with the same clients.
"""

from __future__ import annotations

import numpy as np

from fedjax_lite.data.federated_dataset import FederatedDataset


def _split(features: dict, counts: np.ndarray, test_fraction: float):
  offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
  n_test = np.floor(counts * test_fraction).astype(np.int64)
  if test_fraction > 0:
    n_test = np.maximum(n_test, 1)
  n_train = counts - n_test
  train_rows = [np.arange(o, o + a) for o, a in zip(offsets, n_train)]
  test_rows = [np.arange(o + a, o + c) for o, a, c in
               zip(offsets, n_train, counts)]
  ids = [f"f_{k:05d}" for k in range(counts.size)]
  train = FederatedDataset.from_partition(features, train_rows, ids)
  test = (FederatedDataset.from_partition(features, test_rows, ids)
          if test_fraction > 0 else None)
  return train, test


def fedprox_synthetic(alpha: float = 1.0, beta: float = 1.0, *,
                      iid: bool = False, num_clients: int = 30,
                      num_features: int = 60, num_classes: int = 10,
                      examples_per_client: int | None = None,
                      test_fraction: float = 0.1, seed: int = 0
                      ) -> tuple[FederatedDataset, FederatedDataset | None]:
  """Generates FedProx Synthetic(alpha, beta) (or Synthetic-IID).

  Args:
    alpha: spread of the per-client model means ``u_k`` (model heterogeneity).
    beta: spread of the per-client input means ``B_k`` (data heterogeneity).
    iid: Synthetic-IID (ignores alpha and beta).
    num_clients, num_features, num_classes: sizes (paper: 30, 60, 10).
    examples_per_client: fixed client size instead of ``lognormal(4, 2)+50``
      (useful for large-population stress tests).
    test_fraction: per-client share of examples held out as test data.
    seed: numpy seed; the output is a deterministic function of the args.

  Returns:
    ``(train, test)`` federated datasets with features ``x`` (float32
    ``[n, num_features]``) and ``y`` (int32 labels).
  """
  for name, v in (("num_clients", num_clients), ("num_features", num_features),
                  ("num_classes", num_classes)):
    if not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f"{name} must be a positive int, got {v!r}.")
  if alpha < 0 or beta < 0:
    raise ValueError(f"alpha and beta must be >= 0, got {alpha}, {beta}.")
  if not 0 <= test_fraction < 1:
    raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}.")
  rng = np.random.default_rng(seed)
  if examples_per_client is None:
    counts = rng.lognormal(4, 2, num_clients).astype(np.int64) + 50
  else:
    if examples_per_client < 2:
      raise ValueError("examples_per_client must be >= 2.")
    counts = np.full(num_clients, examples_per_client, np.int64)
  d, c = num_features, num_classes
  sigma = np.power(np.arange(1, d + 1, dtype=np.float64), -1.2) ** 0.5
  if iid:
    w_shared = rng.normal(0.0, 1.0, (d, c))
    b_shared = rng.normal(0.0, 1.0, c)
    u = np.zeros(num_clients)
    v = np.zeros((num_clients, d))
  else:
    u = rng.normal(0.0, alpha, num_clients)
    big_b = rng.normal(0.0, beta, num_clients)
    v = rng.normal(big_b[:, None], 1.0, (num_clients, d))
  total = int(counts.sum())
  x = np.empty((total, d), np.float32)
  y = np.empty(total, np.int32)
  start = 0
  chunk = 4096
  for lo in range(0, num_clients, chunk):
    hi = min(lo + chunk, num_clients)
    k = hi - lo
    if iid:
      w = np.broadcast_to(w_shared, (k, d, c))
      b = np.broadcast_to(b_shared, (k, c))
    else:
      w = rng.normal(u[lo:hi, None, None], 1.0, (k, d, c))
      b = rng.normal(u[lo:hi, None], 1.0, (k, c))
    n = counts[lo:hi]
    owner = np.repeat(np.arange(k), n)
    xx = v[lo + owner] + rng.standard_normal((owner.size, d)) * sigma
    if np.all(n == n[0]):  # equal sizes: one batched matmul
      logits = (np.matmul(xx.reshape(k, n[0], d), w) + b[:, None]).reshape(
          -1, c)
    else:
      logits = np.empty((owner.size, c))
      ends = np.cumsum(n)
      for i, (s0, s1) in enumerate(zip(ends - n, ends)):
        logits[s0:s1] = xx[s0:s1] @ w[i] + b[i]
    x[start:start + owner.size] = xx
    y[start:start + owner.size] = np.argmax(logits, axis=1)
    start += owner.size
  return _split({"x": x, "y": y}, counts, test_fraction)
