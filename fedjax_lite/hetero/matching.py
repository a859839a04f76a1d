r"""Bayesian nonparametric neuron matching (BBP-MAP), on the host.

PFNM (Yurochkin et al., ICML 2019, "Bayesian Nonparametric Federated Learning
of Neural Networks", arXiv:1905.12022) as used layer by layer by FedMA (Wang
et al., ICLR 2020, "Federated Learning with Matched Averaging",
arXiv:2002.06440).

Model. Every global neuron ("atom") ``theta_i ~ N(mu_0, diag(s_0^2))``; a
client's neuron ``v`` (its incoming weights and bias, as a vector of ``D``
numbers) matched to ``i`` is ``v ~ N(theta_i, diag(s^2))``; which atoms a
client holds follows a Beta-Bernoulli process with mass ``gamma_0``. For an
atom holding ``n`` local neurons summing to ``S``, twice its log marginal
likelihood relative to an empty atom is (per dimension, summed over ``D``)

.. math:: F(n, S) = \sum_d \frac{(s_0^2/s^2) S_d^2 + 2 \mu_{0,d} S_d
          - n \mu_{0,d}^2}{s^2 + n s_0^2} - \log(s^2 + n s_0^2) + \log s^2 .

Matching client ``j``'s ``L_j`` neurons against the ``G`` atoms built from the
other clients (counts ``n_i``, sums ``S_i``) maximises the sum of

.. math:: C_{l i} = F(n_i + 1, S_i + v_l) - F(n_i, S_i)
                    + 2 \log\frac{n_i}{J - n_i}                 \quad (i \le G)

.. math:: C_{l, G + k} = F(1, v_l) + 2 \log\frac{\gamma_0}{J} - 2 \log k
                                                     \quad (k = 1..K_{new})

(the second block opens new atoms; the ``-2 log k`` makes every further new
atom dearer), an assignment problem solved exactly with the Hungarian
algorithm (``scipy.optimize.linear_sum_assignment``). :func:`match_atoms`
initialises the atoms from the client with the most neurons, matches the others
in turn, then re-matches every client against the rest (``num_iters`` passes in
a seeded random order), dropping atoms left empty. New atoms are capped so the
global layer never exceeds ``max_atoms`` neurons. The global neuron is the
matched average ``S_i / n_i`` (FedMA's "matched averaging").

Hyperparameters ``s^2`` (``noise_var``), ``s_0^2`` (``prior_var``) and
``gamma_0`` are fixed for a matching (the reference implementation can
re-estimate them between passes; not done here); ``mu_0`` is the mean of all
local neurons. By default (``noise_var=None``) ``s^2`` follows the neurons'
scale (:func:`estimate_noise_var`):

.. math:: \hat s^2 = c\,\hat\tau^2, \qquad \hat\tau^2 = \frac{1}{N D}
          \sum_{j=1}^{J} \sum_{l=1}^{L_j} \|v_{jl} - \mu_0\|^2,
          \qquad c = 0.01,

with ``N = sum_j L_j`` neurons: ``tau^2`` is the per-coordinate variance of
all the clients' neurons about their mean (``s_0^2 + s^2`` in the model), and
``c = 0.01`` says that copies of one neuron on different clients differ by a
tenth of the neurons' spread (in standard deviations). Distinct neurons,
about ``2 tau^2 = 200 s^2`` apart per coordinate, then never look alike,
while copies do, whatever the layer's weight scale. A fixed ``s^2 = 1``
exceeds the whole spread of typical trained weights (``tau^2`` of order 0.01
to 0.5 for the networks here), so the likelihood hardly tells neurons apart
and the count prior decides: clients of widths 20, 16, 16 cut from one
trained MLP had 12 to 21 of their 52 neurons matched to another unit's
global neuron (relative error 0.15 to 0.36 of their matched weights); with
the estimate, none.
Everything here is float64 numpy on the host, once per layer per round.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from fedjax_lite._optional import optional_import

scipy_optimize = optional_import("scipy.optimize", "hetero")  # at first use


class Matching(NamedTuple):
  """Result of matching the neurons of ``J`` clients.

  Attributes:
    assignments: ``J`` int arrays; ``assignments[j][l]`` is the global atom of
      client ``j``'s neuron ``l``.
    atoms: float64 ``[G, D]`` matched averages ``S_i / n_i``.
    counts: int ``[G]``, clients holding each atom.
  """

  assignments: list
  atoms: np.ndarray
  counts: np.ndarray


def _check_var(name, v, allow_none: bool = False):
  if v is None and allow_none:
    return
  if v is None or not np.isfinite(v) or v <= 0:
    what = " (or None: estimated)" if allow_none else ""
    raise ValueError(
      f"{name} must be a positive finite variance{what}, got {v!r}."
    )


NOISE_FRACTION = 0.01


def estimate_noise_var(local_atoms: Sequence[np.ndarray]) -> float:
  """``noise_var=None``: ``s^2 = 0.01 tau^2`` (see the module docstring).

  ``tau^2`` is the mean squared deviation, per coordinate, of all the
  clients' neurons ``[L_j, D]`` from their mean; 1 if every neuron is the
  same (any matching is then exact).
  """
  atoms = np.concatenate([np.asarray(a, np.float64) for a in local_atoms])
  tau2 = 0.0
  if atoms.size:
    tau2 = float(np.mean((atoms - atoms.mean(axis=0)) ** 2))
  return NOISE_FRACTION * (tau2 if tau2 > 0 else 1.0)


MATCH_OPTIONS = ("noise_var", "prior_var", "gamma", "num_iters", "seed")


def match_options(caller: str, options: dict) -> dict:
  """Checks keywords meant for :func:`match_atoms` (``noise_var``,
  ``prior_var``, ``gamma``, ``num_iters``, ``seed``) before any work:
  another name is a TypeError naming ``caller``, a variance that is not
  positive a ValueError. Returns a copy of ``options``."""
  unknown = sorted(set(options) - set(MATCH_OPTIONS))
  if unknown:
    raise TypeError(
      f"{caller}() got unknown keyword argument(s) {unknown}; its matching "
      f"settings are {list(MATCH_OPTIONS)} (see match_atoms)."
    )
  for k in ("noise_var", "prior_var", "gamma"):
    if k in options:
      _check_var(k, options[k], allow_none=k == "noise_var")
  return dict(options)


def log_marginal(
  n: np.ndarray,
  s: np.ndarray,
  mu0: np.ndarray,
  noise_var: float,
  prior_var: float,
) -> np.ndarray:
  """``F(n, S)`` of the module docstring for ``n [...]`` and ``S [..., D]``."""
  n = np.asarray(n, np.float64)[..., None]
  den = noise_var + n * prior_var
  quad = (prior_var / noise_var) * s**2 + 2.0 * mu0 * s - n * mu0**2
  return np.sum(quad / den - np.log(den) + np.log(noise_var), axis=-1)


def bbp_map_cost(
  atoms_j: np.ndarray,
  sums: np.ndarray,
  counts: np.ndarray,
  num_clients: int,
  *,
  mu0: np.ndarray,
  noise_var: float,
  prior_var: float,
  gamma: float,
  max_new: int,
) -> np.ndarray:
  """The BBP-MAP score matrix ``[L_j, G + max_new]`` (higher is better).

  Args:
    atoms_j: client ``j``'s neurons ``[L_j, D]``.
    sums, counts: the other clients' atoms, ``S_i [G, D]`` and ``n_i [G]``
      (every ``n_i`` in ``[1, J - 1]``).
    num_clients: ``J``.
    mu0: prior mean ``[D]``.
    noise_var, prior_var, gamma: ``s^2``, ``s_0^2``, ``gamma_0``.
    max_new: how many new atoms may be opened.
  """
  v = np.asarray(atoms_j, np.float64)
  sums = np.asarray(sums, np.float64).reshape(-1, v.shape[1])
  counts = np.asarray(counts, np.float64).reshape(-1)
  mu0 = np.asarray(mu0, np.float64)
  J = float(num_clients)
  dim = v.shape[1]
  r = prior_var / noise_var
  # The variances are the same in every dimension, so F(n + 1, S + v) only
  # needs |S|^2, S.v, |v|^2, mu0.S and mu0.v: O(L_j G D) as one matmul.
  ss = np.sum(sums**2, axis=1)  # [G]
  vv = np.sum(v**2, axis=1)  # [Lj]
  sv = v @ sums.T  # [Lj, G]
  ms, mv, mm = sums @ mu0, v @ mu0, float(mu0 @ mu0)
  den0 = noise_var + counts * prior_var
  den1 = den0 + prior_var
  base = (r * ss + 2 * ms - counts * mm) / den0 - dim * np.log(den0)
  joined = (
    r * (ss[None, :] + 2 * sv + vv[:, None])
    + 2 * (ms[None, :] + mv[:, None])
    - (counts + 1)[None, :] * mm
  ) / den1[None, :] - dim * np.log(den1)[None, :]
  prior = 2.0 * np.log(counts / (J - counts))
  matched = joined - base[None, :] + prior[None, :]
  den_new = noise_var + prior_var
  alone = (
    (r * vv + 2 * mv - mm) / den_new
    - dim * np.log(den_new)
    + dim * np.log(noise_var)
  )
  k = np.arange(1, max_new + 1, dtype=np.float64)
  new = alone[:, None] + 2.0 * np.log(gamma / J) - 2.0 * np.log(k)[None, :]
  return np.concatenate([matched, new], axis=1)


def match_atoms(
  local_atoms: Sequence[np.ndarray],
  *,
  max_atoms: int,
  noise_var: float | None = None,
  prior_var: float = 1.0,
  gamma: float = 1.0,
  num_iters: int = 3,
  seed: int = 0,
) -> Matching:
  """BBP-MAP matching of the clients' neurons (see the module docstring).

  Args:
    local_atoms: ``J`` arrays ``[L_j, D]`` (clients may hold different
      numbers of neurons ``L_j``).
    max_atoms: the largest global layer allowed (>= every ``L_j``).
    noise_var, prior_var, gamma: ``s^2``, ``s_0^2``, ``gamma_0``;
      ``noise_var=None`` (default) estimates ``s^2`` from the neurons' scale
      (:func:`estimate_noise_var`).
    num_iters: re-matching passes after the initial sequential pass.
    seed: order of the re-matching passes.
  """
  _check_var("noise_var", noise_var, allow_none=True)
  _check_var("prior_var", prior_var)
  _check_var("gamma", gamma)
  atoms = [np.asarray(a, np.float64) for a in local_atoms]
  if not atoms:
    raise ValueError("match_atoms needs at least one client's neurons.")
  dims = {a.shape[1] if a.ndim == 2 else None for a in atoms}
  if len(dims) != 1 or None in dims:
    raise ValueError(
      f"every client's neurons must be [L_j, D] with one D; "
      f"got shapes {[a.shape for a in atoms]}."
    )
  sizes = [a.shape[0] for a in atoms]
  if max_atoms < max(sizes):
    raise ValueError(
      f"max_atoms={max_atoms} is smaller than a client's "
      f"{max(sizes)} neurons; the global layer must be able to "
      "hold every client's neurons."
    )
  J = len(atoms)
  mu0 = np.concatenate(atoms).mean(axis=0)
  if noise_var is None:
    noise_var = estimate_noise_var(atoms)
  order = sorted(range(J), key=lambda j: -sizes[j])
  first = order[0]
  sums = atoms[first].copy()
  counts = np.ones(sizes[first], np.int64)
  assign: list = [None] * J
  assign[first] = np.arange(sizes[first])

  def match(j, sums, counts):
    g = sums.shape[0]
    max_new = min(sizes[j], max_atoms - g)
    cost = bbp_map_cost(
      atoms[j],
      sums,
      counts,
      J,
      mu0=mu0,
      noise_var=noise_var,
      prior_var=prior_var,
      gamma=gamma,
      max_new=max_new,
    )
    rows, cols = scipy_optimize.linear_sum_assignment(cost, maximize=True)
    a = np.empty(sizes[j], np.int64)
    old = cols < g
    a[rows[old]] = cols[old]
    new_rows = rows[~old][np.argsort(cols[~old])]
    a[new_rows] = g + np.arange(new_rows.size)
    counts = np.concatenate([counts, np.zeros(new_rows.size, np.int64)])
    sums = np.concatenate([sums, np.zeros((new_rows.size, sums.shape[1]))])
    np.add.at(sums, a, atoms[j])
    np.add.at(counts, a, 1)
    return a, sums, counts

  for j in order[1:]:
    assign[j], sums, counts = match(j, sums, counts)
  rng = np.random.default_rng(seed)
  for _ in range(num_iters if J > 1 else 0):
    for j in rng.permutation(J):
      np.subtract.at(sums, assign[j], atoms[j])
      np.subtract.at(counts, assign[j], 1)
      keep = counts > 0
      remap = np.cumsum(keep) - 1
      sums, counts = sums[keep], counts[keep]
      for i in range(J):
        if i != j:
          assign[i] = remap[assign[i]]
      assign[j], sums, counts = match(j, sums, counts)
  return Matching(assign, sums / counts[:, None], counts)
