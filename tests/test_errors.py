"""Bad input gets a clear error naming the argument, what arrived and what
was expected."""

import jax
import numpy as np
import optax
import pytest

import fedjax_lite as fl


@pytest.fixture
def model():
  return fl.models.logistic_regression(2, 3)


def good_clients(rng):
  return [
    {
      "x": rng.standard_normal((n, 2)).astype(np.float32),
      "y": rng.integers(0, 3, n).astype(np.int32),
    }
    for n in (3, 4)
  ]


def test_process_rejects_float_labels(rng, model):
  clients = good_clients(rng)
  clients[1]["y"] = clients[1]["y"] + 0.5
  process = fl.learning.build_federated_averaging_process(
    model, lambda: optax.sgd(0.1)
  )
  with pytest.raises(ValueError, match="labels 'y' have dtype float"):
    process.next(process.initialize(), clients)


def test_engine_put_data_checks_labels_and_features(rng, model):
  engine = fl.Engine(fl.fed_avg(model, optax.sgd(0.1)), fl.RoundConfig(1))
  clients = good_clients(rng)
  clients[0]["y"][0] = 7
  with pytest.raises(ValueError, match=r"expected values in \[0, 3\)"):
    engine.put_data(fl.FederatedDataset.from_clients(clients), model=model)
  no_y = fl.FederatedDataset.from_clients([{"x": np.zeros((2, 2))}])
  with pytest.raises(ValueError, match=r"the model needs .*missing \['y'\]"):
    engine.put_data(no_y, model=model)


def test_process_rejects_bad_data_containers(rng, model):
  process = fl.learning.build_federated_averaging_process(
    model, lambda: optax.sgd(0.1)
  )
  state = process.initialize()
  with pytest.raises(ValueError, match="empty"):
    process.next(state, [])
  with pytest.raises(TypeError, match="list of per-client dicts"):
    process.next(state, 42)
  with pytest.raises(TypeError, match="expected a dict of feature arrays"):
    process.next(state, [np.zeros(3)])
  with pytest.raises(TypeError, match="optax optimizer"):
    fl.learning.build_federated_averaging_process(model, optax.sgd(0.1))


def test_nan_and_mismatched_lengths_name_the_feature(rng):
  bad = good_clients(rng)
  bad[1]["x"][2, 1] = np.nan
  with pytest.raises(ValueError, match="feature 'x' contains NaN"):
    fl.FederatedDataset.from_clients(bad)
  bad = good_clients(rng)
  bad[0]["y"] = bad[0]["y"][:2]
  with pytest.raises(
    ValueError,
    match=r"client 0 has mismatched feature "
    r"lengths \{'x': 3, 'y': 2\}",
  ):
    fl.FederatedDataset.from_clients(bad)


def test_config_errors(model):
  with pytest.raises(ValueError, match="clients_per_round must be a positive"):
    fl.RoundConfig(0)
  with pytest.raises(ValueError, match="sampling must be one of"):
    fl.RoundConfig(2, sampling="random")
  with pytest.raises(ValueError, match="block_size"):
    fl.RoundConfig(2, block_size=0)
  with pytest.raises(TypeError, match="FederatedAlgorithm"):
    fl.Engine(object(), fl.RoundConfig(2))
  engine = fl.Engine(fl.fed_avg(model, optax.sgd(0.1)), fl.RoundConfig(2))
  with pytest.raises(TypeError, match="DeviceData"):
    engine.round(engine.init(model.init(jax.random.PRNGKey(0))), {"x": 1})
  with pytest.raises(ValueError, match="num_rounds"):
    engine.run(None, None, 0)
