"""Per-client persistent state in the engine (the path SCAFFOLD-like methods use)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fedjax_lite as fl


def counting_algorithm(model):
  """Each participating client increments its counter and reports it."""
  base = fl.fed_avg(model, optax.sgd(0.0))

  def client_init(params):
    del params
    return {"count": jnp.zeros((), jnp.int32),
            "last_round_examples": jnp.zeros((), jnp.float32)}

  def client_update(server_params, client_state, data, rng):
    out = base.client_update(server_params, None, data, rng)
    new_state = {"count": client_state["count"] + 1,
                 "last_round_examples": data.num_examples.astype(jnp.float32)}
    return out._replace(state=new_state)

  return base._replace(client_init=client_init, client_update=client_update,
                       name="counting")


def test_client_states_persist_and_non_participants_keep_theirs(rng):
  sizes = [3, 5, 2, 7, 4, 6, 9, 1]
  clients = [{"x": rng.standard_normal((n, 2)).astype(np.float32),
              "y": rng.integers(0, 2, n).astype(np.int32)} for n in sizes]
  ds = fl.FederatedDataset.from_clients(clients)
  model = fl.models.logistic_regression(2, 2)
  engine = fl.Engine(counting_algorithm(model),
                     fl.RoundConfig(3, fl.LocalWork(batch_size=2),
                                    block_size=1))
  data = engine.put_data(ds)
  state = engine.init(model.init(jax.random.PRNGKey(0)), seed=0,
                      num_clients=len(sizes))
  expected = np.zeros(len(sizes), int)
  for t in range(5):
    # Recompute the round's sample exactly as the engine does.
    key = jax.random.fold_in(state.rng, state.round)
    k_sample, _ = jax.random.split(key)
    ids = np.asarray(fl.data.sample_clients(k_sample, len(sizes), 3))
    state, metrics = engine.round(state, data)
    expected[ids] += 1
    np.testing.assert_array_equal(np.asarray(state.clients["count"]), expected)
    assert float(metrics["num_clients"]) == 3
  seen = expected > 0
  np.testing.assert_array_equal(
      np.asarray(state.clients["last_round_examples"])[seen],
      np.asarray(sizes)[seen])
  assert not seen.all() or expected.sum() == 15


def test_stateful_algorithm_requires_population(rng):
  model = fl.models.logistic_regression(2, 2)
  engine = fl.Engine(counting_algorithm(model), fl.RoundConfig(2))
  try:
    engine.init(model.init(jax.random.PRNGKey(0)))
  except ValueError as e:
    assert "num_clients" in str(e)
  else:
    raise AssertionError("expected a ValueError")
