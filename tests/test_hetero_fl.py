"""HeteroFL: nested width slices trained in one jitted round (masks), against
FedAvg, standalone smaller models and a float64 numpy reference."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_lite as fl
from fedjax_lite import hetero
from fedjax_lite.hetero import layers as L
from fedjax_lite.hetero.hetero_fl import level_units

D, K = 6, 3
SIZES = (5, 9, 4, 7)
MLP = fl.models.mlp(D, K, (8, 8))
CNN = fl.models.cnn((6, 6, 1), K, channels=(4, 8), hidden=8, kernel_size=3)


def make_clients(sizes, shape, seed):
  r = np.random.default_rng(seed)
  return [
    {
      "x": r.standard_normal((n,) + shape).astype(np.float32),
      "y": r.integers(0, K, n).astype(np.int32),
    }
    for n in sizes
  ]


def engine_for(algorithm, epochs=2):
  cfg = fl.RoundConfig(
    len(SIZES),
    fl.LocalWork(batch_size=3, num_epochs=epochs, shuffle=False),
    sampling="all",
  )
  return fl.Engine(algorithm, cfg)


def one_client_data(client, client_id, batch_size=3):
  """The ClientData the engine gathers for ``client`` (one pass, no shuffle)."""
  n = client["y"].shape[0]
  steps = -(-n // batch_size)
  pad = steps * batch_size - n
  batches = {
    k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]).reshape(
      (steps, batch_size) + v.shape[1:]
    )
    for k, v in client.items()
  }
  mask = (np.arange(steps * batch_size) < n).reshape(steps, batch_size)
  return fl.ClientData(
    batches=batches,
    mask=mask,
    num_examples=np.int32(n),
    client_id=np.int32(client_id),
    slot=np.int32(client_id),
  )


def test_full_capacity_is_fed_avg():
  clients = make_clients(SIZES, (D,), 0)
  ds = fl.FederatedDataset.from_clients(clients)
  params = MLP.init(jax.random.PRNGKey(1))
  fed_avg = fl.fed_avg(MLP, optax.sgd(0.1))
  full = hetero.hetero_fl(MLP, optax.sgd(0.1), client_rates=[1.0] * len(SIZES))
  # Every client's update and the server rule are FedAvg's, bit for bit.
  for k, c in enumerate(clients):
    data = one_client_data(c, k)
    a = jax.jit(fed_avg.client_update)(
      params, None, data, jax.random.PRNGKey(k)
    )
    b = jax.jit(full.client_update)(params, None, data, jax.random.PRNGKey(k))
    chex.assert_trees_all_equal(b.update["d"], a.update)
    assert all(bool(jnp.all(h == 1)) for h in jax.tree.leaves(b.update["held"]))
    assert float(b.weight) == float(a.weight)
  mean = jax.tree.map(lambda p: jnp.full(p.shape, 0.37, p.dtype), params)
  agg = fl.Aggregate(
    mean=mean,
    total_weight=jnp.float32(3.0),
    num_clients=jnp.float32(2.0),
    metrics={},
  )
  s0 = fed_avg.server_init(params)
  chex.assert_trees_all_equal(
    full.server_update(
      s0,
      agg._replace(mean={"d": mean, "held": jax.tree.map(jnp.ones_like, mean)}),
    ).params,
    fed_avg.server_update(s0, agg).params,
  )
  # Whole compiled engine rounds: FedAvg's, bit for bit.
  out = []
  for algorithm in (fed_avg, full):
    engine = engine_for(algorithm)
    state = engine.init(params, seed=3)
    data = engine.put_data(ds)
    for _ in range(3):
      state, _ = engine.round(state, data)
    out.append(state.server.params)
  for a, b in zip(jax.tree.leaves(out[0]), jax.tree.leaves(out[1])):
    # The documented contract: equal to float32 rounding (1e-6 relative to
    # the leaf's scale); two different compiled computations are not
    # promised equal bits ...
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6 * np.abs(a).max())
    # ... though XLA's CPU backend gives them today.
    np.testing.assert_array_equal(b, a)


@pytest.mark.parametrize(
  "model,shape,rate,jit",
  [
    pytest.param(MLP, (D,), 0.5, False, marks=pytest.mark.slow),
    (MLP, (D,), 0.5, True),
    (MLP, (D,), 0.25, True),
    pytest.param(CNN, (6, 6, 1), 0.5, True, marks=pytest.mark.slow),
  ],
  ids=["mlp-half-eager", "mlp-half-jit", "mlp-quarter-jit", "cnn-half-jit"],
)
def test_client_trains_exactly_the_sliced_sub_network(model, shape, rate, jit):
  client = make_clients((7,), shape, 1)[0]
  params = model.init(jax.random.PRNGKey(2))
  rates = [1.0, rate]
  algorithm = hetero.hetero_fl(model, optax.sgd(0.2), client_rates=rates)
  data = one_client_data(client, client_id=1)
  update = jax.jit(algorithm.client_update) if jit else algorithm.client_update
  out = update(params, None, data, jax.random.PRNGKey(0))

  # The standalone smaller network with the sliced weights.
  sub = hetero.sub_model_params(params, model, rate)
  widths = [sub[c.name]["bias"].shape[0] for c in L.chain_of_model(model)[:-1]]
  if model is MLP:
    small = fl.models.mlp(D, K, tuple(widths))
  else:
    small = fl.models.cnn(
      (6, 6, 1), K, channels=tuple(widths[:2]), hidden=widths[2], kernel_size=3
    )
  chex.assert_trees_all_equal_shapes(sub, small.init(jax.random.PRNGKey(0)))
  base = fl.fed_avg(small, optax.sgd(0.2))
  ref = base.client_update(sub, None, data, jax.random.PRNGKey(0))

  # Forward pass of the masked global network == the small network.
  masks = L.param_masks(
    L.chain_of_model(model),
    L.prefix_masks(L.hidden_widths(L.chain_of_model(model)), widths),
  )
  batch = {"x": client["x"]}
  np.testing.assert_allclose(
    model.apply(L.apply_masks(params, masks), batch),
    small.apply(sub, batch),
    rtol=1e-6,
    atol=1e-6,
  )
  # Its update, sliced, is the small network's update; zero elsewhere.
  got = hetero.sub_model_params(out.update["d"], model, rate)
  chex.assert_trees_all_close(got, ref.update, rtol=1e-5, atol=1e-6)
  total = sum(
    float(jnp.sum(jnp.abs(x))) for x in jax.tree.leaves(out.update["d"])
  )
  inside = sum(float(jnp.sum(jnp.abs(x))) for x in jax.tree.leaves(got))
  np.testing.assert_allclose(total, inside, rtol=1e-6)
  count = sum(
    int(np.sum(np.asarray(x))) for x in jax.tree.leaves(out.update["held"])
  )
  assert count == hetero.communication(model, rate)
  assert float(out.weight) == 7.0


def test_mixed_round_matches_float64_reference():
  rates = [1.0, 0.5, 0.25, 0.5]
  clients = make_clients(SIZES, (D,), 2)
  params = MLP.init(jax.random.PRNGKey(4))
  algorithm = hetero.hetero_fl(MLP, optax.sgd(0.1), client_rates=rates)
  engine = engine_for(algorithm, epochs=1)
  state = engine.init(params, seed=0)
  state, _ = engine.round(
    state, engine.put_data(fl.FederatedDataset.from_clients(clients))
  )
  # Reference: every client's masked delta, then the per-parameter average
  # sum_k n_k M_k d_k / sum_k n_k M_k in float64 (0 where no client holds).
  num = jax.tree.map(lambda p: np.zeros(p.shape), params)
  den = jax.tree.map(lambda p: np.zeros(p.shape), params)
  for k, c in enumerate(clients):
    out = algorithm.client_update(
      params, None, one_client_data(c, k), jax.random.PRNGKey(0)
    )
    n = float(SIZES[k])
    num = jax.tree.map(
      lambda a, d, n=n: a + n * np.asarray(d, np.float64), num, out.update["d"]
    )
    den = jax.tree.map(
      lambda a, h, n=n: a + n * np.asarray(h, np.float64),
      den,
      out.update["held"],
    )
  expected = jax.tree.map(
    lambda p, a, b: (
      np.asarray(p, np.float64)
      - np.where(b > 0, a / np.where(b > 0, b, 1.0), 0.0)
    ),
    params,
    num,
    den,
  )
  chex.assert_trees_all_close(
    state.server.params, expected, rtol=1e-5, atol=1e-6
  )
  assert engine.num_traces == 1


def held_masks(model, rate):
  """The params-shaped 0/1 mask ``M_k`` of a capacity-``rate`` client."""
  chain = L.chain_of_model(model)
  widths = L.hidden_widths(chain)
  units = level_units(widths, [rate])[0]
  masks = L.param_masks(chain, L.prefix_masks(widths, list(units)))
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0))
  return jax.tree.map(
    lambda m, s: np.broadcast_to(np.asarray(m, np.float64), s.shape),
    masks,
    shapes,
  )


def test_small_holding_share_matches_float64_reference():
  """Entries held only by a client with 3e-6 of the round's weight: one
  engine round's server update is the published HeteroFL rule (each entry
  the weighted average over the clients that hold it, Diao et al. 2021) to
  1e-6 relative, against float64 numpy (issue 23, case 10)."""
  rates = [1.0, 0.5, 0.5, 0.5]
  weights = np.array([3.0, 333_332.0, 333_333.0, 333_332.0])  # 3 / 1e6
  base = hetero.hetero_fl(MLP, optax.sgd(0.1), client_rates=rates)
  table = jnp.asarray(weights, jnp.float32)

  def client_update(broadcast, client_state, data, rng):
    out = base.client_update(broadcast, client_state, data, rng)
    return out._replace(weight=table[data.client_id])

  def server_update(state, aggregate):
    # From zero params with sgd(1): the new params are -Delta exactly.
    zero = base.server_init(jax.tree.map(jnp.zeros_like, state.params))
    return base.server_update(zero, aggregate)

  algorithm = base._replace(
    client_update=client_update, server_update=server_update
  )
  clients = make_clients(SIZES, (D,), 2)
  params = MLP.init(jax.random.PRNGKey(4))
  engine = engine_for(algorithm, epochs=1)
  state = engine.init(params, seed=0)
  state, _ = engine.round(
    state, engine.put_data(fl.FederatedDataset.from_clients(clients))
  )
  got = jax.tree.map(lambda a: -np.asarray(a, np.float64), state.server.params)
  # Reference: sum_k n_k M_k d_k / sum_k n_k M_k (0 where no client holds).
  num = jax.tree.map(lambda p: np.zeros(p.shape), params)
  den = jax.tree.map(lambda p: np.zeros(p.shape), params)
  for k, c in enumerate(clients):
    d = base.client_update(
      params, None, one_client_data(c, k), jax.random.PRNGKey(0)
    ).update["d"]
    m = held_masks(MLP, rates[k])
    num = jax.tree.map(
      lambda a, dk, mk, n=weights[k]: a + n * mk * np.asarray(dk, np.float64),
      num,
      d,
      m,
    )
    den = jax.tree.map(lambda a, mk, n=weights[k]: a + n * mk, den, m)
  want = jax.tree.map(
    lambda a, b: np.where(b > 0, a / np.where(b > 0, b, 1.0), 0.0), num, den
  )
  only_small = 0
  for g, w, b in zip(*(jax.tree.leaves(t) for t in (got, want, den))):
    # Per leaf, normwise; and entry by entry where only client 0 holds.
    assert np.max(np.abs(g - w)) <= 1e-6 * np.max(np.abs(w))
    small = b == weights[0]
    only_small += int(small.sum())
    np.testing.assert_allclose(g[small], w[small], rtol=1e-6, atol=0)
  assert only_small > 0


def test_bad_inputs():
  with pytest.raises(
    ValueError,
    match=r"client_rates\[1\] = 0.3 .*supported"
    r" capacity level.*\(1.0, 0.5, 0.25, 0.125\)",
  ):
    hetero.hetero_fl(MLP, optax.sgd(0.1), client_rates=[1.0, 0.3])
  with pytest.raises(
    ValueError,
    match=r"round\(0.05 \* 8\) = 0 units of "
    r"hidden layer 0",
  ):
    hetero.hetero_fl(
      MLP, optax.sgd(0.1), client_rates=[1.0, 0.05], levels=(1.0, 0.05)
    )
  with pytest.raises(ValueError, match=r"levels must lie in \(0, 1\]"):
    hetero.hetero_fl(MLP, optax.sgd(0.1), client_rates=[1.0], levels=(1.0, 1.5))
  lstm = fl.models.char_lstm(vocab_size=10, embed_dim=4, hidden=(8,))
  with pytest.raises(ValueError, match="OptimizedLSTMCell_0.*mlp.*cnn"):
    hetero.hetero_fl(lstm, optax.sgd(0.1), client_rates=[1.0])

  class BN(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Dense(8)(x)
      x = nn.BatchNorm(use_running_average=True)(x)
      return nn.Dense(K)(nn.relu(x))

  bn = fl.models.from_flax(BN(), jnp.zeros((1, D)), num_classes=K)
  with pytest.raises(ValueError, match="BatchNorm_0.*batch norm"):
    hetero.hetero_fl(bn, optax.sgd(0.1), client_rates=[1.0])


def test_client_rates_must_cover_the_population():
  """2 rates for 4 clients: the jitted gather would give clients 2 and 3 the
  last rate. Refused, naming both lengths (issue 23, case 6)."""
  algorithm = hetero.hetero_fl(MLP, optax.sgd(0.1), client_rates=[1.0, 0.5])
  engine = engine_for(algorithm)
  engine.put_data(
    fl.FederatedDataset.from_clients(make_clients(SIZES, (D,), 0))
  )
  with pytest.raises(
    ValueError, match=r"client_rates has 2 entries.*population of 4 clients"
  ):
    engine.init(MLP.init(jax.random.PRNGKey(0)), seed=0)  # traces on the data
