"""FedMA: the BBP-MAP cost against a float64 Gaussian-marginal reference,
permutation recovery, and the layer-wise engine algorithm."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

import fedjax_lite as fl
from fedjax_lite import hetero
from fedjax_lite.hetero import matching
from fedjax_lite.hetero.fed_ma import FedMAMatching

D, K = 6, 3


# ---------------------------------------------------------------- the cost
def twice_log_marginal_ref(members, mu0, noise_var, prior_var):
  """2 log p(members) + sum_v (v^2/s^2 + log 2 pi s^2), from the joint
  Gaussian of the atom's members (covariance s^2 I + s0^2 11^T per dim)."""
  members = np.asarray(members, np.float64).reshape(-1, mu0.size)
  n = members.shape[0]
  if n == 0:
    return 0.0
  cov = noise_var * np.eye(n) + prior_var * np.ones((n, n))
  total = 0.0
  for d in range(mu0.size):
    v = members[:, d]
    total += 2.0 * scipy.stats.multivariate_normal(
      np.full(n, mu0[d]), cov
    ).logpdf(v)
    total += np.sum(v**2) / noise_var + n * np.log(2 * np.pi * noise_var)
  return total


@pytest.mark.parametrize(
  "noise_var,prior_var,gamma", [(1.0, 1.0, 1.0), (0.05, 0.5, 3.0)]
)
def test_bbp_map_cost_matches_float64_reference(noise_var, prior_var, gamma):
  r = np.random.default_rng(0)
  dim, J = 4, 5
  # Three global atoms held by 1, 2 and 4 of the other clients.
  members = [r.normal(size=(c, dim)) for c in (1, 2, 4)]
  sums = np.stack([m.sum(0) for m in members])
  counts = np.array([m.shape[0] for m in members])
  atoms_j = r.normal(size=(3, dim))
  mu0 = r.normal(size=dim) * 0.3
  cost = matching.bbp_map_cost(
    atoms_j,
    sums,
    counts,
    J,
    mu0=mu0,
    noise_var=noise_var,
    prior_var=prior_var,
    gamma=gamma,
    max_new=3,
  )
  assert cost.shape == (3, 6)
  expected = np.zeros((3, 6))
  for l, v in enumerate(atoms_j):
    for i, m in enumerate(members):
      n = m.shape[0]
      expected[l, i] = (
        twice_log_marginal_ref(np.vstack([m, v]), mu0, noise_var, prior_var)
        - twice_log_marginal_ref(m, mu0, noise_var, prior_var)
        + 2 * np.log(n / (J - n))
      )
    for k in range(1, 4):
      expected[l, 2 + k] = (
        twice_log_marginal_ref(v, mu0, noise_var, prior_var)
        + 2 * np.log(gamma / J)
        - 2 * np.log(k)
      )
  np.testing.assert_allclose(cost, expected, rtol=1e-10, atol=1e-10)


def test_match_atoms_recovers_permutations_and_grows_when_needed():
  r = np.random.default_rng(1)
  base = r.normal(size=(5, 7))
  perms = [r.permutation(5) for _ in range(3)]
  local = [base[p] + 1e-3 * r.normal(size=base.shape) for p in perms]
  res = matching.match_atoms(local, max_atoms=10, noise_var=0.01)
  assert res.atoms.shape == (5, 7)
  np.testing.assert_array_equal(res.counts, [3] * 5)
  for p, a in zip(perms, res.assignments):  # neuron u of client j is base[p[u]]
    np.testing.assert_array_equal(res.atoms[a], res.atoms[a])
    np.testing.assert_allclose(res.atoms[a], base[p], atol=3e-3)
  # A client with two neurons unlike any other opens two new atoms.
  extra = np.vstack([base[:3], 10 + r.normal(size=(2, 7))])
  res = matching.match_atoms([base, extra], max_atoms=10, noise_var=0.01)
  assert res.atoms.shape[0] == 7
  np.testing.assert_array_equal(res.assignments[1][:3], [0, 1, 2])
  # ... unless the bound forbids it.
  res = matching.match_atoms([base, extra], max_atoms=6, noise_var=0.01)
  assert res.atoms.shape[0] == 6


# ---------------------------------------------------- permutation recovery
def trained_mlp(steps=60, hidden=(10, 8)):
  """A small MLP trained with full-batch GD on a fixed synthetic task."""
  model = fl.models.mlp(D, K, hidden)
  r = np.random.default_rng(2)
  x = r.normal(size=(64, D)).astype(np.float32)
  y = (np.argmax(x[:, :K] + 0.3 * x[:, K : 2 * K], 1)).astype(np.int32)
  batch, mask = {"x": x, "y": y}, np.ones(64, bool)
  params = model.init(jax.random.PRNGKey(0))
  opt = optax.sgd(0.5)
  state = opt.init(params)

  @jax.jit
  def step(p, s):
    g, _ = jax.grad(model.batch_loss, has_aux=True)(p, batch, mask)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  for _ in range(steps):
    params, state = step(params, state)
  return model, params, x


def permuted(params, perms, noise, r):
  """The same network with hidden units reordered by ``perms`` (+ noise)."""
  names = sorted(params, key=lambda n: int(n.split("_")[1]))
  out, prev = {}, None
  for i, n in enumerate(names):
    k, b = np.asarray(params[n]["kernel"]), np.asarray(params[n]["bias"])
    if prev is not None:
      k = k[prev]
    if i < len(perms):
      k, b, prev = k[:, perms[i]], b[perms[i]], perms[i]
    out[n] = {
      "kernel": k + noise * r.normal(size=k.shape),
      "bias": b + noise * r.normal(size=b.shape),
    }
  return jax.tree.map(lambda a: np.asarray(a, np.float32), out)


def test_matched_average_recovers_permuted_copies():
  model, params, x = trained_mlp()
  r = np.random.default_rng(3)
  clients = [
    permuted(params, [r.permutation(10), r.permutation(8)], 1e-3, r)
    for _ in range(4)
  ]
  glob, assign = hetero.matched_average(clients, noise_var=0.01)
  # The original width, and the original function.
  assert glob["Dense_0"]["kernel"].shape == (D, 10)
  assert glob["Dense_1"]["kernel"].shape == (10, 8)
  assert [len(a) for a in assign] == [4, 4]
  want = np.asarray(model.apply(params, {"x": x}))
  got = np.asarray(model.apply(glob, {"x": x}))
  plain = jax.tree.map(lambda *a: sum(a) / len(a), *clients)
  bad = np.asarray(model.apply(plain, {"x": x}))
  scale = np.abs(want).max()
  np.testing.assert_allclose(got, want, atol=0.01 * scale)
  assert np.abs(bad - want).max() > 0.2 * scale  # plain averaging destroys it
  assert (np.argmax(got, 1) == np.argmax(want, 1)).mean() > 0.95


def sub_networks(params, keep, r):
  """Clients holding the first hidden layer's units ``keep[j]`` of ``params``
  in a random order: ``(client params, origin)``, client ``j``'s unit ``u``
  is original unit ``origin[j][u]``."""
  clients, origin = [], []
  for kp in keep:
    sub = jax.tree.map(np.asarray, params)
    p = r.permutation(kp.size)
    idx = kp[p]  # client unit u is original unit idx[u]
    origin.append(idx)
    clients.append(
      {
        "Dense_0": {
          "kernel": sub["Dense_0"]["kernel"][:, idx],
          "bias": sub["Dense_0"]["bias"][idx],
        },
        "Dense_1": {
          "kernel": sub["Dense_1"]["kernel"][idx],
          "bias": sub["Dense_1"]["bias"],
        },
        "Dense_2": sub["Dense_2"],
      }
    )
  return clients, origin


def test_matched_average_of_different_widths():
  """Clients holding different subsets of the units map into one model."""
  _, params, _ = trained_mlp()
  r = np.random.default_rng(4)
  keep = [
    np.arange(10),
    np.sort(r.choice(10, 6, replace=False)),
    np.sort(r.choice(10, 7, replace=False)),
  ]
  clients, origin = sub_networks(params, keep, r)
  glob, assign = hetero.matched_average(clients, noise_var=0.01)
  assert glob["Dense_0"]["kernel"].shape == (D, 10)
  g0 = np.asarray(glob["Dense_0"]["kernel"])
  o0 = np.asarray(params["Dense_0"]["kernel"])
  # Every client's unit lands on the global neuron of its original unit.
  for idx, a in zip(origin, assign[0]):
    np.testing.assert_allclose(g0[:, a], o0[:, idx], atol=1e-6)
  # So the global layer is the original one up to a permutation.
  order = [int(np.argmin(np.abs(o0 - g0[:, [i]]).sum(0))) for i in range(10)]
  assert sorted(order) == list(range(10))
  np.testing.assert_allclose(g0, o0[:, order], atol=1e-6)


def test_default_settings_recover_the_overlap_of_different_widths():
  """The documented case with default matching settings (issue 23, case 11):
  clients of widths 20, 16, 16, permuted sub-networks of one network, map
  exactly onto it (``noise_var=1``, the old default, mis-matched them)."""
  _, params, _ = trained_mlp(hidden=(20, 8))
  r = np.random.default_rng(7)
  keep = [np.arange(20)] + [
    np.sort(r.choice(20, 16, replace=False)) for _ in range(2)
  ]
  clients, origin = sub_networks(params, keep, r)
  glob, assign = hetero.matched_average(clients)
  g0 = np.asarray(glob["Dense_0"]["kernel"])
  b0 = np.asarray(glob["Dense_0"]["bias"])
  o0 = np.asarray(params["Dense_0"]["kernel"])
  ob = np.asarray(params["Dense_0"]["bias"])
  assert g0.shape == (D, 20)
  # The true overlap: units of the same original unit share one global
  # neuron, different original units never do, and it holds their weights.
  neuron = {}
  for idx, a in zip(origin, assign[0]):
    for u, g in zip(idx.tolist(), a.tolist()):
      neuron.setdefault(u, set()).add(g)
    np.testing.assert_allclose(g0[:, a], o0[:, idx], atol=1e-6)
    np.testing.assert_allclose(b0[a], ob[idx], atol=1e-6)
  assert all(len(g) == 1 for g in neuron.values())
  assert len(set().union(*neuron.values())) == 20


# ------------------------------------------------------------ the engine
def make_clients(sizes, seed):
  r = np.random.default_rng(seed)
  w = r.normal(size=(D, K))
  out = []
  for n in sizes:
    x = r.normal(size=(n, D)).astype(np.float32)
    out.append({"x": x, "y": np.argmax(x @ w, 1).astype(np.int32)})
  return out


@pytest.mark.slow
def test_fed_ma_without_training_is_a_fixed_point():
  """Identical client models (learning rate 0): matching returns the model."""
  model = fl.models.mlp(D, K, (8,))
  widths = [[6], [4], [6]]
  proc = hetero.build_fed_ma_process(
    model, lambda: optax.sgd(0.0), client_widths=widths, batch_size=4
  )
  clients = make_clients((6, 9, 5), 0)
  state = proc.initialize(0)
  init = proc.get_model_weights(state)
  state, metrics = proc.next(state, clients)
  glob = proc.get_model_weights(state)
  assert metrics["global_widths"] == [6]
  want = jax.tree.map(np.array, init)
  want["Dense_0"]["kernel"][:, 6:] = 0
  want["Dense_0"]["bias"][6:] = 0
  want["Dense_1"]["kernel"][6:] = 0
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
    jax.tree.map(np.asarray, glob),
    want,
  )
  assert proc.engine.num_traces == 1
  assert int(state.server.num_rounds) == 1 and int(state.server.stage) == 0


def test_fed_ma_round_with_different_widths():
  model = fl.models.mlp(D, K, (12, 8))
  widths = np.array([[8, 6], [4, 3], [6, 4], [8, 5]])
  clients = make_clients((8, 12, 6, 10), 1)
  proc = hetero.build_fed_ma_process(
    model,
    lambda: optax.sgd(0.3),
    client_widths=widths,
    batch_size=4,
    local_epochs=2,
  )
  state = proc.initialize(1)
  losses = []
  for _ in range(2):
    state, metrics = proc.next(state, clients)
    losses.append(metrics["stage0_loss"])
    assert all(np.isfinite(v) for k, v in metrics.items() if "loss" in k)
  g = metrics["global_widths"]
  assert 8 <= g[0] <= 12 and 6 <= g[1] <= 8  # >= widest client, <= bound
  glob = proc.get_model_weights(state)
  m0, m1 = (np.asarray(m) for m in state.server.masks)
  k0, k1 = (
    np.asarray(glob["Dense_0"]["kernel"]),
    np.asarray(glob["Dense_1"]["kernel"]),
  )
  assert np.all(k0[:, m0 == 0] == 0) and np.all(k1[m0 == 0] == 0)
  assert np.all(k1[:, m1 == 0] == 0)
  # Each client's model after the round: its layers hold global neurons; the
  # assignment of its own neurons is a one-to-one map into the global layer.
  for j, (w0, w1) in enumerate(widths):
    a0 = np.asarray(state.server.assign[0])[j, :w0]
    assert len(set(a0.tolist())) == w0 and a0.max() < g[0]
  assert proc.engine.num_traces == 1
  assert losses[1] < losses[0]


def test_bad_inputs():
  with pytest.raises(
    ValueError,
    match=r"client_widths\[1, 0\] = 20; "
    r"expected 1..8",
  ):
    hetero.fed_ma(
      fl.models.mlp(D, K, (8,)), optax.sgd(0.1), client_widths=[[4], [20]]
    )
  with pytest.raises(
    ValueError,
    match=r"client_widths must be ints "
    r"\[num_clients, 1\]",
  ):
    hetero.fed_ma(
      fl.models.mlp(D, K, (8,)), optax.sgd(0.1), client_widths=[4, 5]
    )
  lstm = fl.models.char_lstm(vocab_size=10, embed_dim=4, hidden=(8,))
  with pytest.raises(
    ValueError,
    match="only chains of flax Conv_i then Dense_j.*mlp.*cnn.*recurrent",
  ):
    hetero.fed_ma(lstm, optax.sgd(0.1), client_widths=[[4]])

  class BN(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.BatchNorm(use_running_average=True)(nn.Dense(8)(x))
      return nn.Dense(K)(nn.relu(x))

  bn = fl.models.from_flax(BN(), jnp.zeros((1, D)), num_classes=K)
  with pytest.raises(ValueError, match="BatchNorm_0.*no batch norm"):
    hetero.fed_ma(bn, optax.sgd(0.1), client_widths=[[4]])
  with pytest.raises(ValueError, match="noise_var must be a positive"):
    hetero.fed_ma(
      fl.models.mlp(D, K, (8,)),
      optax.sgd(0.1),
      client_widths=[[4]],
      noise_var=0.0,
    )
  with pytest.raises(ValueError, match="max_atoms=3 is smaller"):
    matching.match_atoms([np.zeros((4, 2))], max_atoms=3)
  # Matching settings are match_atoms' keywords; a misspelt one is named.
  with pytest.raises(TypeError, match=r"fed_ma\(\).*\['noise'\].*noise_var"):
    hetero.fed_ma(
      fl.models.mlp(D, K, (8,)), optax.sgd(0.1), client_widths=[[4]], noise=1
    )
  with pytest.raises(TypeError, match=r"matched_average\(\).*\['iters'\]"):
    hetero.matched_average([{}], iters=2)
  with pytest.raises(ValueError, match="prior_var must be a positive"):
    hetero.matched_average([{}], prior_var=-1.0)


@pytest.mark.slow
def test_matched_average_recovers_permuted_cnn():
  """Channels of the FedAvg CNN (conv -> conv -> flatten -> dense) too."""
  model = fl.models.cnn((6, 6, 1), K, channels=(4, 6), hidden=8, kernel_size=3)
  params = jax.tree.map(np.asarray, model.init(jax.random.PRNGKey(5)))
  r = np.random.default_rng(6)
  params["Conv_0"]["bias"] = r.normal(size=4).astype(np.float32) * 0.1
  params["Conv_1"]["bias"] = r.normal(size=6).astype(np.float32) * 0.1
  x = r.normal(size=(16, 6, 6, 1)).astype(np.float32)
  clients = []
  for _ in range(3):
    p0, p1, p2 = r.permutation(4), r.permutation(6), r.permutation(8)
    d0 = params["Dense_0"]["kernel"].reshape(-1, 6, 8)[:, p1][:, :, p2]
    clients.append(
      jax.tree.map(
        lambda a: a + 1e-4 * r.normal(size=a.shape).astype(np.float32),
        {
          "Conv_0": {
            "kernel": params["Conv_0"]["kernel"][..., p0],
            "bias": params["Conv_0"]["bias"][p0],
          },
          "Conv_1": {
            "kernel": params["Conv_1"]["kernel"][:, :, p0][..., p1],
            "bias": params["Conv_1"]["bias"][p1],
          },
          "Dense_0": {
            "kernel": d0.reshape(-1, 8),
            "bias": params["Dense_0"]["bias"][p2],
          },
          "Dense_1": {
            "kernel": params["Dense_1"]["kernel"][p2],
            "bias": params["Dense_1"]["bias"],
          },
        },
      )
    )
  glob, _ = hetero.matched_average(clients, noise_var=0.01)
  assert jax.tree.map(np.shape, glob) == jax.tree.map(np.shape, params)
  want = np.asarray(model.apply(params, {"x": x}))
  got = np.asarray(model.apply(glob, {"x": x}))
  np.testing.assert_allclose(got, want, atol=1e-2 * np.abs(want).max())


def test_matched_average_rejects_nan_weights_and_bad_class_counts():
  _, params, _ = trained_mlp()
  r = np.random.default_rng(8)
  clients = [
    permuted(params, [r.permutation(10), r.permutation(8)], 0.0, r)
    for _ in range(3)
  ]
  bad = jax.tree.map(np.array, clients[1])
  bad["Dense_1"]["kernel"][2, 3] = np.nan
  with pytest.raises(
    ValueError,
    match=r"client_params\[1\]\['Dense_1'\]\['kernel'\] has 1 "
    r"non-finite value",
  ):
    hetero.matched_average([clients[0], bad, clients[2]])
  with pytest.raises(
    ValueError, match=r"class_counts has 2 entries for 3 client models"
  ):
    hetero.matched_average(clients, class_counts=[np.ones(K)] * 2)
  with pytest.raises(
    ValueError, match=r"class_counts\[1\] has shape \(2,\); expected \(3,\)"
  ):
    hetero.matched_average(
      clients, class_counts=[np.ones(K), np.ones(2), np.ones(K)]
    )
  with pytest.raises(
    ValueError, match=r"class_counts\[2\] must be finite and >= 0, got "
  ):
    hetero.matched_average(
      clients, class_counts=[np.ones(K), np.ones(K), [1.0, np.nan, 2.0]]
    )


def test_fed_ma_client_widths_must_cover_the_population():
  """3 architectures for 4 clients: the gather would give client 3 the last
  row. Refused, naming both counts (issue 23, case 6)."""
  model = fl.models.mlp(D, K, (8,))
  algorithm = hetero.fed_ma(
    model, optax.sgd(0.1), client_widths=[[4], [6], [8]]
  )
  engine = fl.Engine(
    algorithm,
    fl.RoundConfig(4, fl.LocalWork(batch_size=4), sampling="all"),
    fl.engine.default_mesh(jax.devices()[:1]),
  )
  state = engine.init(model.init(jax.random.PRNGKey(0)), seed=0, num_clients=4)
  data = engine.put_data(
    fl.FederatedDataset.from_clients(make_clients((6, 9, 5, 7), 0))
  )
  with pytest.raises(
    ValueError, match=r"client_widths has 3 entries.*population of 4 clients"
  ):
    engine.round(state, data)


def test_host_matching_of_a_stage_is_match_atoms_on_the_held_units():
  """FedMAMatching (the host side of a stage): layer l's held units and the
  entries reading active inputs go to match_atoms with seed + round; the
  result is padded to the model's width, other layers are zero."""
  model = fl.models.mlp(D, K, (8, 6))
  matcher = FedMAMatching(
    model, [[5, 6], [8, 3], [2, 4]], {"seed": 4, "noise_var": 0.5}
  )
  assert tuple(matcher.widths) == (8, 6) and matcher.num_clients == 3
  assert matcher.atom_dims == [D + 1, 8 + 1 + K]
  r = np.random.default_rng(0)
  atoms = [r.normal(size=(3, w, d)) for w, d in zip([8, 6], [D + 1, 12])]
  units = [
    np.stack([np.arange(w) < c for c in matcher.client_widths[:, l]])
    for l, w in enumerate(matcher.widths)
  ]
  in_masks = (np.r_[np.ones(5), np.zeros(3)], np.ones(6))
  out = matcher.match_stage(1, atoms, units, in_masks, 2)
  assert all(not np.any(a) for a in out[0])  # stage 1: layer 0 untouched
  g_atoms, g_mask, g_assign = out[1]
  dmask = np.r_[np.ones(5, bool), np.zeros(3, bool), np.ones(1 + K, bool)]
  local = [atoms[1][j][units[1][j]][:, dmask] for j in range(3)]
  want = matching.match_atoms(local, max_atoms=6, seed=4 + 2, noise_var=0.5)
  g = want.atoms.shape[0]
  np.testing.assert_allclose(
    g_atoms[:g][:, dmask], want.atoms.astype(np.float32)
  )
  assert not np.any(g_atoms[g:]) and not np.any(g_atoms[:, ~dmask])
  np.testing.assert_array_equal(g_mask, np.arange(6) < g)
  for j, w in enumerate(matcher.client_widths[:, 1]):
    np.testing.assert_array_equal(g_assign[j, :w], want.assignments[j])
    assert not np.any(g_assign[j, w:])


def test_fed_ma_process_checks_its_arguments():
  model = fl.models.mlp(D, K, (8,))
  alg = hetero.fed_ma(model, optax.sgd(0.1), client_widths=[[4], [8]])
  work = fl.LocalWork(batch_size=4)
  with pytest.raises(ValueError, match=r"num_clients must be a positive int"):
    hetero.FedMAProcess(model, alg, work, 0)
  with pytest.raises(
    TypeError, match=r"algorithm must be a FederatedAlgorithm \(from fed_ma\)"
  ):
    hetero.FedMAProcess(model, "fed_ma", work, 2)
