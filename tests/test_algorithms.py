"""The algorithm family against float64 numpy references of the published
update rules (tests/algo_reference.py), eager and jitted, several rounds."""

import functools

import jax
import numpy as np
import optax
import pytest

import fedjax_lite as fl
from fedjax_lite import algorithms as alg
from fedjax_lite.algorithms.ditto import personal_params
from fedjax_lite.algorithms.fed_nova import a_norm
from fedjax_lite.algorithms.stragglers import round_key
from fedjax_lite.engine.round import default_mesh
import algo_reference as aref
import reference as ref

D, K = 4, 3
SIZES = (3, 8, 5, 12)
POPULATION = (3, 8, 5, 12, 7, 4)


def make_clients(sizes, seed):
  return ref.logreg_clients(sizes, seed, D, K)


CLIENTS = make_clients(SIZES, 0)
PEOPLE = make_clients(POPULATION, 1)
MODEL = fl.models.logistic_regression(D, K)


def init_params(seed=2):
  return ref.logreg_params(D, K, seed)


to_list = ref.logreg_list


grad = ref.logreg_grad


def loss_grad(ws, x, y):
  loss, gw, gb = ref.logreg_loss_grad(ws[0], ws[1], x, y)
  return loss, [gw, gb]


def assert_close(actual, expected, rtol=1e-5):
  for a, e in zip(actual, expected):
    np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * np.abs(e).max())


def rounds(mode, jit_rounds):
  """Rounds to compare: eager (op by op) runs two to stay fast."""
  return jit_rounds if mode == "jit" else 2


def step(engine, state, data, mode):
  if mode == "eager":
    with jax.disable_jit():
      return engine.round_body(state, data)
  return engine.round(state, data)


@functools.cache
def setup(
  algorithm_name,
  mode,
  *,
  clients_per_round=len(SIZES),
  sampling="all",
  batch_size=3,
  num_epochs=2,
  population=False,
  buckets=1,
):
  """One engine per configuration and mode.

  jit: 4 devices (the client axis sharded), ``buckets`` size buckets (one
  compiles fastest; the straggler tests use several, which reorders clients
  by bucket inside the round).
  eager: 1 device, one bucket and one client per block, so that op-by-op
  execution stays fast and its per-shape kernels are shared across tests; the
  round's math is the same (tests/test_fedavg.py checks that layouts agree).
  """
  algorithm = BUILDERS[algorithm_name]()
  clients = PEOPLE if population else CLIENTS
  work = fl.LocalWork(
    batch_size=batch_size, num_epochs=num_epochs, shuffle=False
  )
  mesh = default_mesh(jax.devices()[:1]) if mode == "eager" else None
  config = fl.RoundConfig(
    clients_per_round,
    work,
    sampling=sampling,
    block_size=1 if mode == "eager" else None,
  )
  engine = fl.Engine(algorithm, config, mesh=mesh)
  data = engine.put_data(
    fl.FederatedDataset.from_clients(clients),
    buckets=1 if mode == "eager" else buckets,
  )
  return engine, data


LR = 0.2
BUILDERS = {
  "fed_prox": lambda: alg.fed_prox(MODEL, optax.sgd(LR), mu=0.5),
  "stragglers_drop": lambda: alg.with_stragglers(
    fl.fed_avg(MODEL, optax.sgd(LR)),
    fraction=0.5,
    num_epochs=3,
    clients_per_round=len(SIZES),
    drop=True,
    seed=7,
  ),
  "stragglers_keep": lambda: alg.with_stragglers(
    alg.fed_prox(MODEL, optax.sgd(LR), mu=0.5),
    fraction=0.5,
    num_epochs=3,
    clients_per_round=len(SIZES),
    drop=False,
    seed=7,
  ),
  "fed_adagrad": lambda: alg.fed_adagrad(MODEL, optax.sgd(LR), 0.05, tau=1e-2),
  "fed_adam": lambda: alg.fed_adam(MODEL, optax.sgd(LR), 0.05, tau=1e-2),
  "fed_yogi": lambda: alg.fed_yogi(MODEL, optax.sgd(LR), 0.05, tau=1e-2),
  "fed_avg_m": lambda: alg.fed_avg_m(MODEL, optax.sgd(LR), 0.7, momentum=0.8),
  "scaffold": lambda: alg.scaffold(
    MODEL, 0.1, optax.sgd(0.9), num_clients=len(POPULATION)
  ),
  "fed_nova_sgd": lambda: alg.fed_nova(MODEL, LR),
  "fed_nova_momentum": lambda: alg.fed_nova(MODEL, 0.1, momentum=0.6),
  "fed_nova_prox": lambda: alg.fed_nova(MODEL, LR, mu=0.7),
  "fed_nova_momentum_prox": lambda: alg.fed_nova(
    MODEL, 0.1, momentum=0.6, mu=0.7
  ),
  "mime_lite": lambda: alg.mime_lite(
    MODEL, optax.sgd(0.1, momentum=0.7), 0.8, num_epochs=2
  ),
  "mime": lambda: alg.mime(
    MODEL, optax.sgd(0.1, momentum=0.7), 0.8, num_epochs=2
  ),
  "q_fed_avg": lambda: alg.q_fed_avg(MODEL, 0.1, q=2.0, num_epochs=2),
  "ditto": lambda: alg.ditto(
    MODEL, optax.sgd(LR), lam=0.4, personal_optimizer=optax.sgd(0.1)
  ),
}

# Eager (op-by-op, jax.disable_jit) runs of the engine round take minutes
# each on 2 cores (FedNova with momentum and prox: 400 s), so they all run
# with -m slow; the default run compares every algorithm jitted.
MODES = ["jit", pytest.param("eager", marks=pytest.mark.slow)]


# ------------------------------------------------------------------ FedProx
@pytest.mark.parametrize("mode", MODES)
def test_fed_prox_matches_numpy(mode):
  engine, data = setup("fed_prox", mode)
  state = engine.init(init_params())
  w = to_list(init_params())
  for _ in range(rounds(mode, 3)):
    state, _ = step(engine, state, data, mode)
    w = aref.fedprox_round(grad, w, CLIENTS, LR, 2, 3, mu=0.5)
    assert_close(to_list(state.server.params), w)


# --------------------------------------------------------------- stragglers
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("drop", [True, False], ids=["drop", "keep"])
def test_stragglers_match_numpy(mode, drop):
  name = "stragglers_drop" if drop else "stragglers_keep"
  engine, data = setup(name, mode, num_epochs=3, buckets="auto")
  state = engine.init(init_params())
  w = to_list(init_params())
  m = len(SIZES)
  for _ in range(rounds(mode, 3)):
    # sampling="all": slot k is client k. The plan is the algorithm's own
    # draw from the broadcast round key; the reference uses it as given.
    key = round_key(state.server)
    epochs = np.asarray(alg.straggler_epochs(key, m, 2, 3))
    assert (epochs < 3).sum() == 2 and epochs.min() >= 1
    state, metrics = step(engine, state, data, mode)
    if drop:
      w = aref.fedprox_round(grad, w, CLIENTS, LR, 3, 3, dropped=epochs < 3)
    else:
      w = aref.fedprox_round(
        grad, w, CLIENTS, LR, 3, 3, mu=0.5, client_epochs=epochs
      )
    assert_close(to_list(engine.algorithm.get_params(state.server)), w)
    np.testing.assert_allclose(float(metrics["stragglers"]), 2 / m)
    if drop:
      kept = sum(n for n, e in zip(SIZES, epochs) if e == 3)
      assert float(metrics["total_weight"]) == kept
  assert int(state.server.round) == rounds(mode, 3)
  if mode == "jit":  # the round counter and key live in the state
    assert engine.num_traces == 1


def test_stragglers_need_epoch_layout():
  a = alg.with_stragglers(
    fl.fed_avg(MODEL, optax.sgd(0.1)),
    fraction=0.5,
    num_epochs=3,
    clients_per_round=2,
    drop=True,
  )
  engine = fl.Engine(
    a, fl.RoundConfig(2, fl.LocalWork(batch_size=2, num_steps=4))
  )
  data = engine.put_data(fl.FederatedDataset.from_clients(CLIENTS))
  with pytest.raises(ValueError, match="not a multiple of num_epochs=3"):
    engine.round(engine.init(init_params()), data)
  with pytest.raises(ValueError, match="num_epochs must be an int >= 2"):
    alg.with_stragglers(
      fl.fed_avg(MODEL, optax.sgd(0.1)),
      fraction=0.5,
      num_epochs=1,
      clients_per_round=2,
      drop=True,
    )


# ------------------------------------------------------------------- FedOpt
FEDOPT = {
  "fed_adagrad": lambda: aref.FedOpt("adagrad", 0.05, tau=1e-2),
  "fed_adam": lambda: aref.FedOpt("adam", 0.05, tau=1e-2),
  "fed_yogi": lambda: aref.FedOpt("yogi", 0.05, tau=1e-2),
  "fed_avg_m": lambda: aref.ServerMomentum(0.7, 0.8),
}


@pytest.mark.parametrize(
  "mode,name",
  [("jit", n) for n in FEDOPT]
  + [pytest.param("eager", "fed_yogi", marks=pytest.mark.slow)],
)
def test_fed_opt_matches_numpy(mode, name):
  engine, data = setup(name, mode, batch_size=None, num_epochs=1)
  state = engine.init(init_params())
  w = to_list(init_params())
  server = FEDOPT[name]()
  for _ in range(rounds(mode, 4)):
    state, _ = step(engine, state, data, mode)
    avg = aref.fedprox_round(grad, w, CLIENTS, LR, 1)
    w = server.step(w, aref.sub(w, avg))
    assert_close(to_list(state.server.params), w)


# ----------------------------------------------------------------- SCAFFOLD
@pytest.mark.parametrize("mode", MODES)
def test_scaffold_matches_numpy_and_keeps_client_state(mode):
  n = len(POPULATION)
  engine, data = setup(
    "scaffold", mode, clients_per_round=3, sampling="uniform", population=True
  )
  state = engine.init(init_params(), seed=3, num_clients=n)
  x = to_list(init_params())
  c = [np.zeros_like(a) for a in x]
  cis = [[np.zeros_like(a) for a in x] for _ in range(n)]
  sampled = np.zeros(n, int)
  for _ in range(rounds(mode, 4)):
    key = jax.random.fold_in(state.rng, state.round)
    ids = np.asarray(fl.data.sample_clients(jax.random.split(key)[0], n, 3))
    sampled[ids] += 1
    before = [np.asarray(a) for a in jax.tree.leaves(state.clients)]
    state, _ = step(engine, state, data, mode)
    x, c = aref.scaffold_round(grad, x, c, cis, PEOPLE, ids, 0.1, 0.9, 2, 3, n)
    assert_close(to_list(state.server.params), x)
    assert_close(to_list(state.server.control), c)
    for i in range(n):
      got = [
        np.asarray(state.clients["Dense_0"][k][i]) for k in ("kernel", "bias")
      ]
      assert_close(got, cis[i])
      if i not in ids:  # non-participants keep their state bit for bit
        after = [np.asarray(a) for a in jax.tree.leaves(state.clients)]
        for b, a in zip(before, after):
          np.testing.assert_array_equal(a[i], b[i])
  if mode == "jit":
    assert (sampled > 0).all() and (sampled < 4).any(), sampled
    assert engine.num_traces == 1


def test_scaffold_requires_population():
  with pytest.raises(ValueError, match="population size"):
    alg.scaffold(MODEL, 0.1, num_clients=None)


# ------------------------------------------------------------------ FedNova
NOVA = {
  "fed_nova_sgd": (LR, 0.0, 0.0),
  "fed_nova_momentum": (0.1, 0.6, 0.0),
  "fed_nova_prox": (LR, 0.0, 0.7),
  "fed_nova_momentum_prox": (0.1, 0.6, 0.7),
}


@pytest.mark.parametrize(
  "mode,name",
  [("jit", n) for n in NOVA]
  + [pytest.param("eager", "fed_nova_momentum_prox", marks=pytest.mark.slow)],
)
def test_fed_nova_matches_numpy(mode, name):
  lr, momentum, mu = NOVA[name]
  engine, data = setup(name, mode)
  state = engine.init(init_params())
  w = to_list(init_params())
  for _ in range(rounds(mode, 3)):
    state, metrics = step(engine, state, data, mode)
    w = aref.fednova_round(grad, w, CLIENTS, lr, 2, 3, momentum, mu)
    assert_close(to_list(state.server.params), w)
  # tau_i = 2 epochs x ceil(n_i / 3) steps differ across clients.
  taus = [2 * -(-n // 3) for n in SIZES]
  norms = [aref.a_norm_impulse(t, lr, momentum, mu) for t in taus]
  np.testing.assert_allclose(
    float(metrics["a_norm"]), np.mean(norms), rtol=1e-5
  )


@pytest.mark.parametrize(
  "momentum,mu", [(0.0, 0.0), (0.9, 0.0), (0.0, 0.3), (0.5, 0.3)]
)
def test_a_norm_matches_coefficient_sums(momentum, mu):
  for tau in (1, 2, 7, 20):
    expected = aref.a_norm_impulse(tau, 0.1, momentum, mu)
    if momentum == 0 or mu == 0:
      np.testing.assert_allclose(
        aref.a_norm_closed_form(tau, 0.1, momentum, mu), expected, rtol=1e-12
      )
    np.testing.assert_allclose(
      float(a_norm(tau, 0.1, momentum, mu)), expected, rtol=1e-5
    )


# --------------------------------------------------------------------- Mime
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["mime_lite", "mime"])
def test_mime_matches_numpy(mode, name):
  corrected = name == "mime"
  engine, data = setup(name, mode)
  state = engine.init(init_params())
  x = to_list(init_params())
  m = [np.zeros_like(a) for a in x]
  for _ in range(rounds(mode, 3)):
    if corrected:  # the gradient round leaves x and the momentum alone
      state, _ = step(engine, state, data, mode)
      assert int(state.server.phase) == 1
      assert_close(to_list(state.server.params), x)
      full = aref.weighted_mean(
        [grad(x, cl["x"].astype(np.float64), cl["y"]) for cl in CLIENTS], SIZES
      )
      assert_close(to_list(state.server.control), full)
    state, _ = step(engine, state, data, mode)
    x, m = aref.mime_round(grad, x, m, CLIENTS, 0.1, 0.7, 0.8, 2, 3, corrected)
    assert_close(to_list(state.server.params), x)
    assert_close(to_list(state.server.opt_state[0].trace), m)
  if mode == "jit":  # both of Mime's phases run the same compiled round
    assert engine.num_traces == 1


# ----------------------------------------------------------------- q-FedAvg
@pytest.mark.parametrize("mode", MODES)
def test_q_fed_avg_matches_numpy(mode):
  engine, data = setup("q_fed_avg", mode)
  state = engine.init(init_params())
  w = to_list(init_params())
  for _ in range(rounds(mode, 3)):
    state, metrics = step(engine, state, data, mode)
    w_prev = w
    w = aref.qfedavg_round(loss_grad, w, CLIENTS, 0.1, 2, 3, q=2.0)
    assert_close(to_list(state.server.params), w)
  losses = [
    loss_grad(w_prev, c["x"].astype(np.float64), c["y"])[0] for c in CLIENTS
  ]
  np.testing.assert_allclose(
    float(metrics["loss_at_server"]), np.mean(losses), rtol=1e-5
  )


# -------------------------------------------------------------------- Ditto
@pytest.mark.parametrize("mode", MODES)
def test_ditto_matches_numpy_and_keeps_personal_models(mode):
  n = len(POPULATION)
  engine, data = setup(
    "ditto", mode, clients_per_round=2, sampling="uniform", population=True
  )
  state = engine.init(init_params(), seed=4, num_clients=n)
  w = to_list(init_params())
  personal = [to_list(init_params()) for _ in range(n)]
  for _ in range(rounds(mode, 4)):
    key = jax.random.fold_in(state.rng, state.round)
    ids = np.asarray(fl.data.sample_clients(jax.random.split(key)[0], n, 2))
    state, _ = step(engine, state, data, mode)
    w = aref.ditto_round(grad, w, personal, PEOPLE, ids, LR, 0.1, 0.4, 2, 3)
    assert_close(to_list(state.server.params), w)
    for i in range(n):
      assert_close(to_list(personal_params(state, i)), personal[i])


# ------------------------------------------------------------ TFF facades
def test_build_fed_prox_process_matches_numpy():
  process = fl.learning.build_fed_prox_process(
    MODEL,
    client_optimizer_fn=lambda: optax.sgd(LR),
    server_optimizer_fn=lambda: optax.sgd(1.0),
    mu=0.5,
    local_epochs=2,
    batch_size=None,
  )
  state = process.initialize(seed=0)
  w = to_list(process.get_model_weights(state))
  for _ in range(2):
    state, metrics = process.next(state, CLIENTS)
    w = aref.fedprox_round(grad, w, CLIENTS, LR, 2, None, mu=0.5)
  assert_close(to_list(process.get_model_weights(state)), w)
  assert metrics["num_clients"] == len(CLIENTS)


def test_iterative_process_rejects_stateful_algorithms():
  with pytest.raises(ValueError, match="per-client state"):
    fl.learning.build_iterative_process(
      MODEL, alg.scaffold(MODEL, 0.1, num_clients=4)
    )
