"""FedAvg/FedOpt rounds against float64 numpy references, eager and jitted."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_lite as fl
import reference as ref

SIZES = (3, 8, 5, 12)
D, K = 4, 3


def make_clients(rng, sizes=SIZES):
  return [
    {
      "x": rng.standard_normal((n, D)).astype(np.float32),
      "y": rng.integers(0, K, n).astype(np.int32),
    }
    for n in sizes
  ]


def logreg_setup(rng):
  model = fl.models.logistic_regression(D, K)
  w = rng.standard_normal((D, K)) * 0.5
  b = rng.standard_normal(K) * 0.1
  params = {
    "Dense_0": {
      "kernel": jnp.asarray(w, jnp.float32),
      "bias": jnp.asarray(b, jnp.float32),
    }
  }
  to_list = lambda p: [
    np.asarray(p["Dense_0"]["kernel"], np.float64),
    np.asarray(p["Dense_0"]["bias"], np.float64),
  ]
  grad = lambda ps, x, y: ref.logreg_loss_grad(ps[0], ps[1], x, y)[1:]
  return model, params, to_list, grad


def mlp_setup(rng):
  model = fl.models.mlp(D, K, hidden=(6,))
  params = model.init(jax.random.PRNGKey(1))
  to_list = lambda p: [
    np.asarray(p[l][k], np.float64)
    for l in ("Dense_0", "Dense_1")
    for k in ("kernel", "bias")
  ]
  grad = lambda ps, x, y: ref.mlp_loss_grad(ps, x, y)[1]
  return model, params, to_list, grad


def run_rounds(engine, state, data, num_rounds, mode):
  out = []
  for _ in range(num_rounds):
    if mode == "eager":
      with jax.disable_jit():
        state, _ = engine._round_body(state, data)  # pylint: disable=protected-access
    else:
      state, _ = engine.round(state, data)
    out.append(state)
  return out


def assert_close(actual, expected, rtol=1e-5):
  for a, e in zip(actual, expected):
    np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * np.abs(e).max())


@pytest.mark.parametrize(
  "mode", ["jit", pytest.param("eager", marks=pytest.mark.slow)]
)
@pytest.mark.parametrize(
  "setup", [logreg_setup, mlp_setup], ids=["logreg", "mlp"]
)
def test_fedavg_full_batch_gd_matches_numpy(rng, mode, setup):
  model, params, to_list, grad = setup(rng)
  clients = make_clients(rng)
  lr, epochs, rounds = 0.3, 2, 3
  work = fl.LocalWork(batch_size=None, num_epochs=epochs)
  engine = fl.Engine(
    fl.fed_avg(model, optax.sgd(lr), optax.sgd(1.0)),
    fl.RoundConfig(len(clients), work, sampling="all", block_size=1),
  )
  data = engine.put_data(fl.FederatedDataset.from_clients(clients))
  states = run_rounds(engine, engine.init(params), data, rounds, mode)
  expected = to_list(params)
  for t in range(rounds):
    expected = ref.fedavg_round(grad, expected, clients, lr, epochs)
    assert_close(to_list(states[t].server.params), expected)


@pytest.mark.parametrize(
  "mode", ["jit", pytest.param("eager", marks=pytest.mark.slow)]
)
def test_fedadam_matches_numpy(rng, mode):
  model, params, to_list, grad = logreg_setup(rng)
  clients = make_clients(rng)
  lr, epochs, rounds = 0.2, 1, 4
  work = fl.LocalWork(batch_size=None, num_epochs=epochs)
  engine = fl.Engine(
    fl.fed_avg(model, optax.sgd(lr), optax.adam(0.05)),
    fl.RoundConfig(len(clients), work, sampling="all"),
  )
  data = engine.put_data(fl.FederatedDataset.from_clients(clients))
  states = run_rounds(engine, engine.init(params), data, rounds, mode)
  w = to_list(params)
  adam = ref.Adam(0.05)
  for t in range(rounds):
    avg = ref.fedavg_round(grad, w, clients, lr, epochs)
    w = adam.step(w, [a - b for a, b in zip(w, avg)])
    assert_close(to_list(states[t].server.params), w)


def test_minibatch_sgd_in_order_matches_numpy(rng):
  model, params, to_list, grad = mlp_setup(rng)
  clients = make_clients(rng)
  work = fl.LocalWork(batch_size=3, num_epochs=2, shuffle=False)
  engine = fl.Engine(
    fl.fed_avg(model, optax.sgd(0.1)),
    fl.RoundConfig(len(clients), work, sampling="all"),
  )
  data = engine.put_data(fl.FederatedDataset.from_clients(clients))
  states = run_rounds(engine, engine.init(params), data, 2, "jit")
  w = to_list(params)
  for t in range(2):
    w = ref.fedavg_round(grad, w, clients, 0.1, 2, batch_size=3)
    assert_close(to_list(states[t].server.params), w)


def test_fixed_local_steps_match_numpy(rng):
  """LocalWork(num_steps=...): cycle through the client's data in order."""
  model, params, to_list, grad = logreg_setup(rng)
  clients = make_clients(rng)
  steps, b, lr = 4, 3, 0.1
  work = fl.LocalWork(batch_size=b, num_steps=steps, shuffle=False)
  engine = fl.Engine(
    fl.fed_avg(model, optax.sgd(lr)),
    fl.RoundConfig(len(clients), work, sampling="all"),
  )
  data = engine.put_data(fl.FederatedDataset.from_clients(clients))
  states = run_rounds(engine, engine.init(params), data, 2, "jit")

  def local(w, c):
    n = c["x"].shape[0]
    for s in range(steps):
      idx = np.arange(s * b, (s + 1) * b) % n
      g = grad(w, c["x"][idx].astype(np.float64), c["y"][idx])
      w = [p - lr * gi for p, gi in zip(w, g)]
    return w

  w = to_list(params)
  total = sum(c["x"].shape[0] for c in clients)
  for t in range(2):
    locals_ = [local(w, c) for c in clients]
    w = [
      sum(c["x"].shape[0] / total * lw[i] for c, lw in zip(clients, locals_))
      for i in range(len(w))
    ]
    assert_close(to_list(states[t].server.params), w)


def test_training_metrics_are_example_weighted_means(rng):
  model, params, _, _ = logreg_setup(rng)
  clients = make_clients(rng)
  work = fl.LocalWork(batch_size=None, num_epochs=1)
  # test_fedadam_matches_numpy's round (the metrics do not depend on the
  # optimizers): the same program, which the test run's compilation cache
  # then compiles once
  engine = fl.Engine(
    fl.fed_avg(model, optax.sgd(0.2), optax.adam(0.05)),
    fl.RoundConfig(len(clients), work, sampling="all"),
  )
  data = engine.put_data(fl.FederatedDataset.from_clients(clients))
  _, metrics = engine.round(engine.init(params), data)
  w = [np.asarray(params["Dense_0"][k], np.float64) for k in ("kernel", "bias")]
  x = np.concatenate([c["x"] for c in clients]).astype(np.float64)
  y = np.concatenate([c["y"] for c in clients])
  loss = ref.logreg_loss_grad(w[0], w[1], x, y)[0]
  acc = np.mean(np.argmax(x @ w[0] + w[1], 1) == y)
  np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["accuracy"]), acc, rtol=1e-6)
  assert float(metrics["num_clients"]) == len(clients)
  assert float(metrics["total_weight"]) == sum(SIZES)


def test_run_scan_equals_repeated_rounds_and_compiles_once(rng):
  model, params, _, _ = logreg_setup(rng)
  clients = make_clients(rng, sizes=(4, 9, 2, 7, 5, 6, 3))
  work = fl.LocalWork(batch_size=2, num_epochs=1)
  engine = fl.Engine(
    fl.fed_avg(model, optax.sgd(0.1)), fl.RoundConfig(3, work, block_size=1)
  )
  # two size buckets (not the four "auto" picks): one loop each in the
  # compiled round and in the compiled scan
  data = engine.put_data(fl.FederatedDataset.from_clients(clients), 2)
  assert len(data.bucket_sizes) == 2
  state0 = engine.init(params, seed=3)
  state = state0
  for _ in range(4):
    state, _ = engine.round(state, data)
  assert engine.num_traces == 1
  scanned, history = engine.run(state0, data, 4)
  chex.assert_trees_all_close(
    scanned.server.params, state.server.params, rtol=1e-6, atol=1e-7
  )
  assert history["loss"].shape == (4,)
  assert int(scanned.round) == 4


def test_round_traces_once_with_chex(rng):
  model, params, _, _ = logreg_setup(rng)
  clients = make_clients(rng)
  engine = fl.Engine(
    fl.fed_avg(model, optax.sgd(0.1)),
    fl.RoundConfig(2, fl.LocalWork(batch_size=2)),
  )
  # one size bucket: how often the round traces does not depend on it
  data = engine.put_data(fl.FederatedDataset.from_clients(clients), 1)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(state, data):
    return engine._round_body(state, data)  # pylint: disable=protected-access

  state = engine.init(params)
  for _ in range(3):
    state, _ = step(state, data)


@pytest.mark.parametrize("buckets", ["auto", 1])
def test_sharded_equals_unsharded(rng, one_device_mesh, cpu_mesh, buckets):
  assert len(jax.devices("cpu")) == 4, "conftest forces 4 CPU devices"
  model, params, _, _ = mlp_setup(rng)
  sizes = (2, 30, 3, 4, 40, 6, 7, 3, 2, 40, 5)  # "auto": 3 size buckets
  clients = make_clients(rng, sizes)
  ds = fl.FederatedDataset.from_clients(clients)
  work = fl.LocalWork(batch_size=4, num_epochs=2)
  out = []
  for mesh in (cpu_mesh, one_device_mesh):
    engine = fl.Engine(
      fl.fed_avg(model, optax.sgd(0.05), optax.adam(0.01)),
      fl.RoundConfig(7, work, block_size=1),
      mesh=mesh,
    )
    data = engine.put_data(ds, buckets=buckets)
    state, hist = engine.run(engine.init(params, seed=5), data, 3)
    out.append((state, hist))
  assert engine.num_devices == 1
  chex.assert_trees_all_close(
    out[0][0].server.params, out[1][0].server.params, rtol=1e-6, atol=1e-6
  )
  np.testing.assert_allclose(out[0][1]["loss"], out[1][1]["loss"], rtol=1e-6)


def test_block_size_does_not_change_result(rng):
  model, params, _, _ = logreg_setup(rng)
  ds = fl.FederatedDataset.from_clients(make_clients(rng, (5, 3, 8, 2, 9, 4)))
  work = fl.LocalWork(batch_size=2, num_epochs=1)
  results = []
  for block in (1, 2, None):
    engine = fl.Engine(
      fl.fed_avg(model, optax.sgd(0.1)),
      fl.RoundConfig(5, work, block_size=block),
    )
    # two size buckets (not the four "auto" picks), each with its blocks
    data = engine.put_data(ds, 2)
    assert len(data.bucket_sizes) == 2
    state, _ = engine.run(engine.init(params, seed=1), data, 2)
    results.append(state.server.params)
  chex.assert_trees_all_close(results[0], results[1], rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(results[0], results[2], rtol=1e-6, atol=1e-7)


def test_tff_process_matches_numpy(rng):
  clients = make_clients(rng)
  model = fl.models.logistic_regression(D, K)
  process = fl.learning.build_federated_averaging_process(
    model,
    client_optimizer_fn=lambda: optax.sgd(0.5),
    server_optimizer_fn=lambda: optax.sgd(1.0),
    local_epochs=2,
    batch_size=None,
  )
  state = process.initialize(seed=0)
  w = [
    np.asarray(p, np.float64)
    for p in (
      process.get_model_weights(state)["Dense_0"]["kernel"],
      process.get_model_weights(state)["Dense_0"]["bias"],
    )
  ]
  grad = lambda ps, x, y: ref.logreg_loss_grad(ps[0], ps[1], x, y)[1:]
  for _ in range(3):
    state, metrics = process.next(state, clients)
    w = ref.fedavg_round(grad, w, clients, 0.5, 2)
  got = process.get_model_weights(state)["Dense_0"]
  assert_close([np.asarray(got["kernel"]), np.asarray(got["bias"])], w)
  assert set(metrics) >= {"loss", "accuracy", "num_clients"}
  # A FederatedDataset gives the same round as the list of dicts.
  state2 = process.initialize(seed=0)
  ds = fl.FederatedDataset.from_clients(clients)
  for _ in range(3):
    state2, _ = process.next(state2, ds)
  chex.assert_trees_all_close(
    process.get_model_weights(state2),
    process.get_model_weights(state),
    rtol=1e-6,
  )
  ev = process.evaluate(state, clients)
  assert ev.per_client["accuracy"].shape == (len(clients),)


def test_tff_process_set_model_weights_and_cached_upload(rng):
  clients = make_clients(rng)
  model, params, to_list, grad = logreg_setup(rng)
  # test_tff_process_matches_numpy's process (local_epochs=2): the same
  # round program, which the test run's compilation cache compiles once
  process = fl.learning.build_federated_averaging_process(
    model,
    client_optimizer_fn=lambda: optax.sgd(0.5),
    local_epochs=2,
    batch_size=None,
  )
  state = process.set_model_weights(process.initialize(seed=0), params)
  chex.assert_trees_all_equal(process.get_model_weights(state), params)
  ds = fl.FederatedDataset.from_clients(clients)
  w = to_list(params)
  uploads = []
  for _ in range(2):
    state, _ = process.next(state, ds)
    uploads.append(process._uploaded[2])  # pylint: disable=protected-access
    w = ref.fedavg_round(grad, w, clients, 0.5, 2)
  assert uploads[0] is uploads[1]  # the same dataset is uploaded once
  assert_close(to_list(process.get_model_weights(state)), w)
  with pytest.raises(ValueError, match="shapes"):
    process.set_model_weights(
      state, jax.tree.map(lambda p: jnp.zeros(p.shape + (1,)), params)
    )
