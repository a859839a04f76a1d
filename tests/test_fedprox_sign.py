r"""FedProx's proximal term pulls a client towards the server weights.

Li et al. 2020 (arXiv:1812.06127): client ``k`` minimises

.. math:: h_k(w; w_t) = F_k(w) + \frac{\mu}{2} \lVert w - w_t \rVert^2,
          \qquad \nabla h_k = \nabla F_k(w) + \mu (w - w_t),

so a gradient step on the proximal part alone shrinks ``||w - w_t||`` by the
factor ``1 - lr mu``. TensorFlow Federated 0.87's proximal client work adds
``proximal_strength * (w_t - w)`` to the gradient instead (the opposite sign,
which pushes clients away from ``w_t``; docs/migrating.md, section 4.2).
These tests pin fedjax_lite to the paper's sign, with a data loss of zero
gradient (only the proximal term acts) and against a float64 numpy reference
of the paper's local steps on logistic regression.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_lite as fl
from fedjax_lite.data.batching import ClientData

D, K = 4, 3
MU, LR = 0.5, 0.3


def random_params(r, scale=1.0):
  return {
    "Dense_0": {
      "kernel": (scale * r.standard_normal((D, K))).astype(np.float32),
      "bias": (scale * r.standard_normal(K)).astype(np.float32),
    }
  }


def flat(params):
  return np.concatenate(
    [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(params)]
  )


def zero_gradient_model() -> fl.Model:
  """Predictions that ignore the params: the data loss has zero gradient."""

  def apply(params, batch, rng=None, train=False):
    del params, rng, train
    return jnp.zeros((batch["x"].shape[0], K), jnp.float32)

  return fl.Model(
    init=lambda rng: random_params(np.random.default_rng(0)),
    apply=apply,
    num_classes=K,
    name="zero_gradient",
  )


def client_data(x, y, batch_size, num_epochs):
  """Unshuffled ``[steps, batch, ...]`` layout with a mask, epoch-major."""
  n = x.shape[0]
  b = n if batch_size is None else batch_size
  spe = -(-n // b)
  pad = spe * b - n
  xs = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
  ys = np.concatenate([y, np.zeros((pad,), y.dtype)])
  mask = np.arange(spe * b) < n
  rep = lambda a: np.tile(
    a.reshape((spe, b) + a.shape[1:]), (num_epochs,) + (1,) * a.ndim
  )
  return ClientData(
    batches={"x": jnp.asarray(rep(xs)), "y": jnp.asarray(rep(ys))},
    mask=jnp.asarray(rep(mask)),
    num_examples=jnp.asarray(n, jnp.int32),
    client_id=jnp.asarray(0, jnp.int32),
    slot=jnp.asarray(0, jnp.int32),
  )


# ------------------------------------------------ the proximal term alone
def test_proximal_gradient_is_mu_times_distance_from_server():
  r = np.random.default_rng(1)
  server, params = random_params(r), random_params(r)
  objective = fl.algorithms.prox_objective(zero_gradient_model(), MU)
  data = client_data(
    r.standard_normal((5, D)).astype(np.float32),
    r.integers(0, K, 5).astype(np.int32),
    None,
    1,
  )
  batch = jax.tree.map(lambda v: v[0], data.batches)
  grads, _ = jax.jit(jax.grad(objective, has_aux=True))(
    params, server, batch, data.mask[0], None
  )
  np.testing.assert_allclose(
    flat(grads), MU * (flat(params) - flat(server)), rtol=1e-6, atol=1e-7
  )


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_local_steps_shrink_distance_to_server_weights(jit):
  """With zero data gradient, S SGD steps scale ``w - w_t`` by
  ``(1 - lr mu)^S``; TFF 0.87's sign would scale it by ``(1 + lr mu)^S``."""
  r = np.random.default_rng(2)
  server, start = random_params(r), random_params(r)
  steps = 3
  objective = fl.algorithms.prox_objective(zero_gradient_model(), MU)
  data = client_data(
    r.standard_normal((6, D)).astype(np.float32),
    r.integers(0, K, 6).astype(np.int32),
    None,
    steps,
  )

  def grad_fn(params, batch, mask, rng):
    return jax.grad(objective, has_aux=True)(params, server, batch, mask, rng)

  def train(params, data):
    return fl.algorithms.local_train(
      grad_fn, optax.sgd(LR), params, data, jax.random.PRNGKey(0)
    )

  result = (jax.jit(train) if jit else train)(start, data)
  assert int(result.num_steps) == steps
  d0 = np.linalg.norm(flat(start) - flat(server))
  d = np.linalg.norm(flat(result.params) - flat(server))
  np.testing.assert_allclose(d, (1 - LR * MU) ** steps * d0, rtol=1e-5)
  assert d < d0
  # The same steps with TFF 0.87's term, proximal_strength * (w_t - w), in
  # float64: the client drifts away from w_t.
  w, wt = flat(start), flat(server)
  for _ in range(steps):
    w = w - LR * (0.0 + MU * (wt - w))
  assert np.linalg.norm(w - wt) > d0 > d
  # And the direction is along w - w_t: the client moved straight towards
  # the server weights.
  np.testing.assert_allclose(
    flat(result.params) - flat(server),
    (1 - LR * MU) ** steps * (flat(start) - flat(server)),
    rtol=1e-5,
    atol=1e-6,
  )


# --------------------------------- fed_prox's client update vs the paper
def paper_local_steps(x, y, w, b, w_t, b_t, mu, lr, batch_size, epochs):
  """float64 logistic regression, unshuffled minibatches (last one short):
  ``w <- w - lr (grad F_k(w; batch) + mu (w - w_t))``."""
  n = x.shape[0]
  bsz = n if batch_size is None else batch_size
  for _ in range(epochs):
    for s in range(0, n, bsz):
      xb, yb = x[s : s + bsz], y[s : s + bsz]
      z = xb @ w + b
      p = np.exp(z - z.max(1, keepdims=True))
      p /= p.sum(1, keepdims=True)
      p[np.arange(len(yb)), yb] -= 1.0
      gw, gb = xb.T @ p / len(yb), p.mean(0)
      w, b = w - lr * (gw + mu * (w - w_t)), b - lr * (gb + mu * (b - b_t))
  return w, b


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_fed_prox_client_update_matches_paper_rule(jit):
  r = np.random.default_rng(3)
  n, batch_size, epochs = 7, 4, 2  # 4 steps, the 2nd and 4th short
  x = r.standard_normal((n, D)).astype(np.float32)
  y = r.integers(0, K, n).astype(np.int32)
  server = random_params(r, scale=0.5)
  model = fl.models.logistic_regression(D, K)
  algorithm = fl.algorithms.fed_prox(model, optax.sgd(LR), mu=MU)
  data = client_data(x, y, batch_size, epochs)
  update = algorithm.client_update
  out = (jax.jit(update) if jit else update)(
    server, None, data, jax.random.PRNGKey(0)
  )

  w_t = server["Dense_0"]["kernel"].astype(np.float64)
  b_t = server["Dense_0"]["bias"].astype(np.float64)
  x64 = x.astype(np.float64)
  w, b = paper_local_steps(
    x64, y, w_t, b_t, w_t, b_t, MU, LR, batch_size, epochs
  )
  got = out.update["Dense_0"]
  # ClientOutput.update is w_t - w_k, weighted by n_k.
  np.testing.assert_allclose(got["kernel"], w_t - w, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(got["bias"], b_t - b, rtol=2e-5, atol=1e-6)
  assert float(out.weight) == n
  # The opposite sign (TFF 0.87's term) gives a clearly different update
  # (here about 77% of the update's norm apart; required: over 10%).
  w_tff, b_tff = paper_local_steps(
    x64, y, w_t, b_t, w_t, b_t, -MU, LR, batch_size, epochs
  )
  gap = np.linalg.norm(
    np.concatenate(
      [(w_t - w_tff - got["kernel"]).ravel(), b_t - b_tff - got["bias"]]
    )
  )
  assert gap > 0.1 * np.linalg.norm(
    np.concatenate([(w_t - w).ravel(), b_t - b])
  )


def test_fed_prox_rejects_negative_mu():
  """The TFF-sign update is not reachable by passing a negative mu."""
  with pytest.raises(ValueError, match="mu must be >= 0"):
    fl.algorithms.fed_prox(
      fl.models.logistic_regression(D, K), optax.sgd(LR), mu=-MU
    )
