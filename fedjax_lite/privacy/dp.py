r"""User-level differentially private federated averaging (DP-FedAvg).

McMahan, Ramage, Talwar, Zhang 2018, "Learning differentially private
recurrent language models" (arXiv:1710.06963), with adaptive clipping from
Andrew, Thakkar, McMahan, Ramaswamy 2021, "Differentially private learning
with adaptive clipping" (arXiv:1905.03871).

Central DP (:func:`dp_aggregator`). Round ``t`` with clip norm ``C_t``: every
participating user's whole update is clipped,
:math:`\hat\Delta_k = \Delta_k \min(1, C_t / \|\Delta_k\|_2)`, and the server
releases

.. math:: \tilde\Delta_t = \frac{1}{D}\Big(\sum_{k \in S_t} \hat\Delta_k
          + \mathcal N(0, \sigma_\Delta^2 I)\Big), \quad
          \sigma_\Delta = z_\Delta C_t

with a FIXED denominator ``D = clients_per_round`` (the expected number of
users, ``q N`` for Poisson sampling: the paper's fixed-denominator estimator,
so one user moves the numerator by at most ``C_t`` whatever the others do).
Users count with weight 1 (uniform weighting; a client weight only decides
whether it takes part: ``w_k > 0``). The noise is drawn with the round's
aggregation key.

Adaptive clipping (``adaptive=True``): the server also releases the noised
fraction of unclipped users,
:math:`\tilde b_t = (\sum_{k \in S_t} \mathbb 1[\|\Delta_k\| \le C_t]
+ \mathcal N(0, \sigma_b^2)) / D`, and moves the clip geometrically towards
the target quantile :math:`\gamma`,
:math:`C_{t+1} = C_t \exp(-\eta_C (\tilde b_t - \gamma))`. The two Gaussian
releases together are one Gaussian mechanism with effective multiplier
``z`` (Andrew et al., Thm. 1): the sum gets

.. math:: z_\Delta = \big(z^{-2} - (2\sigma_b)^{-2}\big)^{-1/2},

so ``noise_multiplier = z`` is what the accountant sees (``sigma_b``
defaults to ``D / 20``, the paper's choice, and must exceed ``z / 2``).

Client sampling the accountant can model:

* ``sampling="poisson"``: every user joins independently with probability
  ``q = clients_per_round / N`` (``N`` the run's population, see below).
  Inside one compiled round: the engine samples a fixed cap of ``M`` slots
  uniformly without replacement (``RoundConfig(clients_per_round=M,
  sampling="uniform")``; choose ``M`` with
  :func:`~fedjax_lite.privacy.accounting.poisson_cap`), the aggregator
  draws ``K ~ Binomial(N, q)`` and only slots ``< K`` count; the others
  contribute a zero clipped update and are not counted. The first ``K``
  slots of a uniformly ordered sample are a uniform ``K``-subset, so the
  participants are exactly a Poisson sample. Overflow (``K > M``,
  probability :func:`~fedjax_lite.privacy.accounting.overflow_probability`;
  at most 1e-9 over the whole run with ``poisson_cap``'s default): the round
  keeps a uniformly random ``M`` of the ``K`` users (the first ``M``
  slots), is reported in the metric ``dp_overflow``, and adds at most
  ``(1 + e^eps) T P(K > M)`` to delta
  (:func:`~fedjax_lite.privacy.accounting.truncation_delta`). The engine
  trains only the slots ``< K`` (``Aggregator.active_slots``), so a round
  costs ``min(K, M)`` clients' work, not ``M``.
* ``sampling="fixed"``: the engine's ``clients_per_round`` users uniformly
  without replacement (replace-one accounting, see
  :mod:`~fedjax_lite.privacy.accounting`).
* ``sampling=None``: no accounting (the aggregator still clips and noises).

Local DP (``local=True``, :func:`with_local_dp` + ``dp_aggregator(...,
local=True)``): each client clips its own update and adds
``N(0, z^2 C^2 I)`` before upload (with its own key); the server only sums
with the fixed denominator. Every upload is a Gaussian mechanism with
sensitivity ``2C`` on that user's data, composed over the rounds the user
takes part in (accounted as if every round); sampling does not amplify it.

Epsilon: with ``sampling`` and ``delta`` given, every round's metrics hold
``dp_epsilon``, the epsilon at ``delta`` after the rounds run so far, from
the dp-accounting RDP (default) or PLD accountant
(:class:`~fedjax_lite.privacy.accounting.EpsilonCurve`, evaluated on the host
by a ``jax.pure_callback`` from the round counter in the aggregator state).

Epsilon is derived from the run, not from what the caller declares. With
accounting (``sampling`` or ``delta`` given) the aggregator has a ``bind``
(:attr:`~fedjax_lite.aggregators.Aggregator.bind`): when the engine traces a
round it passes the run's :class:`~fedjax_lite.aggregators.RunSpec` (the
data's number of clients and the ``RoundConfig`` sampling), and the bound
aggregator accounts that run:

* ``N`` is the run's population (``population=None``, the default, takes
  it from the data; Poisson's ``q = D / N`` with it). A declared
  ``population`` that differs from the data's number of clients is a
  ``ValueError`` naming both: an epsilon for a population the run does not
  have would be wrong (declaring 10,000 users for 6 clients reports a far
  smaller epsilon than the run spends).
* ``sampling="fixed"`` needs ``RoundConfig(sampling="uniform")`` (or
  ``"all"``, every user every round) without replacement and
  ``RoundConfig(clients_per_round=D)``; ``sampling="poisson"`` needs
  ``RoundConfig(sampling="uniform")`` without replacement (the Poisson
  sample is the first ``K`` slots of a uniform sample; ``"all"`` takes the
  clients in order).
* ``RoundConfig(sampling="weighted")`` and ``RoundConfig(replace=True)`` are
  refused: users drawn in proportion to their data, or a user drawn twice in
  one round (its update counted twice), have no accountant here.

Host and device sides: :func:`dp_aggregator` checks its arguments
(:func:`dp_settings`, a :class:`DpSettings`) and builds a
:class:`DpProtocol`, the host side (the run checks above, the epsilon
curve, the aggregators bound so far). The :class:`Aggregator` it returns is
the device side: pure functions of the round whose state across rounds,
:class:`DpState` (the clip ``C_t``, the rounds released, the Poisson key),
is checkpointed with the engine; the host keeps no round-by-round state.

Without accounting (``sampling=None``, ``delta=None``) any run is allowed:
the aggregator clips and noises and reports no epsilon. A ``population``
declared with accounting also lets the aggregator run unbound (e.g. driven by
hand); with ``population=None`` only a bound one runs. With
``simulate_sampling=False`` (the caller samples the users, e.g.
:func:`~fedjax_lite.learning.build_dp_fed_avg_process`) a round's data is the
sample, not the population, so ``population`` must be declared; the bound
aggregator checks that a round has at most ``population`` clients (and
exactly ``D`` for ``sampling="fixed"``).

Clients the engine drops for a non-finite update (``RoundConfig(nonfinite=
"drop")``, see :mod:`fedjax_lite.engine.round`) were still sampled: they are
accounted like every sampled user (they contribute a zero update, inside the
clip ball, so the sensitivity is unchanged), and the fixed denominator ``D``
is unchanged. They are not counted in ``dp_participants``.

What this simulation guarantees, and what it does not:

* It computes exactly the released quantities of the mechanisms above; the
  epsilon reported is dp-accounting's for that mechanism (sampled Gaussian,
  composed over the rounds run).
* Central DP trusts the server: it sees every clipped update and adds the
  noise itself. Local DP trusts no one with raw updates but needs far more
  noise for the same epsilon.
* Noise is floating-point Gaussian from JAX's counter-based PRNG (float32),
  not a discrete or cryptographically secure sampler; float rounding attacks
  on the continuous Gaussian (Mironov 2012) are not addressed.
* Only the noised mean (and, if adaptive, the noised unclipped count) are
  covered. Other metrics a round reports (training loss and accuracy, the
  exact clipped fraction ``dp_clipped_fraction``, ``dp_participants``,
  evaluation on test data) are simulation diagnostics outside the guarantee;
  a deployment would not publish them.
* Client weights do not enter the mean (uniform weighting).
* Reproducible seeds are for experiments; a real deployment needs fresh,
  secret randomness.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lite import checks
from fedjax_lite.aggregators.base import (
  Aggregator,
  AggregatorOutput,
  RunSpec,
  check_float_updates,
  clip_by_norm,
  expand,
  sum_over_devices,
  taking_part,
  tree_norm,
)
from fedjax_lite.algorithms.base import FederatedAlgorithm
from fedjax_lite.algorithms.fed_avg import fed_avg
from fedjax_lite.models.core import Model
from fedjax_lite.privacy import accounting

PyTree = Any
MAX_OVERFLOW_PER_ROUND = 1e-6


@flax.struct.dataclass
class DpState:
  """The DP aggregator's state across rounds (checkpointed with the engine).

  Attributes:
    clip_norm: float32 ``C_t`` used by the next round.
    rounds: int32 rounds released so far (what epsilon composes).
    sample_key: key of the next round's Poisson sample size ``K``.
  """

  clip_norm: jax.Array
  rounds: jax.Array
  sample_key: jax.Array


def sum_noise_multiplier(
  noise_multiplier: float, clipped_count_stddev: float
) -> float:
  r"""``z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)`` (Andrew et al. 2021).

  Raises:
    ValueError: if ``sigma_b <= z / 2`` (the count alone would need more
      privacy than the whole budget).
  """
  z = accounting.check_noise_multiplier(noise_multiplier)
  if z == 0:
    return 0.0
  s = checks.real("clipped_count_stddev", clipped_count_stddev)
  if not s > z / 2:
    raise ValueError(
      f"clipped_count_stddev must be > noise_multiplier / 2 = {z / 2:g} so "
      f"that the sum keeps a finite noise multiplier, got {s!r}. Raise "
      "clipped_count_stddev (the paper uses clients_per_round / 20), or "
      "use more clients per round or adaptive=False."
    )
  return float((z**-2 - (2 * s) ** -2) ** -0.5)


def _gaussian_like(rng: jax.Array, tree: PyTree, std) -> PyTree:
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(rng, max(1, len(leaves)))
  noise = [
    std * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)
  ]
  return jax.tree.unflatten(treedef, noise)


# ----------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class DpSettings:
  r"""The checked hyperparameters of one :func:`dp_aggregator` call.

  Attributes:
    noise_multiplier: ``z``, the multiplier the accountant sees (adaptive:
      the effective one of the two releases).
    sum_multiplier: ``z_Delta``, the noise std on the clipped sum over
      ``C_t``: ``z`` (fixed clip), ``(z^-2 - (2 sigma_b)^-2)^(-1/2)``
      (adaptive), 0 (local DP: the clients noised).
    count_stddev: ``sigma_b``, the noise std on the unclipped count
      (adaptive with ``z > 0``; else 0).
    clip: ``C_0``, the first round's clip norm.
    denominator: ``D``, the fixed denominator (expected users per round).
    adaptive: adaptive clipping.
    target_quantile: ``gamma`` (adaptive; else 0).
    learning_rate: ``eta_C`` (adaptive; else 0).
    sampling, population, delta, accountant, local, simulate_sampling,
      seed: as given to :func:`dp_aggregator`.
  """

  noise_multiplier: float
  sum_multiplier: float
  count_stddev: float
  clip: float
  denominator: float
  adaptive: bool
  target_quantile: float
  learning_rate: float
  sampling: str | None
  population: int | None
  delta: float | None
  accountant: str
  local: bool
  simulate_sampling: bool
  seed: int

  @property
  def accounted(self) -> bool:
    """Whether rounds are accounted (``sampling`` or ``delta`` given)."""
    return self.sampling is not None or self.delta is not None

  @property
  def poisson(self) -> bool:
    """Whether the aggregator draws the Poisson sample size ``K`` itself."""
    return self.sampling == "poisson" and self.simulate_sampling

  @property
  def name(self) -> str:
    kind = (
      "local_dp" if self.local else ("dp_adaptive" if self.adaptive else "dp")
    )
    return (
      f"{kind}(z={self.noise_multiplier:g},C={self.clip:g},"
      f"D={self.denominator:g})"
    )


def dp_settings(
  noise_multiplier,
  clients_per_round,
  clip,
  adaptive,
  *,
  target_quantile,
  learning_rate,
  clipped_count_stddev,
  sampling,
  population,
  delta,
  accountant,
  local,
  simulate_sampling,
  seed,
) -> DpSettings:
  """:func:`dp_aggregator`'s arguments, checked (its Args and Raises)."""
  z = accounting.check_noise_multiplier(noise_multiplier)
  c0 = accounting.check_clip(clip)
  d = checks.in_range(
    "clients_per_round",
    clients_per_round,
    0.0,
    math.inf,
    low_open=True,
    expected="> 0 (the expected users per round, the fixed denominator)",
  )
  if sampling not in (None,) + accounting.SAMPLINGS[:2]:
    raise ValueError(
      f"sampling must be 'poisson', 'fixed' or None, got {sampling!r}."
    )
  if local and adaptive:
    raise ValueError(
      "adaptive=True needs the server to see the clipped "
      "count; with local=True clients clip themselves. Use a "
      "fixed clip for local DP."
    )
  gamma = eta = sigma_b = 0.0
  z_sum = z
  if adaptive:
    gamma = checks.in_range(
      "target_quantile", target_quantile, 0.0, 1.0, high_open=False
    )
    eta = checks.positive_float("learning_rate", learning_rate, allow_zero=True)
    if z > 0:
      sigma_b = d / 20 if clipped_count_stddev is None else clipped_count_stddev
      z_sum = sum_noise_multiplier(z, sigma_b)
  if sampling is None and delta is not None:
    raise ValueError(
      "accounting needs sampling ('poisson' or 'fixed') and population "
      "(default: the run's number of clients); got sampling=None, "
      f"population={population!r}."
    )
  if delta is not None:
    accounting.check_delta(delta)
  if sampling is not None and not simulate_sampling and population is None:
    raise ValueError(
      "dp_aggregator(simulate_sampling=False): the caller samples the "
      "users, so a round's data is the sample, not the population; "
      "accounting needs population=N (the users sampled from), got "
      "population=None."
    )
  return DpSettings(
    noise_multiplier=z,
    sum_multiplier=0.0 if local else z_sum,
    count_stddev=float(sigma_b),
    clip=c0,
    denominator=d,
    adaptive=bool(adaptive),
    target_quantile=gamma,
    learning_rate=eta,
    sampling=sampling,
    population=population,
    delta=delta,
    accountant=accountant,
    local=bool(local),
    simulate_sampling=bool(simulate_sampling),
    seed=seed,
  )


# --------------------------------------------------------------- host side
class DpProtocol:
  r"""The host side of one :func:`dp_aggregator`: the run it accounts.

  The mechanism (module docstring): round ``t`` releases
  :math:`\tilde\Delta_t = (\sum_{k \in S_t} \mathrm{clip}_{C_t}(\Delta_k)
  + \mathcal N(0, (z_\Delta C_t)^2 I)) / D` (the Gaussian mechanism on the
  clipped sum, noise std ``z_Delta * C_t``) and, with adaptive clipping,
  :math:`\tilde b_t = (\#\{k: \|\Delta_k\| \le C_t\} + \mathcal N(0,
  \sigma_b^2)) / D` and :math:`C_{t+1} = C_t \exp(-\eta_C (\tilde b_t -
  \gamma))`. Both releases are one Gaussian mechanism of multiplier ``z``,
  which :class:`~fedjax_lite.privacy.accounting.DpMechanism` accounts
  (``"poisson"``: ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``;
  ``"fixed"``: ``SampledWithoutReplacementDpEvent(N, D,
  GaussianDpEvent(z / 2))``; local DP: ``GaussianDpEvent(z / 2)``), and
  :class:`~fedjax_lite.privacy.accounting.EpsilonCurve` turns into the
  epsilon after ``T`` rounds with dp-accounting's RDP (or PLD) accountant.

  What runs on the host: checking a run against what the accountant models
  (:meth:`population_of`, called by the engine through ``Aggregator.bind``),
  building that run's epsilon curve, and the aggregators already built, one
  per population (binding the same run again returns the same aggregator).
  The clip ``C_t``, the rounds released and the Poisson key live in the
  device-side state (:class:`DpState`), not here.
  """

  def __init__(self, settings: DpSettings):
    self.settings = settings
    self._built: dict[int, Aggregator] = {}

  def aggregator(self, population: int | None = None) -> Aggregator:
    """The aggregator accounting ``population`` users (None: unbound; it
    runs only once bound, unless accounting is off)."""
    if population is None:
      return self._build(None)
    if population not in self._built:
      self._built[population] = self._build(population)
    return self._built[population]

  def bind(self, run: RunSpec) -> Aggregator:
    """``Aggregator.bind``: the aggregator accounting ``run``'s population."""
    return self.aggregator(self.population_of(run))

  def epsilon_curve(self, population: int) -> accounting.EpsilonCurve | None:
    """Epsilon after ``T`` rounds of ``population`` users, or None when no
    ``delta`` is given (``ValueError`` for a mechanism that cannot be)."""
    s = self.settings
    d = s.denominator
    mechanism = accounting.DpMechanism(
      s.noise_multiplier,
      "local" if s.local else s.sampling,
      population,
      clients_per_round=(
        int(d) if s.sampling == "fixed" and float(d).is_integer() else d
      ),
    )
    if s.sampling == "poisson":
      accounting.check_sampling_rate(
        d / population, "clients_per_round / population"
      )
    if s.delta is None:
      return None
    return accounting.EpsilonCurve(mechanism, s.delta, s.accountant)

  def _build(self, population: int | None) -> Aggregator:
    s = self.settings
    curve = None
    if s.accounted and population is not None:
      curve = self.epsilon_curve(population)
    device = _DpRound(s, population, curve)
    return Aggregator(
      device.init_state,
      device.init,
      device.add,
      device.merge,
      device.finalize,
      name=s.name,
      active_slots=device.active_slots if s.poisson else None,
      # Bound or not, binding again starts from what was declared.
      bind=self.bind if s.accounted else None,
    )

  def population_of(self, run: RunSpec) -> int:
    """The population the accountant uses for ``run``, or a ``ValueError``
    for a run it does not model (module docstring)."""
    if run.sampling == "weighted":
      raise ValueError(
        "dp_aggregator cannot account RoundConfig(sampling='weighted'): "
        "users sampled in proportion to their data size have no "
        "accountant here (epsilon assumes uniform sampling without "
        "replacement); use RoundConfig(sampling='uniform'), or "
        "dp_aggregator(sampling=None, delta=None) for no accounting."
      )
    if run.replace:
      raise ValueError(
        "dp_aggregator cannot account RoundConfig(replace=True): sampling "
        "with replacement (a user drawn twice counts twice in one round) "
        "has no accountant here; use RoundConfig(replace=False), or "
        "dp_aggregator(sampling=None, delta=None) for no accounting."
      )
    if self.settings.simulate_sampling:
      return self._sampled_by_engine(run)
    return self._sampled_by_caller(run)

  def _sampled_by_caller(self, run: RunSpec) -> int:
    """The caller sampled the users: the run's data is that sample."""
    s, m = self.settings, run.clients_per_round
    d = s.denominator
    if m > s.population:
      raise ValueError(
        f"dp_aggregator: a round trains {m} clients, more than the "
        f"declared population={s.population} users they are sampled from."
      )
    if s.sampling == "fixed" and m != d:
      raise ValueError(
        f"dp_aggregator: fixed-size sampling is accounted for "
        f"clients_per_round={d:g} users per round but the round is given "
        f"{m} clients; give exactly {d:g} users sampled uniformly "
        "without replacement."
      )
    return s.population

  def _sampled_by_engine(self, run: RunSpec) -> int:
    """The engine samples from the run's data: its clients are the users."""
    s = self.settings
    if s.population is not None and s.population != run.population:
      raise ValueError(
        f"dp_aggregator: population={s.population} was declared but the "
        f"round's data has {run.population} clients; epsilon is accounted "
        f"for the run's population. Pass population=None (the data's "
        f"{run.population} clients), or simulate_sampling=False if the "
        "caller samples the users itself."
      )
    if s.sampling == "poisson" and run.sampling != "uniform":
      raise ValueError(
        f"dp_aggregator(sampling='poisson') needs "
        f"RoundConfig(sampling='uniform'), got sampling={run.sampling!r}: "
        "the Poisson sample is the first K slots of a uniform sample "
        "without replacement (sampling='all' takes the clients in order)."
      )
    _check_fixed_slots(s, run.clients_per_round)
    return run.population


def _check_fixed_slots(s: DpSettings, num_slots: int) -> None:
  """Fixed-size sampling is accounted for exactly ``D`` users per round."""
  if s.sampling == "fixed" and num_slots != s.denominator:
    d = s.denominator
    raise ValueError(
      f"dp_aggregator: fixed-size sampling is accounted for "
      f"clients_per_round={d:g} users per round but the round samples "
      f"{num_slots}; set RoundConfig(clients_per_round={d:g})."
    )


# ------------------------------------------------------------- device side
class _DpRound:
  """The functions of one DP aggregator (one population), run in the round.

  Accumulator: ``sum`` (the clipped updates' sum, one update's structure),
  ``unclipped`` and ``count`` (float32 counters), ``num_slots``.
  """

  def __init__(
    self,
    settings: DpSettings,
    population: int | None,
    curve: accounting.EpsilonCurve | None,
  ):
    self.s = settings
    self.population = population
    self.curve = curve
    self.sampling_rate = (
      settings.denominator / population
      if settings.poisson and population is not None
      else None
    )

  def _need_population(self) -> None:
    s = self.s
    if s.accounted and self.population is None:
      raise ValueError(
        f"dp_aggregator(population=None, sampling={s.sampling!r}) accounts "
        "the run's population: it runs once bound to a run (the Engine "
        "binds it to its data, Aggregator.bind); to run it unbound, "
        "declare population=N."
      )

  def _check_slots(self, num_slots: int) -> None:
    """Host side, at trace time: the round's slots fit the sampling."""
    if self.s.poisson:
      pop, q = self.population, self.sampling_rate
      p = accounting.overflow_probability(pop, q, num_slots)
      if p > MAX_OVERFLOW_PER_ROUND:
        raise ValueError(
          f"dp_aggregator: clients_per_round={num_slots} slots for "
          f"Poisson sampling with q={q:g} of {pop} users overflow with "
          f"probability {p:.3g} per round; expected at most "
          f"{MAX_OVERFLOW_PER_ROUND:g}. Use RoundConfig(clients_per_round="
          f"fedjax_lite.privacy.poisson_cap({pop}, {q:g}, "
          "num_rounds))."
        )
    if self.s.simulate_sampling:
      _check_fixed_slots(self.s, num_slots)

  def init_state(self, update_spec) -> DpState:
    self._need_population()
    check_float_updates(update_spec, "dp_aggregator")
    return DpState(
      clip_norm=jnp.asarray(self.s.clip, jnp.float32),
      rounds=jnp.zeros((), jnp.int32),
      sample_key=jax.random.PRNGKey(self.s.seed),
    )

  def init(self, state, update_spec, num_slots):
    del state
    self._need_population()
    self._check_slots(num_slots)
    return {
      "sum": jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), update_spec),
      "unclipped": jnp.zeros((), jnp.float32),
      "count": jnp.zeros((), jnp.float32),
      "num_slots": jnp.asarray(num_slots, jnp.float32),
    }

  def merge(self, accs):
    out = sum_over_devices(accs)
    out["num_slots"] = accs["num_slots"][0]
    return out

  def sample_size(self, state: DpState) -> jax.Array:
    """``K ~ Binomial(N, q)``: the Poisson sample's size this round."""
    return jax.random.binomial(
      state.sample_key, float(self.population), self.sampling_rate
    )

  def active_slots(self, state: DpState) -> jax.Array:
    return self.sample_size(state).astype(jnp.int32)

  def add(self, state, acc, updates, weights, valid, slots):
    part = taking_part(weights, valid)
    if self.s.poisson:
      part = part & (slots.astype(jnp.float32) < self.sample_size(state))
    if self.s.local:
      scaled = jax.tree.map(
        lambda u: jnp.where(expand(part, u.ndim), u, jnp.zeros((), u.dtype)),
        updates,
      )
      unclipped = part
    else:
      c = state.clip_norm
      norms = jax.vmap(tree_norm)(updates)  # [B]
      scale = jnp.where(
        part, jnp.minimum(1.0, c / jnp.maximum(norms, 1e-30)), 0.0
      )
      scaled = jax.tree.map(
        lambda u: (
          jnp.where(expand(part, u.ndim), u, jnp.zeros((), u.dtype))
          * expand(scale, u.ndim).astype(u.dtype)
        ),
        updates,
      )
      unclipped = part & (norms <= c)
    return {
      "sum": jax.tree.map(
        lambda a, u: a + jnp.sum(u, axis=0), acc["sum"], scaled
      ),
      "unclipped": acc["unclipped"] + jnp.sum(unclipped.astype(jnp.float32)),
      "count": acc["count"] + jnp.sum(part.astype(jnp.float32)),
      "num_slots": acc["num_slots"],
    }

  def _epsilon(self, rounds: jax.Array) -> jax.Array:
    """float32 epsilon after ``rounds``, from the host's epsilon curve."""
    return jax.pure_callback(
      lambda t: np.asarray(self.curve(int(t)), np.float32),
      jax.ShapeDtypeStruct((), jnp.float32),
      rounds,
      vmap_method="sequential",
    )

  def finalize(self, state, acc, rng):
    s, d = self.s, self.s.denominator
    k_sum, k_count, k_next = jax.random.split(rng, 3)
    c = state.clip_norm
    noised = jax.tree.map(
      jnp.add,
      acc["sum"],
      _gaussian_like(k_sum, acc["sum"], s.sum_multiplier * c),
    )
    mean = jax.tree.map(lambda a: a / jnp.asarray(d, a.dtype), noised)
    n = acc["count"]
    b_noised = (
      acc["unclipped"] + s.count_stddev * jax.random.normal(k_count)
    ) / d
    new_clip = (
      c * jnp.exp(-s.learning_rate * (b_noised - s.target_quantile))
      if s.adaptive
      else c
    )
    rounds = state.rounds + 1
    metrics = {
      "dp_clip_norm": c,
      "dp_clipped_fraction": jnp.where(
        n > 0, 1.0 - acc["unclipped"] / jnp.maximum(n, 1.0), 0.0
      ),
      "dp_participants": n,
      "dp_noise_std": jnp.asarray(s.sum_multiplier, jnp.float32) * c / d,
    }
    if s.adaptive:
      metrics["dp_unclipped_noised"] = b_noised
    if s.poisson:
      metrics["dp_overflow"] = (
        self.sample_size(state) > acc["num_slots"]
      ).astype(jnp.float32)
    if self.curve is not None:
      metrics["dp_epsilon"] = self._epsilon(rounds)
    new_state = DpState(
      clip_norm=new_clip.astype(jnp.float32),
      rounds=rounds,
      sample_key=k_next,
    )
    return AggregatorOutput(
      mean=mean, total_weight=jnp.asarray(d, jnp.float32), metrics=metrics
    ), new_state


def dp_aggregator(
  noise_multiplier: float,
  clients_per_round: float,
  clip: float = 1.0,
  adaptive: bool = False,
  *,
  target_quantile: float = 0.5,
  learning_rate: float = 0.2,
  clipped_count_stddev: float | None = None,
  sampling: str | None = None,
  population: int | None = None,
  delta: float | None = None,
  accountant: str = "rdp",
  local: bool = False,
  simulate_sampling: bool = True,
  seed: int = 0,
) -> Aggregator:
  """The DP-FedAvg aggregator (module docstring): clip, noise, fixed mean.

  Streaming: memory one update per device and run, plus three counters.

  With accounting (``sampling`` or ``delta`` given) the aggregator has a
  ``bind`` (:attr:`~fedjax_lite.aggregators.Aggregator.bind`): the engine
  binds it to the run's population and ``RoundConfig``, and the bound
  aggregator accounts the run's population and refuses a round the
  accountant does not model (see "Epsilon is derived from the run" in the
  module docstring).

  Args:
    noise_multiplier: ``z >= 0`` (adaptive: the effective multiplier, split
      between the sum and the clipped count); 0 = no noise.
    clients_per_round: the fixed denominator ``D`` = expected users per
      round (``q N`` for Poisson sampling), > 0.
    clip: ``C > 0`` (the initial ``C_0`` if adaptive).
    adaptive: adaptive clipping towards ``target_quantile``.
    target_quantile: ``gamma`` in [0, 1] (adaptive).
    learning_rate: ``eta_C >= 0`` of the geometric clip update (adaptive).
    clipped_count_stddev: ``sigma_b`` (adaptive); default ``D / 20``.
    sampling: ``"poisson"``, ``"fixed"`` or None (no accounting); see the
      module docstring.
    population: ``N``, the number of users. None (default): the run's
      number of clients, taken when the engine binds the aggregator (an
      unbound aggregator then cannot run). A declared ``N`` must equal the
      run's (``ValueError`` naming both otherwise) and lets the aggregator
      run unbound too. With ``simulate_sampling=False`` the round's data is
      the caller's sample, not the population: accounting then needs ``N``.
    delta: report ``dp_epsilon`` at this delta every round (needs
      ``sampling``).
    accountant: ``"rdp"`` or ``"pld"`` for ``dp_epsilon``.
    local: local DP: the clients already clipped and noised their updates
      (:func:`with_local_dp`); the server neither clips nor adds noise.
    simulate_sampling: with ``sampling="poisson"``, draw ``K`` and mask the
      slots ``>= K`` (False when the caller already sampled the users, as in
      :func:`build_dp_fed_avg_process`).
    seed: seeds the first round's ``K`` (later rounds use the round's key).

  Raises:
    ValueError: for bad arguments here; from ``bind`` (when the engine
      traces a round) for a declared ``population`` that is not the run's,
      ``RoundConfig(sampling="weighted")`` or ``RoundConfig(replace=True)``
      with accounting, ``sampling="poisson"`` without
      ``RoundConfig(sampling="uniform")``, or ``sampling="fixed"`` with
      another ``clients_per_round`` than the round's.
  """
  settings = dp_settings(
    noise_multiplier,
    clients_per_round,
    clip,
    adaptive,
    target_quantile=target_quantile,
    learning_rate=learning_rate,
    clipped_count_stddev=clipped_count_stddev,
    sampling=sampling,
    population=population,
    delta=delta,
    accountant=accountant,
    local=local,
    simulate_sampling=simulate_sampling,
    seed=seed,
  )
  return DpProtocol(settings).aggregator(population)


def with_local_dp(
  algorithm: FederatedAlgorithm, noise_multiplier: float, clip: float
) -> FederatedAlgorithm:
  r"""Each client clips its update and adds Gaussian noise before upload.

  .. math:: u_k \mapsto u_k \min(1, C / \|u_k\|_2) + \mathcal N(0, z^2 C^2 I)

  drawn with the client's own key (split from its round key). Pair with
  ``dp_aggregator(..., local=True)``, which sums with the fixed denominator
  and adds nothing.
  """
  z = accounting.check_noise_multiplier(noise_multiplier)
  c = accounting.check_clip(clip)
  inner = algorithm

  def client_update(broadcast, client_state, data, rng):
    k_inner, k_noise = jax.random.split(rng)
    out = inner.client_update(broadcast, client_state, data, k_inner)
    bounded = clip_by_norm(out.update, c)
    noise = _gaussian_like(k_noise, bounded, z * c)
    return out._replace(update=jax.tree.map(jnp.add, bounded, noise))

  return algorithm._replace(
    client_update=client_update, name=f"{inner.name}+local_dp(z={z:g},C={c:g})"
  )


def dp_fed_avg(
  model: Model,
  client_optimizer: optax.GradientTransformation,
  server_optimizer: optax.GradientTransformation | None = None,
  *,
  noise_multiplier: float,
  clients_per_round: float,
  clip: float = 1.0,
  adaptive: bool = False,
  local: bool = False,
  name: str = "dp_fed_avg",
  **aggregator_kw,
) -> FederatedAlgorithm:
  """FedAvg/FedOpt whose aggregation is :func:`dp_aggregator`.

  ``local=True`` also wraps the clients with :func:`with_local_dp`. Other
  keywords (``sampling``, ``population``, ``delta``, ``accountant``,
  ``target_quantile``, ...) go to :func:`dp_aggregator`.
  """
  agg = dp_aggregator(
    noise_multiplier,
    clients_per_round,
    clip,
    adaptive,
    local=local,
    **aggregator_kw,
  )
  alg = fed_avg(model, client_optimizer, server_optimizer)
  if local:
    alg = with_local_dp(alg, noise_multiplier, clip)
  return alg._replace(aggregator=agg, name=name)


def poisson_sample(
  seed: int, population: int, sampling_rate: float
) -> np.ndarray:
  """Host-side Poisson sample: indices of the users that join (each with
  probability ``sampling_rate``, independently), for TFF-style processes."""
  n = checks.positive_int("population", population)
  q = accounting.check_sampling_rate(sampling_rate)
  rng = np.random.default_rng(seed)
  return np.flatnonzero(rng.random(n) < q)
