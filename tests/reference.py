"""Obviously-correct float64 numpy references for the engine's math."""

import numpy as np


def softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def logreg_loss_grad(w, b, x, y):
  """Mean softmax cross-entropy of x @ w + b and its gradients."""
  n = x.shape[0]
  p = softmax(x @ w + b)
  loss = -np.log(p[np.arange(n), y]).mean()
  d = p.copy()
  d[np.arange(n), y] -= 1.0
  d /= n
  return loss, x.T @ d, d.sum(0)


def logreg_clients(sizes, seed, d, k):
  """Clients of ``n`` standard-normal examples ``x [n, d]`` (float32) with
  uniform labels in ``[0, k)``, one per size, drawn in order from ``seed``."""
  r = np.random.default_rng(seed)
  return [
    {
      "x": r.standard_normal((n, d)).astype(np.float32),
      "y": r.integers(0, k, n).astype(np.int32),
    }
    for n in sizes
  ]


def logreg_params(d, k, seed=2):
  """Flax-style params of ``logistic_regression(d, k)`` drawn from ``seed``."""
  r = np.random.default_rng(seed)
  return {
    "Dense_0": {
      "kernel": np.asarray(r.standard_normal((d, k)) * 0.5, np.float32),
      "bias": np.asarray(r.standard_normal(k) * 0.1, np.float32),
    }
  }


def logreg_list(p):
  """``[kernel, bias]`` of logistic-regression params in float64."""
  return [
    np.asarray(p["Dense_0"]["kernel"], np.float64),
    np.asarray(p["Dense_0"]["bias"], np.float64),
  ]


def logreg_grad(ws, x, y):
  """Gradients ``[d kernel, d bias]`` of the mean loss at ``ws``."""
  return list(logreg_loss_grad(ws[0], ws[1], x, y)[1:])


def mlp_loss_grad(params, x, y):
  """One-hidden-layer ReLU MLP: params = (w1, b1, w2, b2)."""
  w1, b1, w2, b2 = params
  n = x.shape[0]
  h_pre = x @ w1 + b1
  h = np.maximum(h_pre, 0.0)
  p = softmax(h @ w2 + b2)
  loss = -np.log(p[np.arange(n), y]).mean()
  d = p.copy()
  d[np.arange(n), y] -= 1.0
  d /= n
  gw2, gb2 = h.T @ d, d.sum(0)
  dh = (d @ w2.T) * (h_pre > 0)
  return loss, (x.T @ dh, dh.sum(0), gw2, gb2)


def local_gd(grad_fn, params, x, y, lr, epochs, batch_size=None):
  """Plain SGD over in-order batches (no shuffling), last batch partial.

  grad_fn(params, x, y) returns the list of gradients.
  """
  params = [np.array(p, np.float64) for p in params]
  n = x.shape[0]
  b = n if batch_size is None else batch_size
  for _ in range(epochs):
    for s in range(0, n, b):
      grads = grad_fn(params, x[s : s + b], y[s : s + b])
      params = [p - lr * g for p, g in zip(params, grads)]
  return params


def fedavg_round(grad_fn, params, clients, lr, epochs, batch_size=None):
  """w_{t+1} = sum_k (n_k / n) w^k_{t+1}."""
  n = sum(c["x"].shape[0] for c in clients)
  new = [np.zeros_like(np.asarray(p, np.float64)) for p in params]
  for c in clients:
    wk = local_gd(
      grad_fn, params, c["x"].astype(np.float64), c["y"], lr, epochs, batch_size
    )
    for i, p in enumerate(wk):
      new[i] += c["x"].shape[0] / n * p
  return new


class Adam:
  """optax.adam on the pseudo-gradient, by hand."""

  def __init__(self, lr, b1=0.9, b2=0.999, eps=1e-8):
    self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps
    self.m = self.v = None
    self.t = 0

  def step(self, params, grads):
    if self.m is None:
      self.m = [np.zeros_like(g) for g in grads]
      self.v = [np.zeros_like(g) for g in grads]
    self.t += 1
    out = []
    for i, (p, g) in enumerate(zip(params, grads)):
      self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * g
      self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * g * g
      mh = self.m[i] / (1 - self.b1**self.t)
      vh = self.v[i] / (1 - self.b2**self.t)
      out.append(p - self.lr * mh / (np.sqrt(vh) + self.eps))
    return out
