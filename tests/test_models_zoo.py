"""FedAvg CNN and LEAF char-LSTM: float64 numpy forward references, parameter
counts, and one engine round (vmapped clients, scanned steps) against a plain
per-client loop. The LSTM inside the engine is also run by the Shakespeare
smoke experiment (tests/test_datasets_shakespeare.py); its exact round check
here is marked slow."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_lite as fl


def f64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def random_params(model, rng, scale=0.5):
  """Random float32 params of the model's shapes (faster than model.init)."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0))
  return jax.tree.map(
    lambda s: jnp.asarray(rng.normal(0.0, scale, s.shape), jnp.float32), shapes
  )


# --------------------------------------------------------------- references
def conv_same(x, w, b):
  """Cross-correlation with SAME padding: x [B,H,W,I], w [kh,kw,I,O]."""
  bsz, h, wd, _ = x.shape
  kh, kw = w.shape[:2]
  ph, pw = (kh - 1) // 2, (kw - 1) // 2
  xp = np.pad(x, ((0, 0), (ph, kh - 1 - ph), (pw, kw - 1 - pw), (0, 0)))
  out = np.zeros((bsz, h, wd, w.shape[-1]))
  for i in range(kh):
    for j in range(kw):
      out += np.einsum("bhwc,cd->bhwd", xp[:, i : i + h, j : j + wd], w[i, j])
  return out + b


def max_pool_2x2(x):
  """2x2 window, stride 2, SAME: odd sizes are padded at the end."""
  bsz, h, w, c = x.shape
  hp, wp = -(-h // 2), -(-w // 2)
  xp = np.full((bsz, 2 * hp, 2 * wp, c), -np.inf)
  xp[:, :h, :w] = x
  return xp.reshape(bsz, hp, 2, wp, 2, c).max(axis=(2, 4))


def cnn_reference(p, x):
  h = x
  for i in range(2):
    c = p[f"Conv_{i}"]
    h = max_pool_2x2(np.maximum(conv_same(h, c["kernel"], c["bias"]), 0.0))
  h = h.reshape(h.shape[0], -1)
  h = np.maximum(h @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"], 0.0)
  return h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]


def sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def lstm_reference(p, tokens, num_layers):
  h = np.eye(p["embedding"].shape[0])[tokens] @ p["embedding"]  # [b, T, E]
  for layer in range(num_layers):
    c = p[f"OptimizedLSTMCell_{layer}"]
    units = c["hi"]["kernel"].shape[0]
    hs = np.zeros((h.shape[0], units))
    cs = np.zeros_like(hs)
    out = []
    for t in range(h.shape[1]):
      gate = {
        g: h[:, t] @ c["i" + g]["kernel"]
        + hs @ c["h" + g]["kernel"]
        + c["h" + g]["bias"]
        for g in "ifgo"
      }
      cs = sigmoid(gate["f"]) * cs + sigmoid(gate["i"]) * np.tanh(gate["g"])
      hs = sigmoid(gate["o"]) * np.tanh(cs)
      out.append(hs)
    h = np.stack(out, axis=1)
  return h[:, -1] @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]


# ------------------------------------------------------------------- models
def tiny_cnn():
  return fl.models.cnn((6, 6, 2), 3, channels=(2, 3), hidden=4, kernel_size=3)


def tiny_lstm():
  return fl.models.char_lstm(7, 5, embed_dim=3, hidden=(4, 5))


def test_cnn_matches_numpy_reference(rng):
  model = tiny_cnn()
  params = random_params(model, rng)
  x = rng.random((3, 6, 6, 2)).astype(np.float32)
  got = model.apply(params, {"x": jnp.asarray(x)})
  assert got.shape == (3, 3)
  np.testing.assert_allclose(
    got, cnn_reference(f64(params), x), rtol=1e-5, atol=1e-6
  )
  flat = model.apply(params, {"x": jnp.asarray(x.reshape(3, -1))})
  np.testing.assert_allclose(flat, got, rtol=1e-6)


def test_cnn_paper_parameter_count():
  params = jax.eval_shape(fl.models.cnn().init, jax.random.PRNGKey(0))
  conv = (5 * 5 * 1 * 32 + 32) + (5 * 5 * 32 * 64 + 64)
  dense = (7 * 7 * 64 * 512 + 512) + (512 * 10 + 10)
  assert fl.models.num_params(params) == conv + dense == 1_663_370


def test_lstm_matches_numpy_reference(rng):
  model = tiny_lstm()
  params = random_params(model, rng)
  tokens = rng.integers(0, 7, (4, 5))
  got = model.apply(params, {"x": jnp.asarray(tokens, jnp.int32)})
  assert got.shape == (4, 7)
  np.testing.assert_allclose(
    got, lstm_reference(f64(params), tokens, 2), rtol=1e-5, atol=1e-6
  )
  as_bytes = model.apply(params, {"x": jnp.asarray(tokens, jnp.uint8)})
  np.testing.assert_array_equal(as_bytes, got)


def test_lstm_leaf_parameter_count():
  params = jax.eval_shape(fl.models.char_lstm().init, jax.random.PRNGKey(0))
  v, e, h = 80, 8, 256
  lstm = lambda i: 4 * h * (i + h) + 4 * h
  assert fl.models.num_params(params) == v * e + lstm(e) + lstm(h) + (h * v + v)


# ------------------------------------------------------- inside the engine
def local_sgd(model, params, client, lr, batch):
  def loss(p, xb, yb):
    return fl.models.softmax_cross_entropy(model.apply(p, {"x": xb}), yb).mean()

  grad = jax.jit(jax.grad(loss))
  for s in range(0, client["y"].shape[0], batch):
    g = grad(params, client["x"][s : s + batch], client["y"][s : s + batch])
    params = jax.tree.map(lambda a, b: a - lr * b, params, g)
  return params


@pytest.mark.parametrize(
  "make, sample",
  [
    (tiny_cnn, lambda r, n: r.random((n, 6, 6, 2)).astype(np.float32)),
    pytest.param(
      tiny_lstm,
      lambda r, n: r.integers(0, 7, (n, 5)).astype(np.uint8),
      marks=pytest.mark.slow,
    ),
  ],
  ids=["cnn", "lstm"],
)
def test_one_fedavg_round_matches_per_client_loop(rng, make, sample):
  model = make()
  num_classes = model.num_classes
  clients = [
    {"x": sample(rng, n), "y": rng.integers(0, num_classes, n).astype(np.int32)}
    for n in (4, 2, 6)
  ]
  lr, batch = 0.3, 2
  work = fl.LocalWork(batch_size=batch, num_epochs=1, shuffle=False)
  engine = fl.Engine(
    fl.fed_avg(model, optax.sgd(lr)),
    fl.RoundConfig(3, work, sampling="all", block_size=1),
  )
  params = random_params(model, rng, 0.3)
  data = engine.put_data(fl.FederatedDataset.from_clients(clients))
  state, metrics = engine.round(engine.init(params), data)
  n = np.array([c["y"].shape[0] for c in clients], np.float64)
  locals_ = [local_sgd(model, params, c, lr, batch) for c in clients]
  want = jax.tree.map(
    lambda *ps: sum(
      w * np.asarray(p, np.float64) for w, p in zip(n / n.sum(), ps)
    ),
    *locals_,
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6),
    f64(state.server.params),
    want,
  )
  assert np.isfinite(float(metrics["loss"]))


@pytest.mark.parametrize(
  "call, match",
  [
    (lambda: fl.models.cnn((28, 28, 1, 1)), "input_shape"),
    (lambda: fl.models.cnn(num_classes=0), "num_classes"),
    (lambda: fl.models.cnn(channels=()), "channels"),
    (lambda: fl.models.char_lstm(0), "vocab_size"),
    (lambda: fl.models.char_lstm(hidden=(8, 0)), "hidden"),
  ],
)
def test_bad_shapes(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_lstm_forget_bias_starts_at_one():
  params = jax.jit(tiny_lstm().init)(jax.random.PRNGKey(0))
  for layer, units in enumerate((4, 5)):
    cell = params[f"OptimizedLSTMCell_{layer}"]
    np.testing.assert_array_equal(cell["hf"]["bias"], np.ones(units))
    for gate in ("hi", "hg", "ho"):
      np.testing.assert_array_equal(cell[gate]["bias"], np.zeros(units))
