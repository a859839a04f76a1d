r"""Privacy accounting for user-level DP federated averaging, with dp-accounting.

A round of DP-FedAvg (McMahan et al. 2018, arXiv:1710.06963) releases

.. math:: \tilde\Delta_t = \frac{1}{D}\Big(\sum_{k \in S_t} \mathrm{clip}_C(\Delta_k)
          + \mathcal N(0, z^2 C^2 I)\Big),

a sampled Gaussian mechanism on users. The :class:`DpMechanism` says how
``S_t`` is drawn and which neighbouring relation the guarantee uses; its
``DpEvent`` (dp-accounting) is composed over rounds with
``SelfComposedDpEvent``:

* ``"poisson"``: every user joins with probability ``q`` independently;
  ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` under add-or-remove-one
  user (the sum's sensitivity is ``C``).
* ``"fixed"``: ``m`` of the ``N`` users uniformly without replacement;
  ``SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(z / 2))`` under
  replace-one user: replacing one user's clipped update moves the sum by up
  to ``2C``, so the noise is ``z / 2`` times that sensitivity (Wang, Balle,
  Kasiviswanathan 2019, arXiv:1808.00087). dp-accounting's PLD accountant has
  no event for this sampling; only RDP accounts it.
* ``"local"``: local DP, each user's randomizer ``clip_C(u) + N(0, z^2 C^2)``
  is a Gaussian mechanism with sensitivity ``2C`` (any two inputs), i.e.
  ``GaussianDpEvent(z / 2)``, composed over the rounds the user takes part in
  (at most every round: no amplification, the server sees who sent what).

``epsilon(mechanism, rounds)`` runs a fresh accountant on
``SelfComposedDpEvent(round_event, rounds)``. :class:`EpsilonCurve` gives the
same numbers for every round of a run cheaply: RDP composes additively
(``rdp_T = T * rdp_1``), so it computes one round's RDP vector once and
converts ``T * rdp_1`` with dp-accounting's own ``compute_epsilon``; PLD
curves self-compose per round (about a second each).

:func:`calibrate_noise_multiplier` finds the smallest ``z`` meeting a target
``(epsilon, delta)`` with ``dp_accounting.calibrate_dp_mechanism``.
:func:`poisson_cap` sizes the fixed slot count ``M`` that simulates Poisson
sampling inside one compiled round (see :mod:`fedjax_lite.privacy.dp`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math

import numpy as np

from fedjax_lite import checks
from fedjax_lite._optional import optional_import

# The privacy extra, imported at first use (fedjax_lite/_optional.py).
dp_accounting = optional_import("dp_accounting", "privacy")
dp_pld = optional_import("dp_accounting.pld", "privacy")
dp_rdp = optional_import("dp_accounting.rdp", "privacy")
_rdp_lib = optional_import(
  "dp_accounting.rdp.rdp_privacy_accountant", "privacy"
)
stats = optional_import("scipy.stats", "privacy")

SAMPLINGS = ("poisson", "fixed", "local")
ACCOUNTANTS = ("rdp", "pld")


@contextlib.contextmanager
def _quiet_absl():
  """dp-accounting logs (absl WARNING) every RDP order it excludes for not
  converging; the excluded orders only make epsilon conservative."""
  logger = logging.getLogger("absl")
  old = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(old)


# ------------------------------------------------------------------- checks
def check_noise_multiplier(value, name: str = "noise_multiplier") -> float:
  """``z >= 0`` (0: no noise, no privacy)."""
  return checks.in_range(
    name,
    value,
    0.0,
    math.inf,
    expected=f"a finite number >= 0 (noise std = {name} x clip)",
  )


def check_clip(value, name: str = "clip") -> float:
  """``C > 0``."""
  return checks.in_range(
    name, value, 0.0, math.inf, low_open=True, expected="a finite L2 norm > 0"
  )


def check_sampling_rate(value, name: str = "sampling_rate") -> float:
  """``q`` in ``(0, 1]``."""
  return checks.in_range(
    name,
    value,
    0.0,
    1.0,
    low_open=True,
    high_open=False,
    expected="in (0, 1] (the probability that a user takes part in a round)",
  )


def check_delta(value, name: str = "delta") -> float:
  """``delta`` in ``(0, 1)``."""
  return checks.in_range(
    name,
    value,
    0.0,
    1.0,
    low_open=True,
    expected="in (0, 1) (typically below 1 / population)",
  )


def _accountant_name(value) -> str:
  if value not in ACCOUNTANTS:
    raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {value!r}.")
  return value


# ---------------------------------------------------------------- mechanism
@dataclasses.dataclass(frozen=True)
class DpMechanism:
  """One round's user-level mechanism, as the accountant models it.

  Attributes:
    noise_multiplier: ``z``: the noise std over the clip norm (for adaptive
      clipping the *effective* multiplier of Andrew et al. 2021, split between
      the sum and the clipped count).
    sampling: ``"poisson"``, ``"fixed"`` or ``"local"`` (module docstring).
    population: ``N``, the number of users.
    clients_per_round: ``m``: the sample size for ``"fixed"``, the expected
      ``q N`` for ``"poisson"`` (``sampling_rate = m / N`` unless given).
    sampling_rate: ``q`` for ``"poisson"``; default ``m / N``.
  """

  noise_multiplier: float
  sampling: str
  population: int
  clients_per_round: float | None = None
  sampling_rate: float | None = None

  def __post_init__(self):
    object.__setattr__(
      self, "noise_multiplier", check_noise_multiplier(self.noise_multiplier)
    )
    if self.sampling not in SAMPLINGS:
      raise ValueError(
        f"sampling must be one of {SAMPLINGS}, got {self.sampling!r}."
      )
    checks.positive_int("population", self.population)
    if self.sampling == "poisson":
      if self.sampling_rate is None:
        if self.clients_per_round is None:
          raise ValueError(
            "poisson sampling needs sampling_rate (q) or "
            "clients_per_round (q = clients_per_round / "
            "population)."
          )
        m = checks.real("clients_per_round", self.clients_per_round)
        q = m / self.population
        if not 0 < q <= 1:
          raise ValueError(
            f"clients_per_round must be in (0, population="
            f"{self.population}] for poisson sampling, got "
            f"{m!r} (sampling_rate {q!r})."
          )
        object.__setattr__(self, "sampling_rate", q)
      else:
        object.__setattr__(
          self, "sampling_rate", check_sampling_rate(self.sampling_rate)
        )
      object.__setattr__(
        self, "clients_per_round", self.sampling_rate * self.population
      )
    elif self.sampling == "fixed":
      m = checks.positive_int("clients_per_round", self.clients_per_round)
      if m > self.population:
        raise ValueError(
          f"clients_per_round must be at most population="
          f"{self.population} for fixed-size sampling without "
          f"replacement, got {m}."
        )
      object.__setattr__(self, "clients_per_round", m)
      object.__setattr__(self, "sampling_rate", m / self.population)

  @property
  def neighboring_relation(self) -> dp_accounting.NeighboringRelation:
    """Add-or-remove-one user (Poisson, local) or replace-one (fixed)."""
    relation = dp_accounting.NeighboringRelation
    return (
      relation.REPLACE_ONE
      if self.sampling == "fixed"
      else relation.ADD_OR_REMOVE_ONE
    )

  def round_event(self) -> dp_accounting.DpEvent:
    """The ``DpEvent`` of one round (see the module docstring)."""
    z = self.noise_multiplier
    if self.sampling == "poisson":
      return dp_accounting.PoissonSampledDpEvent(
        self.sampling_rate, dp_accounting.GaussianDpEvent(z)
      )
    if self.sampling == "fixed":
      return dp_accounting.SampledWithoutReplacementDpEvent(
        self.population,
        self.clients_per_round,
        dp_accounting.GaussianDpEvent(z / 2),
      )
    return dp_accounting.GaussianDpEvent(z / 2)

  def event(self, num_rounds: int) -> dp_accounting.DpEvent:
    """``SelfComposedDpEvent(round_event, num_rounds)``."""
    return dp_accounting.SelfComposedDpEvent(
      self.round_event(), checks.positive_int("num_rounds", num_rounds)
    )

  def accountant(
    self, accountant: str = "rdp"
  ) -> dp_accounting.PrivacyAccountant:
    """A fresh dp-accounting accountant for this mechanism's relation."""
    if _accountant_name(accountant) == "rdp":
      return dp_rdp.RdpAccountant(
        neighboring_relation=self.neighboring_relation
      )
    if self.sampling == "fixed":
      raise ValueError(
        "accountant='pld' cannot account fixed-size sampling "
        "without replacement: dp-accounting's PLD accountant "
        "has no SampledWithoutReplacementDpEvent. Use "
        "accountant='rdp', or poisson sampling."
      )
    return dp_pld.PLDAccountant(neighboring_relation=self.neighboring_relation)

  def describe(self) -> str:
    if self.sampling == "poisson":
      s = f"Poisson q={self.sampling_rate:g} of N={self.population}"
    elif self.sampling == "fixed":
      s = f"{self.clients_per_round} of N={self.population} w/o replacement"
    else:
      s = "local DP (per-user Gaussian)"
    return f"z={self.noise_multiplier:g}, {s}"


def epsilon(
  mechanism: DpMechanism, num_rounds: int, delta: float, accountant: str = "rdp"
) -> float:
  """``epsilon`` after ``num_rounds`` rounds at ``delta`` (a fresh accountant
  composing ``mechanism.event(num_rounds)``)."""
  delta = check_delta(delta)
  acc = mechanism.accountant(accountant)
  if mechanism.noise_multiplier == 0:
    return math.inf
  with _quiet_absl():
    acc.compose(mechanism.event(num_rounds))
    return float(acc.get_epsilon(delta))


class EpsilonCurve:
  """``epsilon`` after each round ``T`` of a run, for one mechanism.

  RDP: one round's RDP vector (from a dp-accounting ``RdpAccountant``) times
  ``T``, converted by dp-accounting's ``compute_epsilon``: the same float
  arithmetic as composing ``SelfComposedDpEvent(event, T)`` (about 0.3 ms per
  round). PLD: a fresh PLD accountant per ``T`` (about a second each);
  values are memoised.
  """

  def __init__(
    self, mechanism: DpMechanism, delta: float, accountant: str = "rdp"
  ):
    self._memo: dict[int, float] = {}
    self.mechanism = mechanism
    self.delta = check_delta(delta)
    self.accountant = _accountant_name(accountant)
    mechanism.accountant(accountant)  # raises for unsupported combinations
    self._rdp1 = None
    if accountant == "rdp" and mechanism.noise_multiplier > 0:
      acc = mechanism.accountant("rdp")
      with _quiet_absl():
        acc.compose(mechanism.round_event())
      self._orders = np.asarray(acc._orders)  # pylint: disable=protected-access
      self._rdp1 = np.asarray(acc._rdp)  # pylint: disable=protected-access

  def __call__(self, num_rounds: int) -> float:
    num_rounds = int(num_rounds)
    if num_rounds <= 0:
      return 0.0
    if self.mechanism.noise_multiplier == 0:
      return math.inf
    if num_rounds not in self._memo:
      if self._rdp1 is not None:
        with _quiet_absl():
          eps, _ = _rdp_lib.compute_epsilon(
            self._orders, num_rounds * self._rdp1, self.delta
          )
        self._memo[num_rounds] = float(eps)
      else:
        self._memo[num_rounds] = epsilon(
          self.mechanism, num_rounds, self.delta, self.accountant
        )
    return self._memo[num_rounds]

  def curve(self, num_rounds: int) -> np.ndarray:
    """float64 ``[num_rounds]``: epsilon after rounds ``1..num_rounds``."""
    return np.array([self(t) for t in range(1, num_rounds + 1)])


# -------------------------------------------------------------- calibration
def calibrate_noise_multiplier(
  target_epsilon: float,
  delta: float,
  num_rounds: int,
  *,
  sampling: str = "poisson",
  population: int,
  clients_per_round: float | None = None,
  sampling_rate: float | None = None,
  accountant: str = "rdp",
  max_noise_multiplier: float = 1000.0,
  tol: float = 1e-4,
) -> float:
  """The smallest ``z`` whose ``epsilon`` after ``num_rounds`` is at most
  ``target_epsilon`` at ``delta`` (``dp_accounting.calibrate_dp_mechanism``,
  Brent's method on ``[0.01 * ..., max_noise_multiplier]``).

  Raises:
    ValueError: a target that no ``z`` in ``(0, max_noise_multiplier]``
      reaches (naming the epsilon the largest ``z`` gives).
  """
  target_epsilon = checks.in_range(
    "target_epsilon", target_epsilon, 0.0, math.inf, low_open=True
  )
  delta = check_delta(delta)
  num_rounds = checks.positive_int("num_rounds", num_rounds)
  max_z = check_noise_multiplier(max_noise_multiplier, "max_noise_multiplier")

  def mech(z):
    return DpMechanism(
      z, sampling, population, clients_per_round, sampling_rate
    )

  best = epsilon(mech(max_z), num_rounds, delta, accountant)
  if best > target_epsilon:
    raise ValueError(
      f"target_epsilon={target_epsilon!r} is not reachable: even "
      f"noise_multiplier={max_z:g} (max_noise_multiplier) gives epsilon="
      f"{best:.4g} at delta={delta:g} after {num_rounds} rounds "
      f"({mech(max_z).describe()}). Expected a target >= {best:.4g}; raise "
      "the target, delta or max_noise_multiplier, or use fewer rounds or "
      "a smaller sampling rate."
    )
  # Lower end of the bracket: a z whose epsilon exceeds the target (halving
  # from 0.5; epsilon grows without bound as z -> 0 when rounds > 0).
  lo = 0.5
  while epsilon(mech(lo), num_rounds, delta, accountant) <= target_epsilon:
    lo *= 0.5
    if lo < 1e-6:
      return lo
  with _quiet_absl():
    z = dp_accounting.calibrate_dp_mechanism(
      lambda: mech(1.0).accountant(accountant),
      lambda v: mech(v).event(num_rounds),
      target_epsilon,
      delta,
      bracket_interval=dp_accounting.ExplicitBracketInterval(lo, max_z),
      tol=tol,
    )
  return float(z)


# --------------------------------------------------------- poisson via a cap
def overflow_probability(
  population: int, sampling_rate: float, num_slots: int
) -> float:
  """``P(K > num_slots)`` for ``K ~ Binomial(population, sampling_rate)``."""
  return float(stats.binom.sf(num_slots, population, sampling_rate))


def poisson_cap(
  population: int,
  sampling_rate: float,
  num_rounds: int,
  max_overflow: float = 1e-9,
) -> int:
  """The fewest slots ``M`` with ``num_rounds * P(K > M) <= max_overflow``.

  ``K ~ Binomial(N, q)`` is the Poisson sample's size; a round with
  ``K > M`` keeps a uniformly random ``M`` of the ``K`` users (see
  :mod:`fedjax_lite.privacy.dp`).
  """
  n = checks.positive_int("population", population)
  q = check_sampling_rate(sampling_rate)
  t = checks.positive_int("num_rounds", num_rounds)
  per_round = (
    checks.in_range("max_overflow", max_overflow, 0.0, 1.0, high_open=False) / t
  )
  m = int(stats.binom.isf(per_round, n, q))
  while m < n and overflow_probability(n, q, m) > per_round:
    m += 1
  while m > 0 and overflow_probability(n, q, m - 1) <= per_round:
    m -= 1
  return max(1, min(n, m))


def truncation_delta(
  epsilon_value: float,
  num_rounds: int,
  population: int,
  sampling_rate: float,
  num_slots: int,
) -> float:
  r"""Extra delta from capping a Poisson sample at ``num_slots`` users.

  In each round the capped and the uncapped mechanisms differ only on the
  event ``K > M``, so their output laws are within ``eta = P(K > M)`` in
  total variation, on every dataset. Over ``T`` rounds that is ``T eta``, and
  an ``(epsilon, delta)`` guarantee of the uncapped mechanism gives the capped
  one ``(epsilon, delta + (1 + e^epsilon) T eta)``. This returns the added
  term. (dp-accounting's ``TruncatedSubsampledGaussianDpEvent`` accounts the
  capped mechanism exactly with PLD.)
  """
  eta = overflow_probability(population, sampling_rate, num_slots)
  return float((1.0 + math.exp(min(epsilon_value, 700.0))) * num_rounds * eta)
