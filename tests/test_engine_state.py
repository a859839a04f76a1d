"""Per-client persistent state in the engine (the path SCAFFOLD-like methods use)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_lite as fl


def counting_algorithm(model):
  """Each participating client increments its counter and reports it."""
  base = fl.fed_avg(model, optax.sgd(0.0))

  def client_init(params):
    del params
    return {
      "count": jnp.zeros((), jnp.int32),
      "last_round_examples": jnp.zeros((), jnp.float32),
    }

  def client_update(server_params, client_state, data, rng):
    out = base.client_update(server_params, None, data, rng)
    new_state = {
      "count": client_state["count"] + 1,
      "last_round_examples": data.num_examples.astype(jnp.float32),
    }
    return out._replace(state=new_state)

  return base._replace(
    client_init=client_init, client_update=client_update, name="counting"
  )


def test_client_states_persist_and_non_participants_keep_theirs(rng):
  sizes = [3, 5, 2, 7, 4, 6, 9, 1]
  clients = [
    {
      "x": rng.standard_normal((n, 2)).astype(np.float32),
      "y": rng.integers(0, 2, n).astype(np.int32),
    }
    for n in sizes
  ]
  ds = fl.FederatedDataset.from_clients(clients)
  model = fl.models.logistic_regression(2, 2)
  engine = fl.Engine(
    counting_algorithm(model),
    fl.RoundConfig(3, fl.LocalWork(batch_size=2), block_size=1),
  )
  # two size buckets (not the five "auto" picks): a round's clients are
  # trained in bucket order, so their states go back by id
  data = engine.put_data(ds, buckets=2)
  assert len(data.bucket_sizes) == 2
  state = engine.init(
    model.init(jax.random.PRNGKey(0)), seed=0, num_clients=len(sizes)
  )
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
    np.asarray(sizes)[seen],
  )
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


def _stack(states):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def test_pooled_runs_match_separate_rounds(rng):
  """R runs in ONE pooled round (shared size-bucket blocks) == R rounds."""
  sizes = [3, 5, 2, 7, 4, 6, 9, 1, 8, 5]
  clients = [
    {
      "x": rng.standard_normal((n, 3)).astype(np.float32),
      "y": rng.integers(0, 3, n).astype(np.int32),
    }
    for n in sizes
  ]
  ds = fl.FederatedDataset.from_clients(clients)
  model = fl.models.logistic_regression(3, 3)
  lrs = [0.05, 0.2, 0.1]

  def make(h):
    return fl.algorithms.scaffold(
      model, h["lr"], optax.sgd(1.0), num_clients=len(sizes)
    )

  cfg = fl.RoundConfig(4, fl.LocalWork(batch_size=2), sampling="weighted")
  engines = [fl.Engine(make({"lr": lr}), cfg) for lr in lrs]
  # two size buckets (as good as "several" here, and each bucket is one
  # more loop in every compiled round)
  data = engines[0].put_data(ds, buckets=2)
  assert len(data.bucket_sizes) == 2
  states = [
    e.init(
      model.init(jax.random.PRNGKey(s)), seed=10 + s, num_clients=len(sizes)
    )
    for s, e in enumerate(engines)
  ]
  pooled = engines[0]
  step = jax.jit(lambda st, h: pooled.rounds_body(st, data, make, h))
  st = _stack(states)
  hp = {"lr": jnp.asarray(lrs, jnp.float32)}
  for _ in range(3):
    st, metrics = step(st, hp)
    for r, e in enumerate(engines):
      states[r], m = e.round(states[r], data)
      got = jax.tree.map(lambda a, r=r: a[r], st)
      np.testing.assert_array_equal(
        np.asarray(got.round), np.asarray(states[r].round)
      )
      for a, b in zip(
        jax.tree.leaves((got.server, got.clients)),
        jax.tree.leaves((states[r].server, states[r].clients)),
      ):
        np.testing.assert_allclose(
          np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6
        )
      for k in ("loss", "num_clients", "total_weight"):
        np.testing.assert_allclose(float(metrics[k][r]), float(m[k]), rtol=1e-5)
  # The runs really differ (own seeds and learning rates).
  k = np.asarray(st.server.params["Dense_0"]["kernel"])
  assert not np.allclose(k[0], k[1]) and not np.allclose(k[1], k[2])


def test_pooled_rounds_check_hyperparameters(rng):
  model = fl.models.logistic_regression(2, 2)
  engine = fl.Engine(fl.fed_avg(model, optax.sgd(0.1)), fl.RoundConfig(2))
  ds = fl.FederatedDataset.from_clients(
    [{"x": np.ones((2, 2), np.float32), "y": np.zeros(2, np.int32)}] * 3
  )
  data = engine.put_data(ds)
  st = _stack(
    [engine.init(model.init(jax.random.PRNGKey(0)), seed=s) for s in range(2)]
  )
  with np.testing.assert_raises_regex(ValueError, "together"):
    engine.rounds_body(st, data, hparams={"lr": jnp.ones(2)})
  one = engine.init(model.init(jax.random.PRNGKey(0)), seed=0)
  with np.testing.assert_raises_regex(ValueError, "leading run axis"):
    engine.rounds_body(one, data)
  with np.testing.assert_raises_regex(ValueError, "size 2"):
    engine.rounds_body(st.replace(rng=st.rng[:1]), data)
  with np.testing.assert_raises_regex(ValueError, r"\[R=2\]"):
    engine.rounds_body(
      st, data, lambda h: fl.fed_avg(model, optax.sgd(0.1)), {"lr": jnp.ones(3)}
    )


def test_init_gives_the_complete_state(rng):
  """EngineState is complete from init (the aggregator's state included):
  every round returns a state of the same structure; without data, a
  stateful aggregator is a clear error."""
  from fedjax_lite import aggregators as agg

  ds = fl.FederatedDataset.from_clients(
    [
      {
        "x": rng.standard_normal((n, 2)).astype(np.float32),
        "y": rng.integers(0, 2, n).astype(np.int32),
      }
      for n in (3, 5, 2, 4)
    ]
  )
  model = fl.models.logistic_regression(2, 2)
  params = model.init(jax.random.PRNGKey(0))
  cfg = fl.RoundConfig(3, fl.LocalWork(batch_size=2))
  adaptive = agg.clipped(agg.weighted_mean(), 0.5, adaptive=True)
  engine = fl.Engine(
    fl.fed_avg(model, optax.sgd(0.1), aggregator=adaptive), cfg
  )
  with pytest.raises(ValueError, match=r"no data yet.*data=engine.put_data"):
    engine.init(params)
  # one size bucket: what init and rounds return does not depend on it
  data = fl.data.placement.put_data(ds, cfg.local_work, engine.mesh, 1)
  state = engine.init(params, seed=1, data=data)
  assert float(state.aggregator["clip_norm"]) == pytest.approx(0.5)
  new, _ = engine.round(state, data)
  assert jax.tree.structure(new) == jax.tree.structure(state)

  # init with the data binds the aggregator to the run (Aggregator.bind).
  def refuse(run):
    raise ValueError(f"cannot serve a population of {run.population}")

  picky = fl.Engine(
    fl.fed_avg(
      model, optax.sgd(0.1), aggregator=adaptive._replace(bind=refuse)
    ),
    cfg,
  )
  with pytest.raises(ValueError, match="cannot serve a population of 4"):
    picky.init(params, data=data)
  # Stateless aggregators keep None, with or without data.
  plain = fl.Engine(fl.fed_avg(model, optax.sgd(0.1)), cfg)
  assert plain.init(params).aggregator is None
  new, _ = plain.round(plain.init(params, data=data), data)
  assert new.aggregator is None


def test_put_data_is_the_placement_function(rng):
  ds = fl.FederatedDataset.from_clients(
    [
      {
        "x": rng.standard_normal((n, 2)).astype(np.float32),
        "y": rng.integers(0, 2, n).astype(np.int32),
      }
      for n in (3, 5, 2, 4)
    ]
  )
  model = fl.models.logistic_regression(2, 2)
  engine = fl.Engine(fl.fed_avg(model, optax.sgd(0.1)), fl.RoundConfig(2))
  for placement in ("replicated", "sharded"):
    got = engine.put_data(ds, buckets=2, placement=placement)
    want = fl.data.placement.put_data(
      ds, engine.config.local_work, engine.mesh, 2, placement=placement
    )
    assert got.sharded == want.sharded == (placement == "sharded")
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert engine.put_data(got) is got
