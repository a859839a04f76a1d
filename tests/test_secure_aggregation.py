"""Secure aggregation (SecAgg / SecAgg+): exact unmasked sums with dropouts,
refusal below the threshold, uniform masked inputs, SecAgg+ == SecAgg, Shamir,
traffic accounting, bad input, and the aggregator inside the engine round
against a float64 numpy reference."""

import math
import random

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import fedjax_lite as fl
from fedjax_lite.privacy import secure_aggregation as sa
from fedjax_lite.privacy import shamir

N, D = 16, 1024  # one shape for every protocol test (one compile each)
CLIP, BPV = 1.0, 12


def clipped_updates(rng, n=N, d=D):
  x = rng.standard_normal((n, d)) * rng.uniform(0.05, 0.6, (n, 1))
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  return (x * np.minimum(1.0, CLIP / norms)).astype(np.float32)


def numpy_quantize(x, dtype=np.float64):
  """numpy reference of the fixed-point encoding round(x L / C) + L."""
  levels = dtype(2**BPV - 1)
  v = np.clip(np.round(x.astype(dtype) / dtype(CLIP) * levels), -levels, levels)
  return (v + levels).astype(np.int64)


def run_protocol(q, alive, num_neighbors, bits, seed=0):
  """Masks every client's q, sums the survivors' masked inputs, unmasks."""
  proto = sa.SecAggRound(
    q.shape[0],
    num_neighbors=num_neighbors,
    seed=seed,
    message_bits=bits,
    num_params=q.shape[1],
  )
  y = np.asarray(
    sa.mask_inputs(jnp.asarray(q, jnp.uint32), *proto.client_masks(), bits)
  )
  # The server's modular sum of what arrived (uint32 wraps mod 2^32).
  masked_sum = y[alive].sum(0, dtype=np.uint32) & np.uint32(2**bits - 1)
  # Pair rows padded as the aggregator pads them (one compile per graph).
  rows = N - proto.threshold if proto.complete else N
  material, info = proto.unmask_material(alive, pad_rows=rows)
  z = sa.remove_masks(jnp.asarray(masked_sum), *material, bits)
  return np.asarray(z).astype(np.int64), y, proto, info


@pytest.mark.parametrize(
  "num_neighbors", [None, 6], ids=["secagg", "secagg_plus"]
)
@pytest.mark.parametrize("rate", [0.0, 0.1, 0.3])
def test_unmasked_sum_equals_plain_quantized_sum(rng, rate, num_neighbors):
  x = clipped_updates(rng)
  q = np.asarray(sa.quantize(jnp.asarray(x), CLIP, BPV))
  # Same float32 arithmetic as numpy; float64 differs only at exact ties.
  np.testing.assert_array_equal(q, numpy_quantize(x, np.float32))
  assert np.abs(q - numpy_quantize(x)).max() <= 1
  alive = ~sa.dropped_clients(N, rate, 0, seed=3)
  assert (~alive).sum() == round(rate * N)
  bits = sa.min_modulus_bits(BPV, N)
  z, y, _, info = run_protocol(q, alive, num_neighbors, bits)
  plain = q.astype(np.int64)[alive].sum(0)
  np.testing.assert_array_equal(z, plain)  # exact integers
  assert info["survivors"] == alive.sum()
  # The masked inputs are not the inputs.
  assert (y != q).mean() > 0.99
  # Decoding: the mean of the dequantized updates, within C / 2L per
  # coordinate of the float64 mean of the clipped updates.
  ints = np.asarray(
    sa.centered_sum(jnp.asarray(z, jnp.uint32), jnp.int32(alive.sum()), BPV)
  )
  mean = ints * (CLIP / (2**BPV - 1)) / alive.sum()
  np.testing.assert_allclose(
    mean,
    x[alive].astype(np.float64).mean(0),
    rtol=0,
    atol=CLIP / (2 * (2**BPV - 1)) + 1e-9,
  )


def test_secagg_plus_gives_the_same_sums_as_secagg(rng):
  x = clipped_updates(rng)
  q = numpy_quantize(x)
  alive = ~sa.dropped_clients(N, 0.25, 1, seed=5)
  bits = sa.min_modulus_bits(BPV, N)
  full, y_full, p_full, i_full = run_protocol(q, alive, None, bits)
  plus, y_plus, p_plus, i_plus = run_protocol(q, alive, 6, bits)
  np.testing.assert_array_equal(full, plus)
  np.testing.assert_array_equal(full, q[alive].sum(0))
  assert p_full.degree == N - 1 and p_plus.degree == 6
  assert (p_plus.neighbors != np.arange(N)[:, None]).all()
  # Every client masks with exactly k others (a k-regular graph).
  assert np.bincount(p_plus.neighbors.ravel(), minlength=N).tolist() == [6] * N
  # The masks differ, the sums do not; SecAgg+ costs less per client.
  assert (y_full != y_plus).mean() > 0.99
  assert i_plus["client_bytes_sent"] < i_full["client_bytes_sent"]
  assert i_plus["server_key_agreements"] < i_full["server_key_agreements"]


@pytest.mark.parametrize(
  "num_neighbors", [None, 6], ids=["secagg", "secagg_plus"]
)
def test_refuses_below_threshold_and_reveals_nothing(rng, num_neighbors):
  n = N
  q = numpy_quantize(clipped_updates(rng, n=n))
  proto = sa.SecAggRound(n, num_neighbors=num_neighbors, num_params=D)
  alive = np.zeros(n, bool)
  alive[: proto.threshold - 2] = True  # fewer than t survivors
  with pytest.raises(
    sa.SecAggError,
    match=r"refuses to unmask.*threshold "
    rf"t={proto.threshold}.*No shares were revealed",
  ):
    proto.unmask_material(alive)
  assert proto.revealed_shares == 0
  # With enough survivors the same round unmasks.
  alive[:] = True
  z, _, _, _ = run_protocol(
    q, alive, num_neighbors, sa.min_modulus_bits(BPV, n)
  )
  np.testing.assert_array_equal(z, q.sum(0))


def test_one_masked_update_is_uniform(rng):
  bits = sa.min_modulus_bits(BPV, N)  # 17
  q = numpy_quantize(clipped_updates(rng))
  _, y, _, _ = run_protocol(q, np.ones(N, bool), None, bits)
  top = y[0] >> (bits - 4)  # top 4 bits: 16 bins
  counts = np.bincount(top, minlength=16)
  assert stats.chisquare(counts).pvalue > 1e-3
  low = np.bincount(y[0] % 7, minlength=7)  # residues mod 7
  assert stats.chisquare(low).pvalue > 1e-3
  # The unmasked encoding is far from uniform (the test has power).
  q_top = np.bincount(q[0] >> (bits - 4), minlength=16)
  assert stats.chisquare(q_top).pvalue < 1e-12


def test_shamir_threshold_and_encoding():
  r = random.Random(0)
  secret = bytes(range(32))
  elems = shamir.bytes_to_elements(secret)
  assert len(elems) == 3
  xs = list(range(1, 8))
  shares = shamir.split(elems, 4, xs, r.getrandbits)
  for subset in ([0, 1, 2, 3], [6, 4, 2, 0], [1, 3, 5, 6]):
    got = shamir.reconstruct(
      [xs[i] for i in subset], [shares[i] for i in subset], 4
    )
    assert shamir.elements_to_bytes(got, 32) == secret
  with pytest.raises(ValueError, match="needs threshold=4 shares, got 3"):
    shamir.reconstruct(xs[:3], shares[:3], 4)
  # Fewer than t shares look uniform whatever the secret: the top 4 bits of
  # the first two shares (t = 3) of the secrets 0 and 2^126 over 1500 splits.
  for s in (0, 1 << 126):
    tops = np.array(
      [
        [
          v[0] >> 123
          for v in shamir.split([s], 3, [1, 2, 3], r.getrandbits)[:2]
        ]
        for _ in range(1500)
      ]
    )
    for col in range(2):
      counts = np.bincount(tops[:, col], minlength=16)
      assert stats.chisquare(counts).pvalue > 1e-3
  with pytest.raises(
    ValueError, match="threshold=9 exceeds the number of share holders"
  ):
    shamir.split(elems, 9, xs, r.getrandbits)


@pytest.mark.parametrize("num_neighbors", [None, 4])
def test_each_client_derives_the_same_pairwise_seeds(num_neighbors):
  proto = sa.SecAggRound(9, num_neighbors=num_neighbors, num_params=D)
  for u in (0, 4, 8):
    assert proto.rederive_client(u) >= 0.0  # raises if a seed differs


def test_traffic_accounting_matches_the_messages():
  n, k, d, bits = 10, 4, 30, 20
  proto = sa.SecAggRound(n, num_neighbors=k, num_params=d, message_bits=bits)
  alive = np.ones(n, bool)
  alive[3] = False
  _, info = proto.unmask_material(alive)
  sent, recv = proto.last_traffic.sent, proto.last_traffic.received
  ct = 12 + 8 + 5 * 16 + 16  # nonce + ids + 5 field elements + GCM tag
  for u in range(n):
    nb = proto.neighbors[u]
    if u == 3:  # dropped after ShareKeys
      assert sent[u] == 64 + k * ct
      continue
    shares = sum(4 + 16 * (3 if v == 3 else 2) for v in nb) + 4 + 16 * 2
    assert sent[u] == 64 + k * ct + math.ceil(d * bits / 8) + shares
    assert recv[u] == 64 * k + k * ct + 4 * alive[nb].sum()
  assert info["server_key_agreements"] == alive[proto.neighbors[3]].sum()
  assert info["client_bytes_sent"] == pytest.approx(sent.mean())


def test_bad_input_errors():
  with pytest.raises(
    ValueError,
    match=r"threshold=13 \(t=13\) exceeds the "
    r"12 share holders.*expected 7 <= t <= 12",
  ):
    sa.SecAggRound(12, threshold=13)
  with pytest.raises(
    ValueError,
    match=r"threshold=3 \(t=3\) is below the "
    r"safe minimum.*expected t >= 12 // 2 \+ 1 = 7",
  ):
    sa.SecAggRound(12, threshold=3)
  with pytest.raises(
    ValueError,
    match=r"threshold=2 \(t=2\) is below the "
    r"safe minimum for 5 share holders \(the client and its "
    "neighbours\\)",
  ):
    sa.SecAggRound(12, threshold=2, num_neighbors=4)
  with pytest.raises(
    ValueError,
    match=r"bits=20 is too small for the sum of "
    r"100 values of bits_per_value=16: expected bits >= "
    r".* = 24",
  ):
    sa.check_modulus_bits(20, 16, 100)
  with pytest.raises(
    ValueError,
    match=r"bits=40 exceeds 32; expected bits "
    "<= 32",
  ):
    sa.secure_aggregator(1.0, bits=40)
  with pytest.raises(ValueError, match="num_neighbors must be None"):
    sa.secure_aggregator(1.0, num_neighbors=1)
  agg = sa.secure_aggregator(1.0, num_neighbors=5)
  spec = {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}
  with pytest.raises(
    ValueError,
    match="num_neighbors=5 must be even for a Harary graph on 10 clients",
  ):
    agg.init(agg.init_state(spec), spec, 10)
  agg = sa.secure_aggregator(1.0, num_neighbors=9)  # >= m - 1: SecAgg
  agg.init(agg.init_state(spec), spec, 10)
  with pytest.raises(ValueError, match="clip_norm must be a positive"):
    sa.secure_aggregator(0.0)
  spec = {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}
  agg = sa.secure_aggregator(1.0, bits=20, bits_per_value=16)
  with pytest.raises(
    ValueError,
    match=r"bits=20 is too small for the sum of "
    r"10 values.*expected bits >= .* = 21",
  ):
    agg.init(agg.init_state(spec), spec, 10)
  agg = sa.secure_aggregator(1.0, threshold=11)
  with pytest.raises(
    ValueError,
    match=r"threshold=11 \(t=11\) exceeds the "
    r"10 share holders",
  ):
    agg.init(agg.init_state(spec), spec, 10)
  agg = sa.secure_aggregator(1.0, bits_per_value=30)
  with pytest.raises(
    ValueError,
    match=r"bits_per_value=30 is too large for "
    r"10 clients per round.*expected bits_per_value <= 27",
  ):
    agg.init(agg.init_state(spec), spec, 10)


def test_secagg_plus_degree_follows_the_binomial_rule():
  k, t = sa.secagg_plus_degree(1000, dropout_rate=0.1)
  assert k % 2 == 0 and k < 999 and t == (k + 1) // 2 + 1
  fail = stats.binom.cdf(t - 2, k, 0.9)
  assert 1000 * fail <= 2.0**-20
  k2, _ = sa.secagg_plus_degree(1000, dropout_rate=0.1)
  smaller = stats.binom.cdf(((k - 1) // 2 + 1) - 2, k - 2, 0.9)
  assert 1000 * smaller > 2.0**-20 or k2 == k  # minimal
  assert sa.secagg_plus_degree(10, dropout_rate=0.5)[0] == 9  # complete


def _run_aggregator(agg, x, weights, round_state=None, rng_key=0):
  """init/add/merge/finalize as the engine calls them: two 'devices', each
  one padded block of N slots (eager: the jitted mask kernels are shared
  with the protocol tests above)."""
  n = x.shape[0]
  spec = {"w": jax.ShapeDtypeStruct(x.shape[1:], jnp.float32)}
  state = agg.init_state(spec) if round_state is None else round_state
  accs = []
  for part in (np.arange(0, 10), np.arange(10, n)):
    acc = agg.init(state, spec, n)
    idx = np.concatenate([part, np.zeros(n - len(part), int)])
    acc = agg.add(
      state,
      acc,
      {"w": jnp.asarray(x[idx])},
      jnp.asarray(weights[idx], jnp.float32),
      jnp.asarray(np.arange(n) < len(part)),
      jnp.asarray(idx, jnp.int32),
    )
    accs.append(acc)
  acc = agg.merge(jax.tree.map(lambda *a: jnp.stack(a), *accs))
  return agg.finalize(state, acc, jax.random.PRNGKey(rng_key))


@pytest.mark.parametrize("num_neighbors", [None, 8])
def test_aggregator_mean_with_dropouts(rng, num_neighbors):
  n = N
  x = clipped_updates(rng, n=n) * 3.0  # some exceed the clip norm
  weights = np.ones(n)
  weights[5] = 0.0  # sends nothing
  agg = sa.secure_aggregator(
    CLIP,
    bits_per_value=BPV,
    dropout_rate=0.25,
    num_neighbors=num_neighbors,
    seed=7,
  )
  (out, new_state) = _run_aggregator(agg, x, weights)
  sent = ~sa.dropped_clients(n, 0.25, 0, seed=7) & (weights > 0)
  norms = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
  bounded = x * np.minimum(1.0, CLIP / norms)
  ints = (numpy_quantize(bounded) - (2**BPV - 1))[sent].sum(0)
  want = ints * (CLIP / (2**BPV - 1)) / sent.sum()
  # float32 clipping may move a value across a rounding tie: at most one
  # level C/L of one client per coordinate.
  step = CLIP / (2**BPV - 1) / sent.sum()
  np.testing.assert_allclose(out.mean["w"], want, rtol=0, atol=step + 1e-7)
  assert np.mean(np.abs(np.asarray(out.mean["w"]) - want) > 1e-6) < 0.01
  assert float(out.metrics["secagg_survivors"]) == sent.sum()
  assert float(out.total_weight) == weights[sent].sum()
  assert int(new_state["round"]) == 1
  # Next round: fresh keys and dropouts, still exact.
  out2, _ = _run_aggregator(agg, x, weights, round_state=new_state)
  sent2 = ~sa.dropped_clients(n, 0.25, 1, seed=7) & (weights > 0)
  ints2 = (numpy_quantize(bounded) - (2**BPV - 1))[sent2].sum(0)
  np.testing.assert_allclose(
    out2.mean["w"],
    ints2 * (CLIP / (2**BPV - 1)) / sent2.sum(),
    rtol=0,
    atol=step * sent.sum() / sent2.sum() + 1e-7,
  )


def test_aggregator_central_dp_noise(rng):
  z = 0.5
  x = clipped_updates(rng)
  noisy, _ = _run_aggregator(
    sa.secure_aggregator(CLIP, bits_per_value=BPV, noise_multiplier=z),
    x,
    np.ones(N),
  )
  levels = 2**BPV - 1
  exact = (
    (np.asarray(sa.quantize(jnp.asarray(x), CLIP, BPV), np.int64) - levels).sum(
      0
    )
    * (CLIP / levels)
    / N
  )  # fixed denominator N
  c_q = CLIP * (1 + math.sqrt(D) / (2 * levels))
  std = z * c_q / N
  assert float(noisy.metrics["secagg_dp_noise_std"]) == pytest.approx(std)
  resid = np.asarray(noisy.mean["w"], np.float64) - exact
  # 1024 draws: the sample std is within ~2.2% (1 s.e.) of sigma.
  assert abs(resid.std() / std - 1) < 0.1
  assert abs(resid.mean()) < 4 * std / math.sqrt(D)
  assert stats.normaltest(resid).pvalue > 1e-3


def test_secure_fed_avg_round_in_the_engine(rng, one_device_mesh):
  """One FedAvg round (full-batch, one step) through the engine with SecAgg+
  and 25% dropouts, against a float64 numpy reference."""
  n, dim, classes, lr = 8, 3, 2, 0.5
  clients = [
    {
      "x": rng.standard_normal((6, dim)).astype(np.float32),
      "y": rng.integers(0, classes, 6).astype(np.int32),
    }
    for _ in range(n)
  ]
  model = fl.models.logistic_regression(dim, classes)
  params = model.init(jax.random.PRNGKey(0))
  agg = sa.secure_aggregator(
    0.05, bits_per_value=BPV, num_neighbors=4, dropout_rate=0.25, seed=11
  )
  alg = fl.fed_avg(model, optax.sgd(lr), aggregator=agg)
  engine = fl.Engine(alg, fl.RoundConfig(n, sampling="all"), one_device_mesh)
  data = engine.put_data(fl.FederatedDataset.from_clients(clients))
  state = engine.init(params, seed=0)
  state, metrics = engine.round(state, data)

  w = np.asarray(params["Dense_0"]["kernel"], np.float64)
  b = np.asarray(params["Dense_0"]["bias"], np.float64)
  deltas = []
  for c in clients:
    logits = c["x"] @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    g = (p - np.eye(classes)[c["y"]]) / len(c["y"])
    deltas.append(lr * np.concatenate([(c["x"].T @ g).ravel(), g.sum(0)]))
  deltas = np.stack(deltas)  # ravel order: bias < kernel? see below
  # ravel_pytree orders leaves by key: bias, then kernel.
  deltas = np.concatenate(
    [deltas[:, dim * classes :], deltas[:, : dim * classes]], axis=1
  )
  norms = np.linalg.norm(deltas, axis=1, keepdims=True)
  bounded = deltas * np.minimum(1.0, 0.05 / norms)
  levels = 2**BPV - 1
  sent = ~sa.dropped_clients(n, 0.25, 0, seed=11)
  mean = (
    np.round(bounded[sent] / 0.05 * levels).sum(0) * 0.05 / levels / sent.sum()
  )
  new = engine.algorithm.get_params(state.server)
  got = np.concatenate(
    [
      np.asarray(new["Dense_0"]["bias"]).ravel(),
      np.asarray(new["Dense_0"]["kernel"]).ravel(),
    ]
  )
  start = np.concatenate([b, w.ravel()])
  # float32 training may flip a rounding: one step C/L per client at most.
  np.testing.assert_allclose(
    got, start - mean, rtol=0, atol=0.05 / levels + 1e-6
  )
  assert float(metrics["secagg_survivors"]) == 6
  assert float(metrics["secagg_dropped"]) == 2
  assert float(metrics["secagg_degree"]) == 4
  assert float(metrics["secagg_client_bytes_sent"]) > 0


def test_aggregator_refuses_below_threshold(rng):
  """Inside the (traced) aggregator nothing raises: the refused round has a
  zero placeholder mean and its reason in the metrics, and check_output
  raises the protocol's message on the host; nothing is unmasked."""
  agg = sa.secure_aggregator(
    CLIP, bits_per_value=BPV, dropout_rate=0.5, seed=7
  )  # 8 of 16 survive, t = 9
  out, _ = _run_aggregator(agg, clipped_updates(rng), np.ones(N))
  jax.block_until_ready(out.mean)
  assert not np.asarray(out.mean["w"]).any()
  assert float(out.total_weight) == 0.0
  metrics = jax.device_get(out.metrics)
  assert metrics["secagg_refused"] == sa.REFUSED_THRESHOLD
  assert metrics["secagg_refused_holders"] == 8
  with pytest.raises(
    sa.SecAggError,
    match=r"refuses to unmask: 8 of 16 clients "
    r"survived.*threshold t=9.*No shares were revealed",
  ) as err:
    agg.check_output(metrics)
  assert "\n" not in str(err.value)
  assert err.value.reason == sa.REFUSED_THRESHOLD


def test_quantize_never_maps_non_finite_values_into_range():
  x = jnp.asarray([[0.5, jnp.nan, jnp.inf, -jnp.inf, -1.0]], jnp.float32)
  q = np.asarray(sa.quantize(x, CLIP, BPV))[0]
  levels = 2**BPV - 1
  assert q[0] == round(0.5 * levels) + levels and q[4] == 0
  # NaN used to become 0, which decodes as -C.
  assert (q[1:4] == sa.INVALID_CODE).all() and sa.INVALID_CODE > 2 * levels


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_aggregator_does_not_send_a_non_finite_update(rng, bad):
  """With the engine's non-finite handling bypassed (the aggregator called
  directly), a non-finite client does not send: the mean is the finite
  clients' one and secagg_nonfinite counts it."""
  x = clipped_updates(rng)
  x_bad = x.copy()
  x_bad[4, 7] = bad
  weights = np.ones(N)
  agg = sa.secure_aggregator(CLIP, bits_per_value=BPV, seed=5)
  out, _ = _run_aggregator(agg, x_bad, weights)
  ref, _ = _run_aggregator(
    sa.secure_aggregator(CLIP, bits_per_value=BPV, seed=5),
    x,
    np.where(np.arange(N) == 4, 0.0, weights),  # client 4 does not send
  )
  np.testing.assert_array_equal(out.mean["w"], ref.mean["w"])
  assert float(out.metrics["secagg_nonfinite"]) == 1
  assert float(ref.metrics["secagg_nonfinite"]) == 0
  assert float(out.metrics["secagg_survivors"]) == N - 1
  assert float(out.total_weight) == N - 1
  assert float(out.metrics["secagg_refused"]) == 0


def test_aggregators_with_the_same_arguments_do_not_share_hosts(rng):
  """Each aggregator owns its host side: two built from the same arguments
  (and seed) keep separate rounds, give the same (seeded) results, and free
  a round's keys once it is unmasked."""
  x, weights = clipped_updates(rng), np.ones(N)
  spec = {"w": jax.ShapeDtypeStruct((D,), jnp.float32)}
  aggs = [sa.secure_aggregator(CLIP, bits_per_value=BPV, seed=3) for _ in "ab"]
  state = aggs[0].init_state(spec)
  accs = [a.init(state, spec, N) for a in aggs]
  hosts = [acc.host for acc in accs]
  assert hosts[0] is not hosts[1]
  assert isinstance(hosts[0], sa.SecAggHost)
  # The same aggregator and shape: the same host.
  assert aggs[0].init(state, spec, N).host is hosts[0]
  block = (
    {"w": jnp.asarray(x)},
    jnp.ones(N, jnp.float32),
    jnp.ones(N, bool),
    jnp.arange(N, dtype=jnp.int32),
  )
  jax.block_until_ready(aggs[0].add(state, accs[0], *block).sum)
  assert sorted(hosts[0].rounds) == [0] and not hosts[1].rounds
  jax.block_until_ready(aggs[1].add(state, accs[1], *block).sum)
  assert hosts[0].rounds[0] is not hosts[1].rounds[0]
  outs = [_run_aggregator(a, x, weights)[0] for a in aggs]
  np.testing.assert_array_equal(outs[0].mean["w"], outs[1].mean["w"])
  assert not hosts[0].rounds and not hosts[1].rounds  # freed by Unmasking
  # OS randomness: separate hosts, and each still unmasks exactly.
  fresh = [
    sa.secure_aggregator(CLIP, bits_per_value=BPV, seed=None) for _ in "ab"
  ]
  assert fresh[0].init(state, spec, N).host is not (
    fresh[1].init(state, spec, N).host
  )
  for agg in fresh:
    out, _ = _run_aggregator(agg, x, weights)
    np.testing.assert_array_equal(out.mean["w"], outs[0].mean["w"])


def test_host_memory_stays_bounded_over_rounds():
  """A round's protocol objects live from its first request to the end of
  its Unmasking; rounds left behind (no finalize) are freed two rounds
  later."""
  agg = sa.secure_aggregator(
    CLIP, bits_per_value=BPV, seed=1, dropout_rate=0.25
  )
  spec = {"w": jax.ShapeDtypeStruct((5,), jnp.float32)}
  host = agg.init(agg.init_state(spec), spec, 4).host
  for r in range(40):
    host.round(r)
    assert sorted(host.rounds) == sorted({max(r - 1, 0), r})
    assert sorted(host.drops) == sorted(host.rounds)
  # Through the host callbacks, pooled over runs at rounds 40 and 41.
  runs = np.array([40, 41])
  material = host.client_material(runs)
  assert material[0].shape == (2, 4, 2) and not material[4].any()
  assert sorted(host.rounds) == [40, 41]
  *_, stats, refusal = host.server_material(
    runs, np.ones((2, 4), np.int32), np.zeros(2, np.int32)
  )
  assert not refusal[:, 0].any() and (stats[:, 0] == 4).all()
  assert not host.rounds and not host.drops


def test_module_keeps_no_mutable_state():
  mutable = {
    name: type(value).__name__
    for name, value in vars(sa).items()
    if not name.startswith("__") and isinstance(value, (dict, list, set))
  }
  assert not mutable, mutable


def test_accumulator_and_argument_errors():
  agg = sa.secure_aggregator(1.0)
  spec = {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}
  state = agg.init_state(spec)
  with pytest.raises(
    TypeError,
    match=r"secure_aggregator: add, merge and finalize take the accumulator "
    r"that this aggregator's init made \(a SecAggAccumulator\), got dict\.",
  ):
    agg.finalize(state, {"sum": jnp.zeros(3, jnp.uint32)}, None)
  with pytest.raises(
    ValueError,
    match=r"secure_aggregator: dropout_rate must be a number in \[0, 1\), "
    r"got 1\.0\.",
  ):
    sa.secure_aggregator(1.0, dropout_rate=1.0)
  with pytest.raises(
    ValueError,
    match=r"secure_aggregator: seed must be an int >= 0 or None \(None: "
    r"fresh OS randomness every round\), got -1\.",
  ):
    sa.secure_aggregator(1.0, seed=-1)
  with pytest.raises(
    ValueError, match=r"noise_multiplier must be None or a finite float >= 0"
  ):
    sa.secure_aggregator(1.0, noise_multiplier=float("nan"))


def test_pooled_sweep_rebuilding_the_aggregator_per_run(one_device_mesh):
  """``algorithm_fn`` builds a fresh secure aggregator for every run and
  every stage: the accumulator carries the host that init chose to add and
  finalize, so even with OS randomness (no seed) every run unmasks its
  exact sum, equal to a separate seeded engine round."""
  rng = np.random.default_rng(2)
  n, lrs = 6, (0.5, 0.1)
  clients = [
    {
      "x": rng.standard_normal((6, 3)).astype(np.float32),
      "y": rng.integers(0, 2, 6).astype(np.int32),
    }
    for _ in range(n)
  ]
  model = fl.models.logistic_regression(3, 2)
  params = model.init(jax.random.PRNGKey(0))

  def make(lr, seed=None):
    agg = sa.secure_aggregator(0.05, bits_per_value=BPV, seed=seed)
    return fl.fed_avg(model, optax.sgd(lr), aggregator=agg)

  cfg = fl.RoundConfig(n, sampling="all")
  engine = fl.Engine(make(lrs[0]), cfg, one_device_mesh)
  data = engine.put_data(fl.FederatedDataset.from_clients(clients))
  states = [engine.init(params, seed=s) for s in range(2)]
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *states)
  new, metrics = jax.jit(
    lambda st, h: engine.rounds_body(st, data, lambda h: make(h["lr"]), h)
  )(stacked, {"lr": jnp.asarray(lrs, jnp.float32)})
  np.testing.assert_array_equal(np.asarray(metrics["secagg_refused"]), [0, 0])
  np.testing.assert_array_equal(np.asarray(metrics["secagg_survivors"]), [n, n])
  for r, lr in enumerate(lrs):
    alone = fl.Engine(make(lr, seed=5), cfg, one_device_mesh)
    want, _ = alone.round(states[r], alone.put_data(data))
    for a, b in zip(
      jax.tree.leaves(jax.tree.map(lambda a, r=r: a[r], new.server)),
      jax.tree.leaves(want.server),
    ):
      np.testing.assert_array_equal(a, b)
