"""Client-sharded data: each device holds ~1/nd of the clients; rounds equal
rounds on replicated data up to float summation order."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_lite as fl
from fedjax_lite import data as fd
from fedjax_lite.engine.round import default_mesh

D, K = 4, 3
# A heavy tail (shards unbalanced in rows) in 4 "auto" size buckets; each
# bucket is one more loop in every compiled round.
SIZES = (2, 30, 3, 4, 25, 6, 7, 3, 2, 40, 5, 8, 3, 1, 28, 8, 3)


def make_dataset(rng, sizes=SIZES):
  return fl.FederatedDataset.from_clients(
    [
      {
        "x": rng.standard_normal((n, D)).astype(np.float32),
        "y": rng.integers(0, K, n).astype(np.int32),
      }
      for n in sizes
    ]
  )


def cpu_engine(*args, **kwargs):
  """An engine over the 4 CPU devices (whatever the default backend)."""
  return fl.Engine(*args, mesh=default_mesh(jax.devices("cpu")), **kwargs)


def run_both(algorithm, ds, config, rounds=3, seed=5, buckets="auto"):
  out = {}
  for placement in ("replicated", "sharded"):
    engine = cpu_engine(algorithm, config)
    data = engine.put_data(ds, buckets=buckets, placement=placement)
    params = fl.models.mlp(D, K, hidden=(6,)).init(jax.random.PRNGKey(1))
    state = engine.init(params, seed=seed, num_clients=ds.num_clients)
    out[placement] = engine.run(state, data, rounds) + (data,)
  return out


def assert_same(out):
  (s1, h1, _), (s2, h2, _) = out["replicated"], out["sharded"]
  chex.assert_trees_all_close(s1.server, s2.server, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(h1["num_clients"], h2["num_clients"])
  np.testing.assert_allclose(h1["loss"], h2["loss"], rtol=1e-6)
  if s1.clients is not None:
    chex.assert_trees_all_close(s1.clients, s2.clients, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
  "sampling,buckets", [("uniform", "auto"), ("weighted", 1), ("uniform", 3)]
)
def test_sharded_equals_replicated(rng, sampling, buckets):
  assert len(jax.devices("cpu")) == 4, "conftest forces 4 CPU devices"
  model = fl.models.mlp(D, K, hidden=(6,))
  work = fl.LocalWork(batch_size=4, num_epochs=2)
  config = fl.RoundConfig(9, work, sampling=sampling, block_size=1)
  alg = fl.fed_avg(model, optax.sgd(0.05), optax.adam(0.01))
  out = run_both(alg, make_dataset(rng), config, buckets=buckets)
  assert out["sharded"][2].sharded and not out["replicated"][2].sharded
  assert_same(out)


def test_sharded_stateful_algorithm_and_auto_blocks(rng):
  model = fl.models.mlp(D, K, hidden=(6,))
  config = fl.RoundConfig(6, fl.LocalWork(batch_size=3, num_steps=4))
  ds = make_dataset(rng)
  alg = fl.algorithms.scaffold(model, 0.05, num_clients=ds.num_clients)
  assert_same(run_both(alg, ds, config))


def test_sharded_pooled_runs_equal_separate_runs(rng):
  model = fl.models.mlp(D, K, hidden=(6,))
  ds = make_dataset(rng)
  engine = cpu_engine(
    fl.fed_avg(model, optax.sgd(0.05)),
    fl.RoundConfig(5, fl.LocalWork(batch_size=4, num_epochs=1)),
  )
  data = engine.put_data(ds, placement="sharded")
  params = model.init(jax.random.PRNGKey(1))
  states = [engine.init(params, seed=s) for s in (0, 1)]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
  pooled, _ = jax.jit(engine.rounds_body)(stacked, data)
  for r, s in enumerate(states):
    one, _ = engine.round(s, data)
    chex.assert_trees_all_close(
      jax.tree.map(lambda a: a[r], pooled.server.params),
      one.server.params,
      rtol=1e-6,
      atol=1e-6,
    )


def test_sharded_debug_round_equals_jitted(rng):
  model = fl.models.logistic_regression(D, K)
  ds = make_dataset(rng, sizes=(3, 9, 4, 12, 5, 7))
  config = fl.RoundConfig(3, fl.LocalWork(batch_size=4, num_epochs=1))
  out = []
  for debug in (False, True):
    engine = cpu_engine(fl.fed_avg(model, optax.sgd(0.1)), config, debug=debug)
    data = engine.put_data(ds, placement="sharded")
    state = engine.init(model.init(jax.random.PRNGKey(0)), seed=3)
    out.append(engine.round(state, data)[0].server.params)
  chex.assert_trees_all_close(out[0], out[1], rtol=1e-6, atol=1e-6)


def test_shard_assignment_is_balanced():
  counts = np.random.default_rng(0).integers(1, 100, size=1001)
  bucket = (counts > 50).astype(np.int32)
  owner, local, rows = fd.shard_clients(counts, bucket, 4)
  for j in (0, 1):
    per_device = np.bincount(owner[bucket == j], minlength=4)
    assert per_device.max() - per_device.min() <= 1
  assert rows.sum() == counts.sum()
  assert rows.max() / rows.mean() < 1.02
  # Within a shard, clients sit back to back in index order.
  for d in range(4):
    idx = np.flatnonzero(owner == d)
    np.testing.assert_array_equal(
      local[idx], np.cumsum(counts[idx]) - counts[idx]
    )


def test_sharded_memory_is_a_share_of_replicated(rng):
  ds = make_dataset(rng, sizes=tuple(range(1, 201)))
  engine = cpu_engine(
    fl.fed_avg(fl.models.logistic_regression(D, K), optax.sgd(0.1)),
    fl.RoundConfig(4, fl.LocalWork(batch_size=4)),
  )
  rep = fd.resident_bytes(engine.put_data(ds, buckets=1))
  sh = fd.resident_bytes(engine.put_data(ds, buckets=1, placement="sharded"))
  ratio = max(sh["features_per_device"].values()) / max(
    rep["features_per_device"].values()
  )
  # 1/4 of the rows plus one padded client per device.
  assert 0.24 < ratio < 0.30, ratio


def test_client_loader_reads_each_client_once(rng):
  ds = make_dataset(rng)
  asked = []

  def load(clients):
    asked.append(clients)
    return fd.client_rows(ds, clients)

  engine = cpu_engine(
    fl.fed_avg(fl.models.logistic_regression(D, K), optax.sgd(0.1)),
    fl.RoundConfig(4, fl.LocalWork(batch_size=4)),
  )
  loader = fd.ClientLoader(ds.counts, load)
  data = engine.put_data(loader, placement="sharded")
  seen = np.sort(np.concatenate(asked[1:]))  # asked[0]: one feature probe
  np.testing.assert_array_equal(seen, np.arange(ds.num_clients))
  ref = engine.put_data(ds, placement="sharded")
  for k in ds.features:
    np.testing.assert_array_equal(data.features[k], ref.features[k])


def test_bad_inputs(rng, monkeypatch):
  ds = make_dataset(rng)
  engine = cpu_engine(
    fl.fed_avg(fl.models.logistic_regression(D, K), optax.sgd(0.1)),
    fl.RoundConfig(4, fl.LocalWork(batch_size=4)),
  )
  with pytest.raises(ValueError, match="placement must be one of"):
    engine.put_data(ds, placement="everywhere")
  bad = fd.ClientLoader(ds.counts, lambda c: {"x": np.zeros((1, D))})
  with pytest.raises(ValueError, match="expected the clients' rows"):
    engine.put_data(bad, placement="sharded")
  with pytest.raises(TypeError, match="placement='sharded'"):
    engine.put_data(fd.ClientLoader(ds.counts, lambda c: {}))
  # Data sharded over 4 devices given to a 1-device engine.
  data = engine.put_data(ds, placement="sharded")
  small = fl.Engine(
    engine.algorithm, engine.config, default_mesh(jax.devices("cpu")[:1])
  )
  state = small.init(
    fl.models.logistic_regression(D, K).init(jax.random.PRNGKey(0))
  )
  with pytest.raises(ValueError, match="sharded over 4 devices"):
    small.round(state, data)
  # Too large for memory: the error says how much is needed.
  monkeypatch.setattr(
    fl.runtime, "device_memory_bytes", lambda device: (1000, "a test limit")
  )
  with pytest.raises(MemoryError, match=r"needs .* GiB .* a test limit"):
    engine.put_data(ds)
  with pytest.raises(MemoryError, match="Shard the clients"):
    engine.put_data(ds, placement="sharded")


def test_sharded_blocks_are_sized_like_replicated(rng):
  """The block plan reads the per-example size of sharded features
  ``[devices, rows, ...]`` from their trailing axes."""
  ds = make_dataset(rng, sizes=tuple(range(1, 201)))
  model = fl.models.logistic_regression(D, K)
  engine = cpu_engine(
    fl.fed_avg(model, optax.sgd(0.1)),
    fl.RoundConfig(100, fl.LocalWork(batch_size=4)),
  )
  state = engine.init(model.init(jax.random.PRNGKey(0)))
  plans = [
    engine.block_plan(engine.put_data(ds, placement=p), state)
    for p in ("replicated", "sharded")
  ]
  assert plans[0] == plans[1]
  assert max(plans[0].block_sizes) > 1


def test_assignment_balances_across_buckets():
  # 6 buckets of 5 clients on 4 devices: the remainders go to the lightest.
  counts = np.repeat(np.arange(1, 7) * 10, 5)
  owner, _, rows = fd.shard_clients(counts, np.repeat(np.arange(6), 5), 4)
  assert sorted(np.bincount(owner, minlength=4)) == [7, 7, 8, 8]
  assert rows.max() / rows.mean() < 1.05
  # As many clients as devices: every device holds one.
  owner, _, _ = fd.shard_clients(np.array([3, 5, 7, 4]), np.arange(4), 4)
  assert sorted(owner) == [0, 1, 2, 3]


def test_loader_with_an_empty_device_and_bad_shapes(rng):
  ds = make_dataset(rng, sizes=(5, 3, 9))  # 3 clients on 4 devices

  def load(clients):
    return {
      k: np.concatenate([ds.client(int(c))[k] for c in clients])
      for k in ds.features
    }

  config = fl.RoundConfig(2, fl.LocalWork(batch_size=4))
  alg = fl.fed_avg(fl.models.logistic_regression(D, K), optax.sgd(0.1))
  engine = cpu_engine(alg, config)
  data = engine.put_data(fd.ClientLoader(ds.counts, load), placement="sharded")
  assert np.bincount(np.asarray(data.owner), minlength=4).min() == 0
  params = fl.models.logistic_regression(D, K).init(jax.random.PRNGKey(0))
  got, _ = engine.round(engine.init(params), data)
  want, _ = engine.round(engine.init(params), engine.put_data(ds))
  chex.assert_trees_all_close(got.server, want.server, rtol=1e-6, atol=1e-6)

  def bad(clients):
    out = load(clients)
    if 0 not in clients:  # later calls change the per-example shape
      out["x"] = out["x"][:, :1]
    return out

  with pytest.raises(ValueError, match=r"x: float32\[1\]"):
    engine.put_data(fd.ClientLoader(ds.counts, bad), placement="sharded")
  with pytest.raises(ValueError, match="evaluate needs replicated data"):
    fl.evaluate(fl.models.logistic_regression(D, K), params, data)
