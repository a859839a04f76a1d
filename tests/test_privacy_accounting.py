"""Privacy accounting: the epsilon the project reports equals dp-accounting's own
computation for the same mechanism (built independently here), calibration,
the Poisson slot cap, and clear errors for bad input."""

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld, rdp
from scipy import stats

from fedjax_lite import checks, privacy
from fedjax_lite.privacy import accounting

N, M, DELTA = 1000, 40, 1e-5


def reference_epsilon(event, relation, delta, kind):
  acc = (
    rdp.RdpAccountant(neighboring_relation=relation)
    if kind == "rdp"
    else pld.PLDAccountant(neighboring_relation=relation)
  )
  acc.compose(event)
  return acc.get_epsilon(delta)


def poisson_event(q, z, rounds):
  return dp_accounting.SelfComposedDpEvent(
    dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)),
    rounds,
  )


ADD_REMOVE = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
REPLACE_ONE = dp_accounting.NeighboringRelation.REPLACE_ONE


@pytest.mark.parametrize(
  "kind,rounds", [("rdp", 1), ("rdp", 50), ("rdp", 1000), ("pld", 10)]
)
def test_poisson_epsilon_equals_dp_accounting(kind, rounds):
  z = 1.1
  mech = privacy.DpMechanism(z, "poisson", N, clients_per_round=M)
  assert mech.sampling_rate == M / N
  ours = privacy.epsilon(mech, rounds, DELTA, kind)
  ref = reference_epsilon(
    poisson_event(M / N, z, rounds), ADD_REMOVE, DELTA, kind
  )
  assert abs(ours - ref) <= 1e-6, (ours, ref)
  # The per-round curve reports the same numbers.
  curve = privacy.EpsilonCurve(mech, DELTA, kind)
  assert abs(curve(rounds) - ref) <= 1e-6


def test_rdp_curve_equals_fresh_accountant_every_round():
  mech = privacy.DpMechanism(0.8, "poisson", N, sampling_rate=0.02)
  curve = privacy.EpsilonCurve(mech, DELTA, "rdp").curve(12)
  ref = [
    reference_epsilon(poisson_event(0.02, 0.8, t), ADD_REMOVE, DELTA, "rdp")
    for t in range(1, 13)
  ]
  np.testing.assert_allclose(curve, ref, rtol=0, atol=1e-6)
  assert np.all(np.diff(curve) > 0)


@pytest.mark.parametrize("rounds", [1, 20, 200])
def test_fixed_size_epsilon_equals_dp_accounting(rounds):
  # m of N without replacement, replace-one users: the clipped sum moves by
  # up to 2C, so noise std z*C is multiplier z/2 of the sensitivity.
  z = 1.5
  mech = privacy.DpMechanism(z, "fixed", N, clients_per_round=M)
  ours = privacy.epsilon(mech, rounds, DELTA, "rdp")
  event = dp_accounting.SelfComposedDpEvent(
    dp_accounting.SampledWithoutReplacementDpEvent(
      N, M, dp_accounting.GaussianDpEvent(z / 2)
    ),
    rounds,
  )
  ref = reference_epsilon(event, REPLACE_ONE, DELTA, "rdp")
  assert abs(ours - ref) <= 1e-6, (ours, ref)
  assert abs(privacy.EpsilonCurve(mech, DELTA)(rounds) - ref) <= 1e-6


def test_fixed_size_pld_is_a_clear_error():
  mech = privacy.DpMechanism(1.0, "fixed", N, clients_per_round=M)
  with pytest.raises(ValueError, match="PLD.*SampledWithoutReplacement"):
    privacy.epsilon(mech, 10, DELTA, "pld")


@pytest.mark.parametrize("kind", ["rdp", "pld"])
def test_local_dp_epsilon_is_a_per_user_gaussian(kind):
  z, rounds = 8.0, 25
  mech = privacy.DpMechanism(z, "local", N)
  ours = privacy.epsilon(mech, rounds, DELTA, kind)
  event = dp_accounting.SelfComposedDpEvent(
    dp_accounting.GaussianDpEvent(z / 2), rounds
  )
  ref = reference_epsilon(event, ADD_REMOVE, DELTA, kind)
  assert abs(ours - ref) <= 1e-6
  # No amplification: the same noise with Poisson sampling is far cheaper.
  central = privacy.epsilon(
    privacy.DpMechanism(z, "poisson", N, clients_per_round=M),
    rounds,
    DELTA,
    kind,
  )
  assert central < ours


def test_no_noise_is_infinite_epsilon():
  mech = privacy.DpMechanism(0.0, "poisson", N, clients_per_round=M)
  assert math.isinf(privacy.epsilon(mech, 3, DELTA))
  assert math.isinf(privacy.EpsilonCurve(mech, DELTA)(3))


@pytest.mark.parametrize(
  "kind,rounds", [("rdp", 100), pytest.param("pld", 5, marks=pytest.mark.slow)]
)
def test_calibration_meets_the_target(kind, rounds):
  target = 2.0
  z = privacy.calibrate_noise_multiplier(
    target,
    DELTA,
    rounds,
    population=N,
    clients_per_round=M,
    accountant=kind,
    tol=1e-4,
  )
  mech = lambda v: privacy.DpMechanism(v, "poisson", N, clients_per_round=M)
  eps = privacy.epsilon(mech(z), rounds, DELTA, kind)
  assert eps <= target
  # Smallest such z (up to the tolerance): a little less noise overshoots.
  assert privacy.epsilon(mech(z - 2e-3), rounds, DELTA, kind) > target
  assert eps > target - 0.02


@pytest.mark.slow
def test_calibration_fixed_size():
  z = privacy.calibrate_noise_multiplier(
    4.0, DELTA, 50, sampling="fixed", population=N, clients_per_round=M
  )
  mech = privacy.DpMechanism(z, "fixed", N, clients_per_round=M)
  assert 3.95 < privacy.epsilon(mech, 50, DELTA) <= 4.0


def test_poisson_cap_bounds_overflow():
  q, rounds = 0.03, 500
  cap = privacy.poisson_cap(N, q, rounds, max_overflow=1e-9)
  per_round = stats.binom.sf(cap, N, q)
  assert rounds * per_round <= 1e-9
  assert rounds * stats.binom.sf(cap - 1, N, q) > 1e-9  # the fewest slots
  assert privacy.overflow_probability(N, q, cap) == pytest.approx(per_round)
  extra = privacy.truncation_delta(2.0, rounds, N, q, cap)
  assert extra == pytest.approx((1 + math.exp(2.0)) * rounds * per_round)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
  "kwargs,pattern",
  [
    (dict(noise_multiplier=-0.5), r"noise_multiplier must be .*>= 0.*-0\.5"),
    (dict(sampling_rate=1.5), r"sampling_rate must be in \(0, 1\].*1\.5"),
    (dict(sampling_rate=0.0), r"sampling_rate must be in \(0, 1\].*0\.0"),
    (dict(sampling="random"), r"sampling must be one of .*'random'"),
  ],
)
def test_mechanism_bad_input(kwargs, pattern):
  args = dict(
    noise_multiplier=1.0, sampling="poisson", population=N, sampling_rate=0.1
  )
  args.update(kwargs)
  with pytest.raises(ValueError, match=pattern):
    privacy.DpMechanism(**args)


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 2.0])
def test_delta_outside_0_1(delta):
  mech = privacy.DpMechanism(1.0, "poisson", N, sampling_rate=0.1)
  with pytest.raises(
    ValueError,
    match=rf"delta must be in \(0, 1\).*"
    rf"{delta!r}",
  ):
    privacy.epsilon(mech, 10, delta)
  with pytest.raises(ValueError, match=r"delta must be in \(0, 1\)"):
    privacy.calibrate_noise_multiplier(
      1.0, delta, 10, population=N, sampling_rate=0.1
    )


def test_unreachable_target_epsilon():
  with pytest.raises(
    ValueError,
    match=r"target_epsilon=0\.0001 is not "
    r"reachable.*max_noise_multiplier.*epsilon=.*Expected a "
    r"target >=",
  ):
    privacy.calibrate_noise_multiplier(
      1e-4,
      DELTA,
      1000,
      population=100,
      sampling_rate=1.0,
      max_noise_multiplier=100.0,
    )


def test_calibration_bad_input():
  with pytest.raises(ValueError, match=r"sampling_rate must be in \(0, 1\]"):
    privacy.calibrate_noise_multiplier(
      1.0, DELTA, 10, population=N, sampling_rate=1.2
    )
  with pytest.raises(ValueError, match=r"target_epsilon must be .*> 0.*-1"):
    privacy.calibrate_noise_multiplier(
      -1, DELTA, 10, population=N, sampling_rate=0.1
    )
  with pytest.raises(ValueError, match=r"num_rounds must be a positive int"):
    privacy.calibrate_noise_multiplier(
      1.0, DELTA, 0, population=N, sampling_rate=0.1
    )


def test_check_helpers_name_argument_value_and_expectation():
  with pytest.raises(
    ValueError,
    match=r"clip must be a finite L2 norm > 0, "
    r"got 0\.0",
  ):
    accounting.check_clip(0.0)
  with pytest.raises(ValueError, match=r"clip must be .* > 0, got -2\.0"):
    accounting.check_clip(-2.0)
  with pytest.raises(
    TypeError,
    match=r"noise_multiplier must be a real "
    r"number, got str",
  ):
    accounting.check_noise_multiplier("1")


def test_shared_number_checks_name_argument_value_and_expectation():
  """The checks the accounting helpers are built on (fedjax_lite.checks)."""
  assert checks.real("x", np.float32(0.5)) == 0.5
  assert checks.real("x", np.asarray(3)) == 3.0
  with pytest.raises(TypeError, match=r"x must be a real number, got bool"):
    checks.real("x", True)
  with pytest.raises(ValueError, match=r"x must be a number, got nan"):
    checks.real("x", float("nan"))
  assert checks.in_range("q", 1, 0, 1, low_open=True, high_open=False) == 1.0
  with pytest.raises(
    ValueError, match=r"q must be a number in \(0, 1\], got 0"
  ):
    checks.in_range("q", 0, 0, 1, low_open=True, high_open=False)
  with pytest.raises(
    ValueError, match=r"t must be a finite number > 0, got inf"
  ):
    checks.in_range("t", math.inf, 0, math.inf, low_open=True)
  with pytest.raises(TypeError, match=r"q must be a real number, got list"):
    checks.in_range("q", [0.5], 0, 1)
  with pytest.raises(
    ValueError, match=r"tau must be a positive finite number \(a radius\)"
  ):
    checks.positive_float("tau", 0.0, hint=" (a radius)")
  assert checks.positive_float("eps", 0, allow_zero=True) == 0.0
  with pytest.raises(ValueError, match=r"eps must be a non-negative finite"):
    checks.positive_float("eps", -1e-9, allow_zero=True)
  with pytest.raises(TypeError, match=r"^d must be a str or int, got float\.$"):
    checks.instance_of("d", 1.5, (str, int))


def test_poisson_cap_checks_max_overflow():
  assert privacy.poisson_cap(20, 0.5, 3, max_overflow=0.0) == 20
  with pytest.raises(
    ValueError, match=r"max_overflow must be a number in \[0, 1\], got -1"
  ):
    privacy.poisson_cap(20, 0.5, 3, max_overflow=-1)
