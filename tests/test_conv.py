"""Convolution, pooling and channel-major dense layers on the GEMM path:
values and gradients against ``lax.conv_general_dilated`` /
``lax.reduce_window`` and autodiff; the CNN models against their plain
versions; FedAvg with the fast CNN against the plain one."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import fedjax_lite as fl
from fedjax_lite.models import conv as C

HI = lax.Precision.HIGHEST


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def value_and_grads(f, *args, seed=0):
  """``f(*args)`` and the gradients of ``sum(f * ct)`` for a random ``ct``."""
  y = f(*args)
  ct = jnp.asarray(np.random.default_rng(seed).standard_normal(y.shape))
  grads = jax.grad(
    lambda *a: jnp.sum(f(*a) * ct.astype(y.dtype)), range(len(args))
  )(*args)
  return y, grads


# (batch, c_in, c_out, kernel, strides, padding, H, W)
CONV_CASES = [
  (1, 1, 3, 3, 1, "VALID", 8, 8),
  (10, 3, 32, 3, 1, "VALID", 12, 12),
  (10, 32, 64, 3, 1, "SAME", 10, 9),
  (2, 5, 7, 3, 2, "SAME", 9, 9),
  (1, 64, 16, 5, 1, "SAME", 7, 7),
  (3, 4, 4, 1, 2, "VALID", 6, 6),
  (2, 8, 3, 3, (2, 1), ((1, 2), (0, 1)), 10, 11),
  (1, 2, 64, 7, 2, "SAME", 13, 12),
  (10, 16, 1, 2, 3, "VALID", 11, 11),
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("jit", [False, True])
def test_conv2d_equals_lax_conv(case, jit):
  b, cin, cout, k, s, pad, h, w = case
  rng = np.random.default_rng(sum(map(hash, map(str, case))) % 2**32)
  x = jnp.asarray(rng.standard_normal((b, h, w, cin)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((k, k, cin, cout)), jnp.float32)
  strides = (s, s) if isinstance(s, int) else s
  lax_pad = C._explicit_pads(pad, (h, w), (k, k), strides)

  def ref(x, kernel):
    return lax.conv_general_dilated(
      x,
      kernel,
      strides,
      lax_pad,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=HI,
    )

  fast = lambda x, kernel: C.conv2d(x, kernel, strides, pad)
  fast_cm = lambda x, kernel: C.to_channel_last(
    C.conv2d_cm(C.to_channel_major(x), kernel, strides, pad)
  )
  if jit:
    fast, fast_cm = jax.jit(fast), jax.jit(fast_cm)
  y0, g0 = value_and_grads(ref, x, kernel)
  for f in (fast, fast_cm):
    y1, g1 = value_and_grads(f, x, kernel)
    assert y1.shape == y0.shape
    assert rel_err(y1, y0) < 2e-6
    assert rel_err(g1[0], g0[0]) < 2e-6  # input gradient (col2im)
    assert rel_err(g1[1], g0[1]) < 2e-6  # kernel gradient (one GEMM)


@pytest.mark.parametrize(
  "window,strides,padding",
  [
    ((2, 2), (2, 2), "VALID"),  # tiling windows (reshape path)
    ((3, 3), (3, 3), "VALID"),
    ((3, 3), (1, 1), "SAME"),  # overlapping windows (views path)
    ((3, 3), (2, 2), "SAME"),
    ((2, 3), (1, 2), "VALID"),
    ((2, 2), (2, 2), "SAME"),  # odd size: padded with -inf
  ],
)
@pytest.mark.parametrize("batch", [1, 10])
def test_max_pool_equals_reduce_window(window, strides, padding, batch):
  rng = np.random.default_rng(1)
  x = rng.standard_normal((batch, 9, 12, 5)).astype(np.float32)
  x[0, 0, 0, 0] = x[0, 0, 1, 0]  # a tie inside a window
  x[0, 3:6, 3:6, 1] = 0.0  # windows of equal values (as after a ReLU)
  x = jnp.asarray(x)

  def ref(x):
    return lax.reduce_window(
      x, -jnp.inf, lax.max, (1, *window, 1), (1, *strides, 1), padding
    )

  fast = lambda x: C.max_pool(x, window, strides, padding)
  fast_cm = lambda x: C.to_channel_last(
    C.max_pool_cm(C.to_channel_major(x), window, strides, padding)
  )
  if batch > 1:  # every window geometry runs eagerly (batch 1) and jitted
    ref, fast, fast_cm = jax.jit(ref), jax.jit(fast), jax.jit(fast_cm)
  y0, (g0,) = value_and_grads(ref, x)
  y1, (g1,) = value_and_grads(fast, x)
  y2, (g2,) = value_and_grads(fast_cm, x)
  for y, g in ((y1, g1), (y2, g2)):
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y0))
    # the gradient goes to the first maximum of each window, as XLA's
    np.testing.assert_allclose(np.asarray(g), np.asarray(g0), atol=1e-6)


def test_dense_cm_gradients_equal_autodiff():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((300, 10)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((300, 7)), jnp.float32)
  y0, g0 = value_and_grads(lambda x, k: jnp.dot(x.T, k, precision=HI), x, k)
  y1, g1 = value_and_grads(C.dense_cm, x, k)
  assert rel_err(y1, y0) < 1e-6
  assert rel_err(g1[0], g0[0]) < 1e-6 and rel_err(g1[1], g0[1]) < 1e-6


def test_conv_drop_ins_and_fallback():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((2, 9, 9, 4)), jnp.float32)
  plain = nn.Conv(6, (3, 3), strides=2, padding="SAME")
  fast = C.Conv(6, (3, 3), strides=2, padding="SAME")
  params = plain.init(jax.random.PRNGKey(0), x)
  assert jax.tree.structure(fast.init(jax.random.PRNGKey(0), x)) == (
    jax.tree.structure(params)
  )
  y0, g0 = value_and_grads(lambda p: plain.apply(p, x), params)
  y1, g1 = value_and_grads(lambda p: fast.apply(p, x), params)
  assert rel_err(y1, y0) < 2e-6
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    assert rel_err(a, b) < 2e-6
  # dilation and groups are not on the GEMM path: lax computes them
  for kw, c_in in (
    (dict(rhs_dilation=(2, 2)), 4),
    (dict(feature_group_count=2), 2),
  ):
    k = jnp.asarray(rng.standard_normal((3, 3, c_in, 4)), jnp.float32)
    dn = ("NHWC", "HWIO", "NHWC")
    got = C.conv_general_dilated(
      x, k, (1, 1), "SAME", dimension_numbers=dn, **kw
    )
    want = lax.conv_general_dilated(
      x, k, (1, 1), "SAME", dimension_numbers=dn, **kw
    )
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_from_flax_runs_nn_conv_on_the_gemm_path():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(8, (3, 3))(x))
      x = fl.models.max_pool(x, (2, 2), (2, 2))
      return nn.Dense(3)(x.reshape(x.shape[0], -1))

  batch = {
    "x": jnp.asarray(np.random.default_rng(4).standard_normal((4, 8, 8, 2))),
    "y": jnp.array([0, 1, 2, 0]),
  }
  mask = jnp.ones(4, bool)
  grads, prims = [], []
  for fast in (True, False):
    model = fl.models.from_flax(
      Net(), jnp.zeros((1, 8, 8, 2)), num_classes=3, fast_layers=fast
    )
    # jitted: one program each, not an op-by-op eager init and gradient
    # (eager conv2d is test_conv2d_equals_lax_conv's)
    params = jax.jit(model.init)(jax.random.PRNGKey(0))
    grad = jax.grad(lambda p: model.batch_loss(p, batch, mask)[0])
    grads.append(jax.jit(grad)(params))
    prims.append(str(jax.make_jaxpr(grad)(params)))
  assert "conv_general_dilated" not in prims[0]
  assert "conv_general_dilated" in prims[1]
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    assert rel_err(a, b) < 2e-6


@pytest.mark.parametrize(
  "build,shape,count",
  [
    (lambda f: fl.models.simple_cnn(fast=f), (32, 32, 3), 1_626_442),
    (lambda f: fl.models.cnn(fast=f), (28, 28, 1), 1_663_370),
    (lambda f: fl.models.resnet18_gn(fast=f), (24, 24, 3), 11_227_812),
  ],
)
def test_cnn_models_fast_equals_plain(build, shape, count):
  fast, plain = build(True), build(False)
  # init traced (not run: an eager init of these models takes far longer
  # than the gradients), then random parameters of its shapes
  shapes = jax.eval_shape(fast.init, jax.random.PRNGKey(0))
  assert jax.eval_shape(plain.init, jax.random.PRNGKey(0)) == shapes
  assert fl.models.num_params(shapes) == count
  rng = np.random.default_rng(5)
  params = jax.tree.map(
    lambda s: jnp.asarray(
      rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1])),
      jnp.float32,
    ),
    shapes,
  )
  batch = {
    "x": jnp.asarray(rng.standard_normal((3,) + shape), jnp.float32),
    "y": jnp.array([0, 1, 2]),
  }
  mask = jnp.ones(3, bool)
  g = [
    jax.jit(
      jax.grad(lambda p, m=m: m.batch_loss(p, batch, mask, train=False)[0])
    )(params)
    for m in (fast, plain)
  ]
  for a, b in zip(jax.tree.leaves(g[0]), jax.tree.leaves(g[1])):
    assert rel_err(a, b) < 1e-5


def test_cnn_fedavg_fast_equals_plain_after_3_rounds(cpu_mesh):
  rng = np.random.default_rng(6)
  n, e = 8, 12
  ds = fl.FederatedDataset(
    features={
      "x": rng.standard_normal((n * e, 10, 10, 2)).astype(np.float32),
      "y": rng.integers(0, 3, n * e).astype(np.int32),
    },
    offsets=[i * e for i in range(n)],
    counts=[e] * n,
  )
  inits, finals = [], []
  for fast in (True, False):
    model = fl.models.cnn((10, 10, 2), 3, channels=(4, 8), hidden=16, fast=fast)
    engine = fl.Engine(
      fl.fed_avg(model, optax.sgd(0.05), optax.sgd(1.0)),
      fl.RoundConfig(4, fl.LocalWork(batch_size=4, num_epochs=1)),
      mesh=cpu_mesh,
    )
    data = engine.put_data(ds, model=model)
    inits.append(jax.jit(model.init)(jax.random.PRNGKey(0)))  # not op by op
    state = engine.init(inits[-1], seed=0)
    state, _ = engine.run(state, data, 3)
    finals.append(state.server.params)
  for a, b in zip(jax.tree.leaves(inits[0]), jax.tree.leaves(inits[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  moved = rel_err(finals[0]["Conv_0"]["kernel"], inits[0]["Conv_0"]["kernel"])
  assert moved > 1e-3  # the runs trained
  for a, b in zip(jax.tree.leaves(finals[0]), jax.tree.leaves(finals[1])):
    assert rel_err(a, b) < 1e-5


def test_conv_errors_name_the_problem():
  x = jnp.zeros((3, 8, 8, 2))
  with pytest.raises(ValueError, match=r"has C=4 but x \[C, H, W, N\] has C=3"):
    C.conv2d_cm(x, jnp.zeros((3, 3, 4, 5)))
  with pytest.raises(
    ValueError, match="padding must be 'SAME', 'VALID'.*'FULL'"
  ):
    C.conv2d(jnp.zeros((1, 8, 8, 2)), jnp.zeros((3, 3, 2, 5)), 1, "FULL")
  with pytest.raises(
    ValueError, match=r"strides must be 2 positive ints, got \(0, 1\)"
  ):
    C.conv2d(jnp.zeros((1, 8, 8, 2)), jnp.zeros((3, 3, 2, 5)), (0, 1))
  with pytest.raises(ValueError, match=r"9x9 window .* spatial size \(8, 8\)"):
    C.conv2d(jnp.zeros((1, 8, 8, 2)), jnp.zeros((9, 9, 2, 5)))
  with pytest.raises(
    ValueError, match=r"max_pool expects \[..., H, W, C\], got \(4, 4\)"
  ):
    C.max_pool(jnp.zeros((4, 4)))


def test_lstm_layer_equals_autodiff_of_flax_cell():
  """:func:`lstm_layer`'s VJP (weight gradients as one GEMM over all time
  steps) against autodiff of flax's OptimizedLSTMCell, on a char-LSTM with
  two layers and gradients flowing from every time step."""
  fast = fl.models.char_lstm(11, 9, embed_dim=4, hidden=(6, 5))
  plain = fl.models.char_lstm(11, 9, embed_dim=4, hidden=(6, 5), fast=False)
  params = jax.jit(fast.init)(jax.random.PRNGKey(1))
  # same parameter tree and initial values (same initializers and paths)
  ref_params = jax.jit(plain.init)(jax.random.PRNGKey(1))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  rng = np.random.default_rng(7)
  for b in (1, 10):
    batch = {
      "x": jnp.asarray(rng.integers(0, 11, (b, 9))),
      "y": jnp.asarray(rng.integers(0, 11, b)),
    }
    mask = jnp.ones(b, bool)
    g = [
      jax.jit(jax.grad(lambda p, m=m: m.batch_loss(p, batch, mask)[0]))(params)
      for m in (fast, plain)
    ]
    for a, c in zip(jax.tree.leaves(g[0]), jax.tree.leaves(g[1])):
      assert rel_err(a, c) < 1e-5
  # every output step carries gradient (not only the last)
  x = jnp.asarray(rng.standard_normal((7, 3, 4)), jnp.float32)
  w_x = jnp.asarray(rng.standard_normal((4, 20)) * 0.3, jnp.float32)
  w_h = jnp.asarray(rng.standard_normal((5, 20)) * 0.3, jnp.float32)
  bias = jnp.asarray(rng.standard_normal(20) * 0.1, jnp.float32)
  from fedjax_lite.models.lstm import _lstm_forward, lstm_layer

  y0, g0 = value_and_grads(
    jax.jit(lambda *a: _lstm_forward(*a)[0]), x, w_x, w_h, bias
  )
  y1, g1 = value_and_grads(jax.jit(lstm_layer), x, w_x, w_h, bias)
  assert rel_err(y1, y0) < 1e-6
  for a, c in zip(g1, g0):
    assert rel_err(a, c) < 1e-5


def test_dropout_mask_is_exact_bernoulli_from_random_bits():
  rng = jax.random.PRNGKey(3)
  shape = (5, 7, 9)  # 315 entries: not a multiple of 4 or 2
  for keep, bits in ((0.75, 8), (0.5, 8), (1 - 2**-12, 16)):
    mask = np.asarray(C.dropout_mask(rng, keep, shape))
    words = -(-315 * bits // 32)
    raw = np.asarray(jax.random.bits(rng, (words,), jnp.uint32))
    small = raw.view(np.uint8 if bits == 8 else np.uint16)[:315]
    np.testing.assert_array_equal(mask, (small < keep * 2**bits).reshape(shape))
  # rates that are no multiple of 2^-16: jax.random.bernoulli itself
  np.testing.assert_array_equal(
    np.asarray(C.dropout_mask(rng, 0.3, shape)),
    np.asarray(jax.random.bernoulli(rng, 0.3, shape)),
  )
  big = np.asarray(C.dropout_mask(rng, 0.75, (200_000,)))
  assert abs(big.mean() - 0.75) < 4 * np.sqrt(0.75 * 0.25 / 200_000)
  x = jnp.ones((4, 6))
  y = C.Dropout(0.25).apply({}, x, rngs={"dropout": rng})
  assert set(np.unique(np.asarray(y))) <= {0.0, np.float32(1 / 0.75)}
  with pytest.raises(ValueError, match=r"rate must be in \[0, 1\), got 1.5"):
    C.Dropout(1.5).apply({}, x, rngs={"dropout": rng})
