"""Float64 numpy references of the published update rules of the algorithm
family (FedProx, FedOpt, SCAFFOLD, FedNova, Mime/MimeLite, q-FedAvg, Ditto).

Parameters are lists of float64 arrays; ``grad(w, x, y)`` returns the list of
gradients of the mean loss. Local training walks a client's examples in order
(``LocalWork(shuffle=False)``): ``epochs`` passes in batches of ``batch_size``
(``None`` = full batch), the last batch of a pass possibly short.
"""

import numpy as np


def as64(ws):
  return [np.array(w, np.float64) for w in ws]


def batches(n, batch_size, epochs):
  b = n if batch_size is None else batch_size
  for _ in range(epochs):
    for s in range(0, n, b):
      yield slice(s, s + b)


def local_sgd(
  grad,
  w,
  x,
  y,
  lr,
  epochs,
  batch_size=None,
  *,
  mu=0.0,
  center=None,
  momentum=0.0,
  correction=None,
):
  """SGD (optionally heavy-ball momentum ``m <- g + rho m``) on
  ``F(w) + mu/2 ||w - center||^2 + <correction, w>``.

  ``correction`` may be a list of arrays (constant) or a function
  ``(x_batch, y_batch) -> list`` added to each step's gradient.
  Returns ``(w, number of steps)``.
  """
  w = as64(w)
  m = [np.zeros_like(a) for a in w]
  steps = 0
  for sl in batches(x.shape[0], batch_size, epochs):
    g = grad(w, x[sl], y[sl])
    if mu:
      g = [gi + mu * (wi - ci) for gi, wi, ci in zip(g, w, center)]
    if correction is not None:
      corr = correction(x[sl], y[sl]) if callable(correction) else correction
      g = [gi + ci for gi, ci in zip(g, corr)]
    if momentum:
      m = [gi + momentum * mi for gi, mi in zip(g, m)]
      g = m
    w = [wi - lr * gi for wi, gi in zip(w, g)]
    steps += 1
  return w, steps


def weighted_mean(vectors, weights):
  total = float(sum(weights))
  return [
    sum(wt * v[i] for v, wt in zip(vectors, weights)) / total
    for i in range(len(vectors[0]))
  ]


def sub(a, b):
  return [x - y for x, y in zip(a, b)]


def sq_norm(a):
  return float(sum(np.sum(x * x) for x in a))


# ----------------------------------------------------------------- FedProx
def fedprox_round(
  grad,
  w,
  clients,
  lr,
  epochs,
  batch_size=None,
  mu=0.0,
  client_epochs=None,
  dropped=None,
):
  """w_{t+1} = sum_k n_k w^k / sum_k n_k over the clients not dropped; client
  k runs ``client_epochs[k]`` epochs of prox-SGD (Li et al., arXiv:1812.06127).
  """
  sols, ns = [], []
  for k, c in enumerate(clients):
    if dropped is not None and dropped[k]:
      continue
    e = epochs if client_epochs is None else int(client_epochs[k])
    wk, _ = local_sgd(
      grad,
      w,
      c["x"].astype(np.float64),
      c["y"],
      lr,
      e,
      batch_size,
      mu=mu,
      center=w,
    )
    sols.append(wk)
    ns.append(c["x"].shape[0])
  return weighted_mean(sols, ns)


# ------------------------------------------------------------------ FedOpt
class FedOpt:
  """Reddi et al. (arXiv:2003.00295) Algorithm 2, with Delta = w_t - avg."""

  def __init__(self, rule, lr, b1=0.9, b2=0.99, tau=1e-3):
    self.rule, self.lr, self.b1, self.b2, self.tau = rule, lr, b1, b2, tau
    self.m = self.v = None

  def step(self, w, delta):
    if self.m is None:
      self.m = [np.zeros_like(d) for d in delta]
      self.v = [np.full_like(d, self.tau**2) for d in delta]
    out = []
    for i, d in enumerate(delta):
      self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * d
      if self.rule == "adagrad":
        self.v[i] = self.v[i] + d * d
      elif self.rule == "adam":
        self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * d * d
      else:
        self.v[i] = self.v[i] - (1 - self.b2) * d * d * np.sign(
          self.v[i] - d * d
        )
      out.append(w[i] - self.lr * self.m[i] / (np.sqrt(self.v[i]) + self.tau))
    return out


class ServerMomentum:
  """FedAvgM: v = beta v + Delta; w -= lr v."""

  def __init__(self, lr, beta):
    self.lr, self.beta, self.v = lr, beta, None

  def step(self, w, delta):
    if self.v is None:
      self.v = [np.zeros_like(d) for d in delta]
    self.v = [self.beta * v + d for v, d in zip(self.v, delta)]
    return [a - self.lr * v for a, v in zip(w, self.v)]


# ---------------------------------------------------------------- SCAFFOLD
def scaffold_round(
  grad, x, c, cis, clients, ids, lr_l, lr_g, epochs, batch_size, num_clients
):
  """Option II (Karimireddy et al., arXiv:1910.06378). Mutates ``cis``."""
  dys, dcs = [], []
  for i in ids:
    cl = clients[i]
    corr = sub(c, cis[i])
    y, k = local_sgd(
      grad,
      x,
      cl["x"].astype(np.float64),
      cl["y"],
      lr_l,
      epochs,
      batch_size,
      correction=corr,
    )
    ci_new = [
      a - b + (xx - yy) / (k * lr_l) for a, b, xx, yy in zip(cis[i], c, x, y)
    ]
    dys.append(sub(y, x))
    dcs.append(sub(ci_new, cis[i]))
    cis[i] = ci_new
  s = len(ids)
  x = [xx + lr_g * sum(d[j] for d in dys) / s for j, xx in enumerate(x)]
  c = [cc + sum(d[j] for d in dcs) / num_clients for j, cc in enumerate(c)]
  return x, c


# ----------------------------------------------------------------- FedNova
def a_norm_closed_form(tau, lr, momentum=0.0, mu=0.0):
  """||a||_1 of Wang et al. (arXiv:2007.07481) for SGD / momentum / prox."""
  if momentum == 0 and mu == 0:
    return float(tau)
  if mu == 0:
    r = momentum
    return (tau - r * (1 - r**tau) / (1 - r)) / (1 - r)
  if momentum == 0:
    a = lr * mu
    return (1 - (1 - a) ** tau) / a
  raise ValueError("no closed form; use a_norm_impulse")


def a_norm_impulse(tau, lr, momentum, mu):
  """||a||_1 as the sum over s of the coefficient of g_s in -(w_tau - w_0)/lr:
  the response of the (linear) local solver to a unit gradient at step s
  alone, for each s."""
  total = 0.0
  for s in range(tau):
    e = m = 0.0
    for t in range(tau):
      g = (1.0 if t == s else 0.0) + mu * e
      m = g + momentum * m
      e = e - lr * m
    total += -e / lr
  return total


def fednova_round(
  grad, w, clients, lr, epochs, batch_size, momentum=0.0, mu=0.0
):
  """w_{t+1} = w_t - tau_eff sum_i p_i (w_t - w^i) / ||a_i||_1."""
  ds, norms, ns = [], [], []
  for cl in clients:
    wi, tau = local_sgd(
      grad,
      w,
      cl["x"].astype(np.float64),
      cl["y"],
      lr,
      epochs,
      batch_size,
      mu=mu,
      center=w,
      momentum=momentum,
    )
    a = (
      a_norm_closed_form(tau, lr, momentum, mu)
      if momentum == 0 or mu == 0
      else a_norm_impulse(tau, lr, momentum, mu)
    )
    ds.append([d / a for d in sub(w, wi)])
    norms.append(a)
    ns.append(cl["x"].shape[0])
  p = np.asarray(ns, np.float64) / sum(ns)
  tau_eff = float(np.dot(p, norms))
  d = weighted_mean(ds, ns)
  return [a - tau_eff * b for a, b in zip(w, d)]


# -------------------------------------------------------------------- Mime
def mime_round(
  grad, x, m, clients, lr, momentum, lr_g, epochs, batch_size, corrected
):
  """Karimireddy et al. (arXiv:2008.03606) Algorithm 1 with base optimizer
  SGD + heavy-ball momentum: U(g, m) = lr (g + rho m), V(g, m) = g + rho m.
  Returns the new ``(x, m)``."""
  ns = [cl["x"].shape[0] for cl in clients]
  full = [grad(x, cl["x"].astype(np.float64), cl["y"]) for cl in clients]
  c = weighted_mean(full, ns)
  ys = []
  for cl in clients:
    xs = cl["x"].astype(np.float64)
    y = as64(x)
    for sl in batches(xs.shape[0], batch_size, epochs):
      g = grad(y, xs[sl], cl["y"][sl])
      if corrected:
        gx = grad(x, xs[sl], cl["y"][sl])
        g = [a - b + cc for a, b, cc in zip(g, gx, c)]
      y = [yy - lr * (gg + momentum * mm) for yy, gg, mm in zip(y, g, m)]
    ys.append(y)
  delta = weighted_mean([sub(x, y) for y in ys], ns)
  m = [cc + momentum * mm for cc, mm in zip(c, m)]
  return [a - lr_g * d for a, d in zip(x, delta)], m


# ---------------------------------------------------------------- q-FedAvg
def qfedavg_round(loss_grad, w, clients, lr, epochs, batch_size, q):
  """Li et al. (arXiv:1905.10497) Algorithm 3; ``loss_grad(w, x, y) ->
  (loss, grads)``."""
  L = 1.0 / lr
  deltas, hs = [], []
  for cl in clients:
    xs = cl["x"].astype(np.float64)
    f = loss_grad(w, xs, cl["y"])[0] + 1e-10
    wk, _ = local_sgd(
      lambda p, a, b: loss_grad(p, a, b)[1],
      w,
      xs,
      cl["y"],
      lr,
      epochs,
      batch_size,
    )
    dw = [L * d for d in sub(w, wk)]
    deltas.append([f**q * d for d in dw])
    hs.append(q * f ** (q - 1) * sq_norm(dw) + L * f**q)
  h = sum(hs)
  return [a - sum(d[i] for d in deltas) / h for i, a in enumerate(w)]


# ------------------------------------------------------------------- Ditto
def ditto_round(
  grad, w, personal, clients, ids, lr, lr_p, lam, epochs, batch_size
):
  """Li et al. (arXiv:2012.04221) Algorithm 1: FedAvg for w; personal models
  of the sampled clients take prox-SGD steps centred at w_t. Mutates
  ``personal``."""
  sols, ns = [], []
  for i in ids:
    cl = clients[i]
    xs = cl["x"].astype(np.float64)
    wk, _ = local_sgd(grad, w, xs, cl["y"], lr, epochs, batch_size)
    sols.append(wk)
    ns.append(xs.shape[0])
    personal[i], _ = local_sgd(
      grad, personal[i], xs, cl["y"], lr_p, epochs, batch_size, mu=lam, center=w
    )
  return weighted_mean(sols, ns)
