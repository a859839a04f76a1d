"""SplitNN: protocol gradients equal the centralized network's; noise; bytes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_lite as fl
from fedjax_lite import vertical as fv
from fedjax_lite.vertical import split_nn


def _setup(n=24, dims=(3, 4), cut=(2, 3), classes=3, seed=0):
  rng = np.random.default_rng(seed)
  xs = tuple(rng.normal(size=(n, d)).astype(np.float32) for d in dims)
  y = rng.integers(0, classes, n).astype(np.int32)
  data = fv.AlignedData(
    xs=xs, y=y, ids=np.arange(n), names=tuple(f"p{k}" for k in range(len(dims)))
  )
  bottoms = [fl.models.mlp(d, c, hidden=()) for d, c in zip(dims, cut)]
  top = fl.models.mlp(sum(cut), classes, hidden=(5,))
  return data, bottoms, top


def _numpy_grads(params, xs, y):
  """float64 reference: bottoms h_k = x_k W_k + b_k, top relu MLP, mean CE."""

  def f(a):
    return np.asarray(a, np.float64)

  hs = [
    f(x) @ f(p["Dense_0"]["kernel"]) + f(p["Dense_0"]["bias"])
    for p, x in zip(params[0], xs)
  ]
  h = np.concatenate(hs, 1)
  t = params[1]
  a = h @ f(t["Dense_0"]["kernel"]) + f(t["Dense_0"]["bias"])
  r = np.maximum(a, 0)
  logits = r @ f(t["Dense_1"]["kernel"]) + f(t["Dense_1"]["bias"])
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  n = len(y)
  dl = (p - np.eye(logits.shape[1])[y]) / n
  g_top = {"Dense_1": {"kernel": r.T @ dl, "bias": dl.sum(0)}}
  da = (dl @ f(t["Dense_1"]["kernel"]).T) * (a > 0)
  g_top["Dense_0"] = {"kernel": h.T @ da, "bias": da.sum(0)}
  dh = da @ f(t["Dense_0"]["kernel"]).T
  g_b, start = [], 0
  for x, hk in zip(xs, hs):
    d = dh[:, start : start + hk.shape[1]]
    start += hk.shape[1]
    g_b.append({"Dense_0": {"kernel": f(x).T @ d, "bias": d.sum(0)}})
  loss = -np.mean(np.log(p[np.arange(n), y]))
  return loss, (tuple(g_b), g_top)


def test_split_gradients_equal_centralized():
  data, bottoms, top = _setup()
  proc = fv.build_split_nn_process(data, bottoms, top, optax.sgd(0.1))
  params = proc.initialize(0).params

  def fn(p):
    return split_nn.split_grads(
      bottoms, top, p, data.xs, data.y, jax.random.PRNGKey(0)
    )[:3]

  loss, _, grads = jax.jit(fn)(params)
  # Centralized network on the joined features, one jax.grad.
  joined = jnp.asarray(data.joined())
  cols = np.cumsum([0, *data.feature_dims])

  def central_loss(p):
    xs = [joined[:, a:b] for a, b in zip(cols[:-1], cols[1:])]
    logits = split_nn.forward(bottoms, top, p, xs)
    return jnp.mean(top.loss(logits, jnp.asarray(data.y)))

  c_loss, c_grads = jax.value_and_grad(central_loss)(params)
  np.testing.assert_allclose(loss, c_loss, rtol=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
    grads,
    c_grads,
  )
  ref_loss, ref_grads = _numpy_grads(params, data.xs, data.y)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
    grads,
    ref_grads,
  )


def test_noise_only_on_host_cut_gradients():
  data, bottoms, top = _setup()
  proc = fv.build_split_nn_process(data, bottoms, top, optax.sgd(0.1))
  params = proc.initialize(0).params
  _, _, exact, stats = split_nn.split_grads(
    bottoms, top, params, data.xs, data.y, jax.random.PRNGKey(0)
  )
  _, _, noisy, _ = split_nn.split_grads(
    bottoms,
    top,
    params,
    data.xs,
    data.y,
    jax.random.PRNGKey(0),
    grad_noise_std=0.5,
  )
  jax.tree.map(np.testing.assert_array_equal, exact[1], noisy[1])  # top
  jax.tree.map(
    np.testing.assert_array_equal, exact[0][0], noisy[0][0]
  )  # guest's own bottom: exact
  diff = noisy[0][1]["Dense_0"]["kernel"] - exact[0][1]["Dense_0"]["kernel"]
  assert np.abs(diff).max() > 1e-3  # host bottom got noisy delta
  assert stats["cut_bytes"] == 2 * 4 * 24 * 3  # host's h and delta, f32
  assert float(stats["cut_grad_rms"]) > 0


def test_epoch_runs_and_reports_bytes():
  data, bottoms, top = _setup(n=32)
  proc = fv.build_split_nn_process(
    data, bottoms, top, optax.adam(0.05), batch_size=8
  )
  state = proc.initialize(0)
  first = None
  for _ in range(6):
    state, m = proc.next(state)
    first = first or m
  per_step = 2 * 4 * 8 * 3  # host's h and delta: 8 rows x 3, f32
  assert m["bytes_per_step"] == per_step and m["bytes"] == 4 * per_step
  assert m["loss"] < first["loss"]
  ev = proc.evaluate(state, data)
  assert set(ev) == {"loss", "accuracy"}


def test_split_nn_errors():
  data, bottoms, top = _setup()
  with pytest.raises(ValueError, match="one per party"):
    fv.build_split_nn_process(data, bottoms[:1], top, optax.sgd(0.1))
  bad = fv.AlignedData(data.xs, data.y + 5, data.ids, data.names)
  with pytest.raises(ValueError, match="range over"):
    fv.build_split_nn_process(bad, bottoms, top, optax.sgd(0.1))
