"""The standard benchmark models: published parameter counts, float64 numpy
forward references, the next-word and tag metrics on hand-made logits,
multi-hot label checks, and one engine round with the sequence and tag
models."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_lite as fl
from fedjax_lite.models import standard


def f64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def random_params(model, rng, scale=0.3):
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0))
  return jax.tree.map(
    lambda s: jnp.asarray(rng.normal(0.0, scale, s.shape), jnp.float32), shapes
  )


def count(model):
  return fl.models.num_params(jax.eval_shape(model.init, jax.random.PRNGKey(0)))


# ------------------------------------------------------------ parameter counts
@pytest.mark.parametrize("name", sorted(standard.STANDARD_MODELS))
def test_published_parameter_count(name):
  build, published, source = standard.STANDARD_MODELS[name]
  assert count(build()) == published
  assert source


def test_parameter_counts_from_the_layer_shapes():
  lstm = lambda i, h: 4 * h * (i + h) + 4 * h
  c = 10_004
  nwp = c * 96 + lstm(96, 670) + (670 * 96 + 96) + (96 * c + c)
  assert nwp == 4_050_748
  shakespeare = 90 * 8 + lstm(8, 256) + lstm(256, 256) + (256 * 90 + 90)
  assert shakespeare == 820_522
  emnist = lambda k: 320 + 18_496 + (12 * 12 * 64 * 128 + 128) + 129 * k
  assert (emnist(62), emnist(10)) == (1_206_590, 1_199_882)
  # TFF's ResNet-18 has no group-norm parameters; the torchvision-layout one
  # has a scale and an offset per channel of its 10 group norms
  conv = (
    7 * 7 * 3 * 64
    + 4 * 9 * 64 * 64
    + sum(9 * c // 2 * c + 27 * c * c + c // 2 * c for c in (128, 256, 512))
  )
  assert conv + 512 * 100 + 100 == 11_218_212
  gn = 2 * (64 + 4 * 64 + 5 * 128 + 5 * 256 + 5 * 512)
  assert count(fl.models.resnet18_gn()) == 11_218_212 + gn == 11_227_812


# ---------------------------------------------------------------- references
def sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def lstm_reference(p, h, units):
  """Zero-state LSTM over ``h [b, T, I]`` (flax's OptimizedLSTMCell params)."""
  hs = np.zeros((h.shape[0], units))
  cs = np.zeros_like(hs)
  out = []
  for t in range(h.shape[1]):
    z = {
      g: h[:, t] @ p["i" + g]["kernel"]
      + hs @ p["h" + g]["kernel"]
      + p["h" + g]["bias"]
      for g in "ifgo"
    }
    cs = sigmoid(z["f"]) * cs + sigmoid(z["i"]) * np.tanh(z["g"])
    hs = sigmoid(z["o"]) * np.tanh(cs)
    out.append(hs)
  return np.stack(out, axis=1)


def sequence_reference(p, tokens, hidden, projection, tanh):
  h = p["embedding"][tokens]
  for i, units in enumerate(hidden):
    h = lstm_reference(p[f"lstm_{i}"], h, units)
    h = np.tanh(h) if tanh else h
  if projection:
    h = h @ p["projection"]["kernel"] + p["projection"]["bias"]
  return h @ p["output"]["kernel"] + p["output"]["bias"]


def conv_valid(x, w, b):
  bsz, h, wd, _ = x.shape
  kh, kw = w.shape[:2]
  oh, ow = h - kh + 1, wd - kw + 1
  out = np.zeros((bsz, oh, ow, w.shape[-1]))
  for i in range(kh):
    for j in range(kw):
      out += np.einsum("bhwc,cd->bhwd", x[:, i : i + oh, j : j + ow], w[i, j])
  return out + b


def emnist_cnn_reference(p, x):
  h = np.maximum(conv_valid(x, p["Conv_0"]["kernel"], p["Conv_0"]["bias"]), 0)
  h = np.maximum(conv_valid(h, p["Conv_1"]["kernel"], p["Conv_1"]["bias"]), 0)
  b, hh, ww, c = h.shape
  h = h[:, : hh // 2 * 2, : ww // 2 * 2]
  h = h.reshape(b, hh // 2, 2, ww // 2, 2, c).max(axis=(2, 4))
  h = h.reshape(b, -1)  # [H, W, C] order, as Haiku's Flatten
  h = np.maximum(h @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"], 0)
  return h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]


def conv_same(x, w, stride=1):
  """TF/XLA ``SAME`` cross-correlation (the extra padding row at the end)."""
  bsz, h, wd, _ = x.shape
  kh, kw = w.shape[:2]
  oh, ow = -(-h // stride), -(-wd // stride)
  ph = max((oh - 1) * stride + kh - h, 0)
  pw = max((ow - 1) * stride + kw - wd, 0)
  xp = np.pad(
    x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0))
  )
  out = np.zeros((bsz, oh, ow, w.shape[-1]))
  for i in range(kh):
    for j in range(kw):
      patch = xp[:, i : i + stride * (oh - 1) + 1 : stride]
      patch = patch[:, :, j : j + stride * (ow - 1) + 1 : stride]
      out += np.einsum("bhwc,cd->bhwd", patch, w[i, j])
  return out


def group_norm(x, eps=1e-3):
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, 2, c // 2)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = ((g - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape)


def max_pool_3x3_s2_same(x):
  b, h, w, c = x.shape
  oh, ow = -(-h // 2), -(-w // 2)
  ph, pw = max((oh - 1) * 2 + 3 - h, 0), max((ow - 1) * 2 + 3 - w, 0)
  xp = np.pad(
    x,
    ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)),
    constant_values=-np.inf,
  )
  out = np.full((b, oh, ow, c), -np.inf)
  for i in range(3):
    for j in range(3):
      out = np.maximum(
        out, xp[:, i : i + 2 * oh - 1 : 2, j : j + 2 * ow - 1 : 2]
      )
  return out


def resnet18_tff_reference(p, x):
  relu = lambda a: np.maximum(a, 0.0)
  h = relu(group_norm(conv_same(x, p["conv_stem"]["kernel"], 2)))
  h = max_pool_3x3_s2_same(h)
  for stage in range(4):
    for b in range(2):
      q = p[f"stage{stage + 1}_block{b + 1}"]
      y = h if stage == 0 and b == 0 else relu(group_norm(h))
      y = conv_same(y, q["conv1"]["kernel"])
      y = conv_same(relu(group_norm(y)), q["conv2"]["kernel"])
      short = h
      if "conv_short" in q:
        short = group_norm(conv_same(h, q["conv_short"]["kernel"]))
      h = short + y
  h = relu(group_norm(h)).mean(axis=(1, 2))
  return h @ p["classifier"]["kernel"] + p["classifier"]["bias"]


def test_tff_resnet18_matches_numpy_reference(rng):
  model = standard.resnet18_gn_tff((8, 8, 3), 5)
  params = random_params(model, rng, 0.05)
  x = rng.random((2, 8, 8, 3)).astype(np.float32)
  got = jax.jit(model.apply)(params, {"x": jnp.asarray(x)})
  assert got.shape == (2, 5)
  want = resnet18_tff_reference(f64(params), x)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("tanh", [True, False])
def test_nwp_lstm_matches_numpy_reference(rng, tanh):
  model = standard.stackoverflow_nwp_lstm(
    7, embed_dim=3, hidden=(4,), projection=5, tanh=tanh, seq_len=6
  )
  assert model.num_classes == 11
  params = random_params(model, rng)
  tokens = rng.integers(0, 11, (3, 6))
  got = model.apply(params, {"x": jnp.asarray(tokens, jnp.int32)})
  assert got.shape == (3, 6, 11)
  want = sequence_reference(f64(params), tokens, (4,), True, tanh)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_shakespeare_lstm_matches_numpy_reference(rng):
  model = standard.shakespeare_lstm(5, embed_dim=3, hidden=(4, 5), seq_len=4)
  params = random_params(model, rng)
  tokens = rng.integers(0, 9, (2, 4))
  got = model.apply(params, {"x": jnp.asarray(tokens, jnp.int32)})
  want = sequence_reference(f64(params), tokens, (4, 5), None, True)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_lstm_forget_bias_starts_at_one():
  model = standard.stackoverflow_nwp_lstm(
    5, embed_dim=2, hidden=(3,), projection=2
  )
  params = jax.jit(model.init)(jax.random.PRNGKey(0))
  np.testing.assert_array_equal(params["lstm_0"]["hf"]["bias"], np.ones(3))
  np.testing.assert_array_equal(params["lstm_0"]["hi"]["bias"], np.zeros(3))


def test_emnist_cnn_matches_numpy_reference(rng):
  model = standard.emnist_cnn(only_digits=True, input_shape=(9, 9, 1))
  params = random_params(model, rng, 0.2)
  x = rng.random((3, 9, 9, 1)).astype(np.float32)
  got = model.apply(params, {"x": jnp.asarray(x)})
  assert got.shape == (3, 10)
  want = emnist_cnn_reference(f64(params), x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # training mode drops units: a different function of the same params
  train = model.apply(
    params, {"x": jnp.asarray(x)}, jax.random.PRNGKey(1), True
  )
  assert not np.allclose(train, got)


def test_tag_lr_matches_numpy_reference(rng):
  model = standard.stackoverflow_tag_lr(8, 6, top_k=2)
  params = random_params(model, rng)
  x = rng.random((4, 8)).astype(np.float32)
  y = (rng.random((4, 6)) < 0.4).astype(np.float32)
  logits = model.apply(params, {"x": jnp.asarray(x)})
  p = f64(params)["Dense_0"]
  want = x @ p["kernel"] + p["bias"]
  np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-6)
  prob = sigmoid(want)
  bce = -(y * np.log(prob) + (1 - y) * np.log(1 - prob)).mean(axis=-1)
  np.testing.assert_allclose(model.loss(logits, jnp.asarray(y)), bce, rtol=1e-5)


# ------------------------------------------------------------------- metrics
def test_nwp_metrics_ignore_pad_oov_and_eos(rng):
  # vocab 3 -> ids: PAD 0, BOS 1, EOS 2, words 3..5, OOV 6
  model = standard.stackoverflow_nwp_lstm(3, embed_dim=2, hidden=(2,))
  y = np.array([[3, 6, 2, 4, 0, 0], [0, 0, 0, 0, 0, 0]])
  pred = np.array([[3, 6, 2, 5, 3, 3], [3, 3, 3, 3, 3, 3]])
  logits = np.eye(7)[pred] * 5 + rng.normal(0, 0.1, (2, 6, 7))
  # without OOV, EOS, PAD and BOS the first target's runner-up is word 3
  logits[0, 1, 3] = 4.0
  got = {
    k: np.asarray(fn(jnp.asarray(logits), jnp.asarray(y)))
    for k, fn in model.metrics.items()
  }
  np.testing.assert_allclose(got["accuracy_no_oov_no_eos"], [1 / 2, 0])
  np.testing.assert_allclose(got["accuracy_no_oov"], [2 / 3, 0])
  np.testing.assert_allclose(got["accuracy_no_eos"], [2 / 3, 0])
  np.testing.assert_allclose(got["accuracy_in_vocab"], [1 / 3, 0])
  np.testing.assert_array_equal(got["num_tokens"], [4, 0])
  np.testing.assert_array_equal(got["num_tokens_no_oov_no_eos"], [2, 0])
  np.testing.assert_array_equal(got["num_correct_no_oov_no_eos"], [1, 0])
  # loss: mean softmax cross-entropy over the non-PAD targets
  lsm = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(lsm, y[..., None], -1)[..., 0]
  want = [nll[0, :4].mean(), 0.0]
  np.testing.assert_allclose(
    model.loss(jnp.asarray(logits), jnp.asarray(y)), want, rtol=1e-5
  )
  summed = standard.stackoverflow_nwp_lstm(
    3, embed_dim=2, hidden=(2,), token_loss="sum"
  )
  np.testing.assert_allclose(
    summed.loss(jnp.asarray(logits), jnp.asarray(y)),
    [4 * want[0], 0.0],
    rtol=1e-5,
  )


def test_nwp_metrics_follow_the_given_token_ids():
  # TFF's order for vocab 3: PAD 0, words 1..3, OOV 4, BOS 5, EOS 6
  model = standard.stackoverflow_nwp_lstm(
    3, pad=0, oov=4, bos=5, eos=6, embed_dim=2, hidden=(2,)
  )
  y = jnp.asarray([[1, 4, 6, 2, 0]])
  logits = jnp.asarray(np.eye(7)[[1, 4, 6, 3, 1]][None] * 5.0)
  acc = model.metrics["accuracy_no_oov_no_eos"](logits, y)
  np.testing.assert_allclose(acc, [1 / 2])
  np.testing.assert_allclose(
    model.metrics["accuracy_no_oov"](logits, y), [2 / 3]
  )


def test_tag_metrics_match_numpy(rng):
  k = 3
  model = standard.stackoverflow_tag_lr(5, 9, top_k=k)
  logits = rng.normal(size=(6, 9))
  y = (rng.random((6, 9)) < 0.3).astype(np.float32)
  y[0] = 0.0  # an example without tags
  y[1, np.argmax(logits[1])] = 1.0
  got = {
    n: np.asarray(fn(jnp.asarray(logits, jnp.float32), jnp.asarray(y)))
    for n, fn in model.metrics.items()
  }
  top = np.argsort(-logits, axis=-1)[:, :k]
  hits = np.take_along_axis(y, top, -1).sum(-1)
  tags = y.sum(-1)
  np.testing.assert_allclose(got["recall_at_3"], hits / np.maximum(tags, 1))
  np.testing.assert_allclose(got["precision_at_3"], hits / k)
  np.testing.assert_array_equal(got["num_hits_at_3"], hits)
  np.testing.assert_array_equal(got["num_labels"], tags)
  pos = logits > 0
  want = (pos * y).sum(-1) / np.maximum(pos.sum(-1), 1)
  np.testing.assert_allclose(got["precision"], want, rtol=1e-6)
  assert got["recall_at_3"][0] == 0.0 and got["recall_at_3"][1] > 0


# ------------------------------------------------------------ multi-hot labels
def test_multi_hot_labels_are_validated():
  model = standard.stackoverflow_tag_lr(4, 3, top_k=1)
  assert model.multi_label
  model.validate_labels(np.array([[0, 1, 1], [0, 0, 0]], np.float32))
  with pytest.raises(fl.checks.DataError, match=r"shape \(2, 4\).*\[n, 3\]"):
    model.validate_labels(np.zeros((2, 4), np.float32), "train")
  with pytest.raises(fl.checks.DataError, match=r"other than 0 and 1.*2\.0"):
    model.validate_labels(np.array([[0, 2, 1]], np.float32))
  with pytest.raises(fl.checks.DataError, match="shape"):
    model.validate_labels(np.array([0, 1, 1], np.float32))
  # single-label models still want class indices
  with pytest.raises(fl.checks.DataError, match="integer class indices"):
    fl.models.logistic_regression(3, 3).validate_labels(np.array([[0.0, 1.0]]))


# ----------------------------------------------------------- bad arguments
@pytest.mark.parametrize(
  "call, error, match",
  [
    (
      lambda: standard.stackoverflow_nwp_lstm(10, eos=1),
      ValueError,
      "bos and eos are both 1",
    ),
    (
      lambda: standard.stackoverflow_nwp_lstm(10, oov=14),
      ValueError,
      r"oov=14 .*\[0, 14\)",
    ),
    (
      lambda: standard.stackoverflow_nwp_lstm(10, token_loss="max"),
      ValueError,
      "token_loss must be one of",
    ),
    (
      lambda: standard.stackoverflow_nwp_lstm(0),
      ValueError,
      "vocab_size",
    ),
    (
      lambda: standard.shakespeare_lstm(hidden=()),
      ValueError,
      "hidden must be positive",
    ),
    (
      lambda: standard.stackoverflow_tag_lr(10, 4, top_k=5),
      ValueError,
      "top_k=5 exceeds num_tags=4",
    ),
    (
      lambda: standard.emnist_cnn(only_digits=1),
      TypeError,
      "only_digits must be True or False",
    ),
    (
      lambda: standard.resnet18_gn_tff(epsilon=0.0),
      ValueError,
      "epsilon must be a positive number",
    ),
  ],
)
def test_bad_arguments(call, error, match):
  with pytest.raises(error, match=match):
    call()


# ---------------------------------------------------------- inside the engine
def one_round(model, clients, rng):
  work = fl.LocalWork(batch_size=2, num_epochs=1, shuffle=False)
  engine = fl.Engine(
    fl.fed_avg(model, optax.sgd(0.1)),
    fl.RoundConfig(len(clients), work, sampling="all", block_size=1),
  )
  params = random_params(model, rng, 0.2)
  data = engine.put_data(fl.FederatedDataset.from_clients(clients))
  state, metrics = engine.round(engine.init(params), data)
  return params, state, metrics


def test_engine_round_with_nwp_lstm(rng):
  model = standard.stackoverflow_nwp_lstm(
    6, embed_dim=3, hidden=(4,), projection=3, seq_len=5
  )
  clients = []
  for n in (3, 2, 4):
    y = rng.integers(0, 10, (n, 5)).astype(np.int32)
    y[:, -1] = 0  # padded tail
    clients.append({"x": rng.integers(0, 10, (n, 5)).astype(np.int32), "y": y})
  params, state, metrics = one_round(model, clients, rng)
  assert np.isfinite(float(metrics["loss"]))
  moved = jax.tree.map(
    lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
    state.server.params,
    params,
  )
  assert max(jax.tree.leaves(moved)) > 0


def test_engine_round_with_tag_lr(rng):
  model = standard.stackoverflow_tag_lr(8, 5, top_k=2)
  clients = [
    {
      "x": rng.random((n, 8)).astype(np.float32),
      "y": (rng.random((n, 5)) < 0.3).astype(np.float32),
    }
    for n in (2, 4, 3)
  ]
  params, state, metrics = one_round(model, clients, rng)
  assert np.isfinite(float(metrics["loss"]))
  assert not np.allclose(
    state.server.params["Dense_0"]["kernel"], params["Dense_0"]["kernel"]
  )


def test_shakespeare_default_ids_follow_the_dataset():
  # the submodule (the package exports a function of the same name)
  data = importlib.import_module("fedjax_lite.datasets.shakespeare")
  model = standard.shakespeare_lstm(embed_dim=2, hidden=(2,))
  assert model.num_classes == data.FEDJAX_VOCAB_SIZE == 90
  y = jnp.asarray([[data.FEDJAX_OOV, data.FEDJAX_EOS, 5, data.FEDJAX_PAD]])
  logits = jnp.asarray(np.eye(90)[[5, 5, 5, 5]][None] * 5.0)
  np.testing.assert_allclose(
    model.metrics["accuracy_no_oov_no_eos"](logits, y), [1.0]
  )
  np.testing.assert_array_equal(model.metrics["num_tokens"](logits, y), [3])
