"""The TFF-style facade: list and FederatedDataset inputs, upload layout."""

import chex
import jax
import numpy as np
import optax
import pytest

import fedjax_lite as fl
from fedjax_lite import learning

D, K = 4, 3


def _clients(rng, sizes, dtype=np.float32):
  return [
    {
      "x": rng.standard_normal((n, D)).astype(dtype),
      "y": rng.integers(0, K, n),
    }
    for n in sizes
  ]


def _process(batch_size=3):
  return learning.build_federated_averaging_process(
    fl.models.logistic_regression(D, K),
    client_optimizer_fn=lambda: optax.sgd(0.3),
    server_optimizer_fn=lambda: optax.sgd(1.0, momentum=0.5),
    local_epochs=2,
    batch_size=batch_size,
  )


def test_grid_rounds_up_by_at_most_an_eighth():
  grid = learning._grid  # pylint: disable=protected-access
  for v in range(1, 5000):
    assert v <= grid(v) <= v * 1.125
    assert grid(grid(v)) == grid(v)


def test_next_list_input_matches_federated_dataset(rng):
  # Uneven clients (several size buckets), float64 features (packed as
  # float32) and int64 labels (int32): a list, a dict and the equivalent
  # FederatedDataset train bit-identically, round after round.
  clients = _clients(rng, (3, 17, 5, 9), np.float64)
  inputs = {
    "list": clients,
    "dict": {f"client{i}": c for i, c in enumerate(clients)},
    "ds": fl.FederatedDataset.from_clients(clients),
  }
  process = _process()
  states = {kind: process.initialize(seed=0) for kind in inputs}
  for _ in range(2):
    metrics = {}
    for kind, data in inputs.items():
      states[kind], metrics[kind] = process.next(states[kind], data)
    assert metrics["list"] == metrics["dict"] == metrics["ds"]
    assert metrics["list"]["num_clients"] == len(clients)
    for kind in ("dict", "ds"):
      chex.assert_trees_all_equal(
        process.get_model_weights(states[kind]),
        process.get_model_weights(states["list"]),
      )
  assert process._engines[4].num_traces == 1  # pylint: disable=protected-access


def test_next_list_rounds_with_different_totals_reuse_the_round(rng):
  process = _process(batch_size=10)
  state = process.initialize(seed=0)
  for sizes in ((10, 6, 8), (9, 10, 7), (4, 10, 10)):
    state, _ = process.next(state, _clients(rng, sizes))
  assert process._engines[3].num_traces == 1  # pylint: disable=protected-access


def test_next_list_input_errors_name_the_client(rng):
  process = _process()
  state = process.initialize(seed=0)
  good = _clients(rng, (4, 5))
  bad_nan = [good[0], {**good[1], "x": np.full((5, D), np.nan, np.float32)}]
  with pytest.raises(ValueError, match="NaN or inf"):
    process.next(state, bad_nan)
  with pytest.raises(ValueError, match="client 1 has features"):
    process.next(state, [good[0], {"x": good[1]["x"]}])
  with pytest.raises(ValueError, match="mismatched feature lengths"):
    process.next(state, [good[0], {"x": good[1]["x"], "y": good[0]["y"]}])
  with pytest.raises(TypeError, match="client 1 is a list"):
    process.next(state, [good[0], [1, 2]])
  with pytest.raises(ValueError, match="0 examples"):
    process.next(state, [good[0], {"x": np.zeros((0, D)), "y": []}])
  with pytest.raises(ValueError, match=r"expected values in \[0, 3\)"):
    process.next(state, [good[0], {**good[1], "y": np.full(5, 7)}])
  with pytest.raises(ValueError, match="empty"):
    process.next(state, [])
  with pytest.raises(TypeError, match="list of per-client dicts"):
    process.next(state, "clients")
  # Huge finite values pass the input check; their updates overflow to inf,
  # so the round drops both clients (RoundConfig(nonfinite="drop")).
  big = [{**c, "x": np.full_like(c["x"], 3e38)} for c in good]
  _, metrics = process.next(state, big)
  assert metrics["num_clients"] == 0 and metrics["dropped_nonfinite"] == 2
  jax.block_until_ready(state)
