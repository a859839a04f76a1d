"""The debug round (clients one by one in Python, no jit) equals the jitted
round, and code inside client_update runs once per client."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_lite as fl
from fedjax_lite import aggregators as agg

D, K = 3, 3
SIZES = (4, 9, 2, 7, 5, 6, 3, 8)


def setup(aggregator=None, stateful=False, clients_per_round=5):
  r = np.random.default_rng(0)
  clients = [
    {
      "x": r.standard_normal((n, D)).astype(np.float32),
      "y": r.integers(0, K, n).astype(np.int32),
    }
    for n in SIZES
  ]
  model = fl.models.logistic_regression(D, K)
  if stateful:
    alg = fl.algorithms.scaffold(
      model, 0.1, optax.sgd(1.0), num_clients=len(SIZES)
    )
  else:
    alg = fl.fed_avg(model, optax.sgd(0.1), optax.adam(0.05))
  alg = alg._replace(aggregator=aggregator)
  cfg = fl.RoundConfig(
    clients_per_round, fl.LocalWork(batch_size=2), block_size=1
  )
  ds = fl.FederatedDataset.from_clients(clients)
  params = model.init(jax.random.PRNGKey(0))
  return alg, cfg, ds, params


# The 8 clients in 2 size buckets (6 and 9 examples, padded to batches of
# 2) in every test here: a debug round compiles its eager ops once per
# bucket shape, and the tests of this module share those compiles.
BUCKETS = 2
STAGES = ("sample", "gather", "client_work", "add_block", "merge")


def _equal_rounds(aggregator, stateful):
  """2 jitted rounds and 2 debug rounds (``run``) of the same engine set-up
  over 2 size buckets, with every function of STAGES wrapped to record its
  calls (the jitted round calls them once as it traces):
  ``(jitted state, jitted metrics per round, debug state, debug history,
  {debug: names of the stages called})``."""
  from fedjax_lite.engine import stages

  calls = []
  with pytest.MonkeyPatch.context() as mp:
    for name in STAGES:
      fn = getattr(stages, name)

      def wrapped(*args, _fn=fn, _name=name):
        calls.append(_name)
        return _fn(*args)

      mp.setattr(stages, name, wrapped)
    alg, cfg, ds, params = setup(aggregator, stateful)
    engine = fl.Engine(alg, cfg)
    debug = fl.Engine(alg, cfg, debug=True)
    data = engine.put_data(ds, buckets=BUCKETS)
    assert len(data.bucket_sizes) == BUCKETS
    calls.clear()
    s1 = engine.init(params, seed=4, num_clients=len(SIZES))
    jitted = []
    for _ in range(2):
      s1, m1 = engine.round(s1, data)
      jitted.append(m1)
    seen = {False: set(calls)}
    calls.clear()
    # run() in debug mode is debug rounds one by one, metrics stacked like
    # the scanned run's.
    s2, hist = debug.run(
      debug.init(params, seed=4, num_clients=len(SIZES), data=data), data, 2
    )
    seen[True] = set(calls)
  return s1, jitted, s2, hist, seen


# (aggregator, stateful) of each set-up of test_debug_round_equals_jitted_round.
SETUPS = {
  "scaffold_fedavg": (None, True),
  "adaptive_trimmed": (
    agg.clipped(agg.trimmed_mean(0.2), 0.3, adaptive=True),
    False,
  ),
}


@pytest.fixture(scope="module")
def equal_rounds():
  """``_equal_rounds`` of a set-up of SETUPS, run once per module (the
  adaptive_trimmed one serves two tests)."""
  cache = {}

  def get(name):
    if name not in cache:
      cache[name] = _equal_rounds(*SETUPS[name])
    return cache[name]

  return get


@pytest.mark.parametrize(
  "name",
  [pytest.param("scaffold_fedavg", marks=pytest.mark.slow), "adaptive_trimmed"],
)
def test_debug_round_equals_jitted_round(name, equal_rounds):
  s1, jitted, s2, hist, _ = equal_rounds(name)
  assert jax.tree.structure(s1) == jax.tree.structure(s2)
  for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
    np.testing.assert_allclose(
      np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6
    )
  assert hist["loss"].shape == (2,)
  for t, m1 in enumerate(jitted):
    assert set(m1) == set(hist)
    for k in m1:
      np.testing.assert_allclose(
        float(m1[k]), float(hist[k][t]), rtol=1e-5, atol=1e-6
      )


def test_debug_and_jitted_rounds_run_the_same_stage_functions(equal_rounds):
  """Both backends call the functions of fedjax_lite.engine.stages (no second
  implementation of the round): patched stages are seen by both (the
  adaptive_trimmed rounds of test_debug_round_equals_jitted_round, recorded
  with every stage wrapped)."""
  *_, seen = equal_rounds("adaptive_trimmed")
  assert (
    seen[False]
    == seen[True]
    == {
      "sample",
      "gather",
      "client_work",
      "add_block",
      "merge",
    }
  )


def test_print_inside_client_update_runs_once_per_client(capsys):
  alg, cfg, ds, params = setup(agg.coordinate_median())
  base_update = alg.client_update

  def client_update(bcast, cstate, cdata, rng):
    # Concrete values: the debug round runs without jit.
    print(f"client with {int(cdata.num_examples)} examples")
    return base_update(bcast, cstate, cdata, rng)

  alg = alg._replace(client_update=client_update)
  engine = fl.Engine(alg, cfg, debug=True)
  data = engine.put_data(ds, buckets=BUCKETS)
  state = engine.init(params, seed=1)
  capsys.readouterr()
  state, _ = fl.engine.debug_round(engine, state, data)
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == cfg.clients_per_round
  key = fl.engine.round_keys(jnp.asarray(jax.random.PRNGKey(1)), jnp.int32(0))[
    0
  ]
  ids = np.asarray(
    fl.data.sample_clients(key, len(SIZES), cfg.clients_per_round)
  )
  assert lines == [f"client with {SIZES[i]} examples" for i in ids]


def _failing_client(alg, bad_client):
  base_update = alg.client_update

  def client_update(bcast, cstate, cdata, rng):
    if int(cdata.client_id) == bad_client:  # concrete in the debug round
      raise ValueError(f"client {bad_client} has no usable data")
    return base_update(bcast, cstate, cdata, rng)

  return alg._replace(client_update=client_update)


def test_debug_round_names_the_failing_client_and_stage():
  alg, cfg, ds, params = setup(clients_per_round=len(SIZES))
  cfg = fl.RoundConfig(len(SIZES), cfg.local_work, sampling="all")
  engine = fl.Engine(_failing_client(alg, 3), cfg, debug=True)
  data = engine.put_data(ds, buckets=BUCKETS)
  state = engine.init(params, seed=0)
  with pytest.raises(ValueError) as e:
    engine.round(state, data)
  assert str(e.value) == (
    "client 3, stage 'client_work': client 3 has no usable data"
  ), str(e.value)
  assert isinstance(e.value.__cause__, ValueError)
  # An aggregator's add that fails names the client being added.
  base = agg.weighted_mean()

  def add(*args):
    raise ValueError("the accumulator is full")

  engine = fl.Engine(
    alg._replace(aggregator=base._replace(add=add)), cfg, debug=True
  )
  with pytest.raises(ValueError) as e:
    engine.round(engine.init(params, seed=0, data=data), data)
  assert str(e.value) == (
    "client 0, stage 'aggregator_add': the accumulator is full"
  ), str(e.value)
  # A round-level stage names only the stage.
  engine = fl.Engine(
    alg._replace(server_update=lambda s, a: 1 / 0), cfg, debug=True
  )
  with pytest.raises(ZeroDivisionError, match=r"^stage 'server_update': "):
    engine.round(engine.init(params, seed=0, data=data), data)
