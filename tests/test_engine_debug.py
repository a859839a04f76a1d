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


@pytest.mark.parametrize(
  "aggregator,stateful",
  [
    pytest.param(None, True, marks=pytest.mark.slow),
    (agg.clipped(agg.trimmed_mean(0.2), 0.3, adaptive=True), False),
  ],
  ids=["scaffold_fedavg", "adaptive_trimmed"],
)
def test_debug_round_equals_jitted_round(aggregator, stateful):
  alg, cfg, ds, params = setup(aggregator, stateful)
  engine = fl.Engine(alg, cfg)
  debug = fl.Engine(alg, cfg, debug=True)
  data = engine.put_data(ds, buckets=3)
  assert len(data.bucket_sizes) == 3
  s1 = engine.init(params, seed=4, num_clients=len(SIZES))
  jitted = []
  for _ in range(2):
    s1, m1 = engine.round(s1, data)
    jitted.append(m1)
  # run() in debug mode is debug rounds one by one, metrics stacked like the
  # scanned run's.
  s2, hist = debug.run(
    debug.init(params, seed=4, num_clients=len(SIZES), data=data), data, 2
  )
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


def test_print_inside_client_update_runs_once_per_client(capsys):
  alg, cfg, ds, params = setup(agg.coordinate_median())
  base_update = alg.client_update

  def client_update(bcast, cstate, cdata, rng):
    # Concrete values: the debug round runs without jit.
    print(f"client with {int(cdata.num_examples)} examples")
    return base_update(bcast, cstate, cdata, rng)

  alg = alg._replace(client_update=client_update)
  engine = fl.Engine(alg, cfg, debug=True)
  data = engine.put_data(ds)
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
