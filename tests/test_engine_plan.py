"""The engine's host-side block plan, and FedAvg across rounds against the
float64 reference."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_lite as fl
import reference as ref


def small_setup(block_size=None, clients_per_round=5):
  r = np.random.default_rng(0)
  sizes = (3, 9, 5, 12, 4, 7, 6, 11)
  clients = [
    {
      "x": r.standard_normal((n, 3)).astype(np.float32),
      "y": r.integers(0, 3, n).astype(np.int32),
    }
    for n in sizes
  ]
  model = fl.models.logistic_regression(3, 3)
  engine = fl.Engine(
    fl.fed_avg(model, optax.sgd(0.1)),
    fl.RoundConfig(
      clients_per_round, fl.LocalWork(batch_size=2), block_size=block_size
    ),
  )
  data = engine.put_data(fl.FederatedDataset.from_clients(clients), buckets=3)
  return engine, data, engine.init(model.init(jax.random.PRNGKey(0)))


def test_block_plan_is_host_side_and_matches_the_round():
  engine, data, state = small_setup()
  assert engine.block_sizes == {}
  plan = engine.block_plan(data, state)
  assert plan.bucket_sizes == data.bucket_sizes
  assert len(plan.block_sizes) == len(data.bucket_sizes)
  assert plan.pad == engine.num_devices * max(plan.block_sizes)
  engine.round(state, data)
  assert engine.block_sizes == plan.as_dict
  # Tracing again (a scanned run) leaves the same plan.
  engine.run(state, data, 2)
  assert engine.block_sizes == plan.as_dict
  assert engine.block_plan(data, state) is plan  # cached per layout
  # Pooled runs plan blocks for all runs' clients.
  pooled = engine.block_plan(data, state, num_runs=8)
  assert pooled.num_runs == 8 and pooled.bucket_sizes == plan.bucket_sizes
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), state, state)
  jax.jit(lambda s: engine.rounds_body(s, data))(stacked)
  assert (
    engine.block_sizes == engine.block_plan(data, state, num_runs=2).as_dict
  )
  fixed, data2, state2 = small_setup(block_size=2)
  assert set(fixed.block_plan(data2, state2).block_sizes) == {2}


def _float64_fedavg(model, grad, to_list, buckets, block_size, rounds):
  """``rounds`` FedAvg rounds of the engine (4 devices) and of the float64
  reference: the largest relative error (per leaf, in L2) of every round."""
  r = np.random.default_rng(0)
  sizes = (3, 9, 5, 12, 4, 7, 6, 11, 2, 8)
  clients = [
    {
      "x": r.standard_normal((n, 5)).astype(np.float32),
      "y": r.integers(0, 4, n).astype(np.int32),
    }
    for n in sizes
  ]
  lr, epochs, batch = 0.1, 2, 3
  engine = fl.Engine(
    fl.fed_avg(model, optax.sgd(lr), optax.sgd(1.0)),
    fl.RoundConfig(
      len(sizes),
      fl.LocalWork(batch_size=batch, num_epochs=epochs, shuffle=False),
      sampling="all",
      block_size=block_size,
    ),
  )
  assert engine.num_devices == 4, "conftest forces 4 CPU devices"
  data = engine.put_data(
    fl.FederatedDataset.from_clients(clients), buckets=buckets
  )
  assert len(data.bucket_sizes) == buckets
  params = model.init(jax.random.PRNGKey(1))
  state, w, errors = engine.init(params, seed=2), to_list(params), []
  for _ in range(rounds):
    state, _ = engine.round(state, data)
    w = ref.fedavg_round(grad, w, clients, lr, epochs, batch_size=batch)
    got = to_list(state.server.params)
    errors.append(
      max(np.linalg.norm(a - e) / np.linalg.norm(e) for a, e in zip(got, w))
    )
  return errors


@pytest.mark.parametrize("name", ["mlp", "logreg"])
def test_fedavg_matches_float64_reference_over_rounds(name):
  """FedAvg's correctness across rounds, held by the float64 reference
  (relative error <= 1e-6 after each of 5 rounds; 4 devices, 3 size buckets
  with automatic blocks, or 1 bucket with blocks of 2) rather than by equal
  bits with an older compiled program."""
  if name == "mlp":
    model = fl.models.mlp(5, 4, hidden=(8,))
    grad = lambda ps, x, y: ref.mlp_loss_grad(ps, x, y)[1]
    to_list = lambda p: [
      np.asarray(p[layer][k], np.float64)
      for layer in ("Dense_0", "Dense_1")
      for k in ("kernel", "bias")
    ]
    buckets, block_size = 3, None
  else:
    model = fl.models.logistic_regression(5, 4)
    grad = lambda ps, x, y: ref.logreg_loss_grad(ps[0], ps[1], x, y)[1:]
    to_list = ref.logreg_list
    buckets, block_size = 1, 2
  errors = _float64_fedavg(model, grad, to_list, buckets, block_size, 5)
  assert max(errors) <= 1e-6, errors
