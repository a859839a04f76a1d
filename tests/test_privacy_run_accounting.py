"""dp_aggregator's epsilon is derived from the run (Aggregator.bind): the
engine's data gives the population and RoundConfig the sampling, not values
declared beside them. Set-ups the accountant does not model are refused,
also through wrapper aggregators (clipped, omniscient attacks), and the
reference epsilons are computed here with dp-accounting directly."""

import dp_accounting
import jax
import numpy as np
import optax
import pytest
from dp_accounting import rdp

import fedjax_lite as fl
import reference as ref
from fedjax_lite import aggregators, attacks, privacy

N = 6  # clients of the dataset
D_IN, K = 4, 3
Z, DELTA, ROUNDS = 1.1, 1e-3, 3
MODEL = fl.models.logistic_regression(D_IN, K)
ADD_REMOVE = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
REPLACE_ONE = dp_accounting.NeighboringRelation.REPLACE_ONE


def dataset():
  return fl.FederatedDataset.from_clients(
    ref.logreg_clients([3, 4, 5, 6, 7, 8], 0, D_IN, K)
  )


def dp(clients_per_round, sampling, population=None, **kw):
  return privacy.dp_aggregator(
    Z,
    clients_per_round,
    clip=1.0,
    sampling=sampling,
    population=population,
    delta=DELTA,
    **kw,
  )


def setup(aggregator, mesh, attack=None, **round_kw):
  """An engine over the 6-client dataset: ``(engine, state, data)``; the
  state is made before the data is uploaded, its aggregator state deferred
  to the first round (``defer_aggregator``), so the engine binds the
  aggregator when the first round is traced. (``init`` with the data binds
  it there, with the same errors.)"""
  alg = fl.fed_avg(MODEL, optax.sgd(0.1), aggregator=aggregator)
  if attack is not None:
    alg = attacks.with_attack(alg, attack, attacks.byzantine_mask(N, 1 / 3))
  cfg = fl.RoundConfig(local_work=fl.LocalWork(batch_size=4), **round_kw)
  eng = fl.Engine(alg, cfg, mesh)
  state = eng.init(
    MODEL.init(jax.random.PRNGKey(0)),
    seed=0,
    num_clients=N,
    defer_aggregator=True,
  )
  return eng, state, eng.put_data(dataset())


def reference_epsilons(round_event, relation):
  """dp-accounting's RDP epsilon after 1..ROUNDS rounds of ``round_event``."""
  out = []
  for t in range(1, ROUNDS + 1):
    acc = rdp.RdpAccountant(neighboring_relation=relation)
    acc.compose(dp_accounting.SelfComposedDpEvent(round_event, t))
    out.append(acc.get_epsilon(DELTA))
  return np.asarray(out)


POISSON_EVENT = dp_accounting.PoissonSampledDpEvent(
  2 / N, dp_accounting.GaussianDpEvent(Z)
)
FIXED_EVENT = dp_accounting.SampledWithoutReplacementDpEvent(
  N, 3, dp_accounting.GaussianDpEvent(Z / 2)
)
MISMATCH = r"population=10000 was declared but the round's data has 6 clients"


@pytest.mark.parametrize("sampling", ["fixed", "poisson"])
def test_declared_population_must_be_the_datas(sampling, one_device_mesh):
  m = 3 if sampling == "fixed" else N
  eng, state, data = setup(
    dp(3, sampling, population=10_000), one_device_mesh, clients_per_round=m
  )
  with pytest.raises(ValueError, match=MISMATCH):
    eng.round(state, data)


@pytest.mark.parametrize(
  "sampling,m,event,relation",
  [
    # Poisson: 2 expected users of the run's 6, a cap of every client.
    ("poisson", 2, POISSON_EVENT, ADD_REMOVE),
    ("fixed", 3, FIXED_EVENT, REPLACE_ONE),
  ],
)
def test_epsilon_is_accounted_for_the_runs_population(
  sampling, m, event, relation, one_device_mesh
):
  eng, state, data = setup(
    dp(m, sampling), one_device_mesh, clients_per_round=m if m == 3 else N
  )
  _, hist = eng.run(state, data, ROUNDS)
  want = reference_epsilons(event, relation)
  got = np.asarray(hist["dp_epsilon"], np.float64)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # What the declared 10,000 users would have reported is far smaller.
  assert want[-1] > 3 * float(
    privacy.EpsilonCurve(
      privacy.DpMechanism(Z, sampling, 10_000, clients_per_round=m), DELTA
    )(ROUNDS)
  )


@pytest.mark.parametrize("population", [None, N])
@pytest.mark.parametrize("sampling", ["fixed", "poisson"])
def test_weighted_sampling_is_refused(sampling, population, one_device_mesh):
  eng, state, data = setup(
    dp(3, sampling, population),
    one_device_mesh,
    clients_per_round=3,
    sampling="weighted",
  )
  with pytest.raises(
    ValueError,
    match=r"^dp_aggregator cannot account RoundConfig\(sampling='weighted'\)",
  ):
    eng.round(state, data)


# (Not parametrized by the refused sampling above: the run is the same.)
@pytest.mark.parametrize("population", [None, N])
def test_weighted_sampling_without_accounting_is_allowed(
  population, one_device_mesh
):
  # Without accounting any run is allowed.
  plain = privacy.dp_aggregator(Z, 3, clip=1.0, population=population)
  eng, state, data = setup(
    plain, one_device_mesh, clients_per_round=3, sampling="weighted"
  )
  _, metrics = eng.round(state, data)
  assert "dp_epsilon" not in metrics


@pytest.mark.parametrize("population", [None, N])
def test_sampling_with_replacement_is_refused(population, one_device_mesh):
  eng, state, data = setup(
    dp(3, "fixed", population),
    one_device_mesh,
    clients_per_round=3,
    replace=True,
  )
  with pytest.raises(
    ValueError,
    match=r"^dp_aggregator cannot account RoundConfig\(replace=True\)",
  ):
    eng.round(state, data)


def test_poisson_needs_a_uniform_sample(one_device_mesh):
  eng, state, data = setup(
    dp(2, "poisson", N), one_device_mesh, clients_per_round=N, sampling="all"
  )
  with pytest.raises(
    ValueError,
    match=r"sampling='poisson'\) needs RoundConfig\(sampling='uniform'\), "
    r"got sampling='all'",
  ):
    eng.round(state, data)


def test_clipped_and_attack_wrappers_bind_the_inner_aggregator(
  one_device_mesh,
):
  wrappers = {
    "clipped": (lambda inner: aggregators.clipped(inner, 0.5), None),
    "attack": (lambda inner: inner, attacks.alie()),
  }
  for wrap, attack in wrappers.values():
    eng, state, data = setup(
      wrap(dp(3, "fixed", population=10_000)),
      one_device_mesh,
      attack,
      clients_per_round=3,
    )
    with pytest.raises(ValueError, match=MISMATCH):
      eng.round(state, data)
  # Population from the run: the bound aggregator is still wrapped.
  want = reference_epsilons(FIXED_EVENT, REPLACE_ONE)
  for key, (wrap, attack) in wrappers.items():
    eng, state, data = setup(
      wrap(dp(3, "fixed")), one_device_mesh, attack, clients_per_round=3
    )
    bound = eng.aggregator_for(data)
    _, metrics = eng.round(state, data)
    assert float(metrics["dp_epsilon"]) == pytest.approx(want[0], rel=1e-6)
    if key == "clipped":
      assert bound.name.startswith("clipped(")
      assert float(metrics["clip_norm"]) == 0.5
    else:
      assert bound.name.startswith("alie(") and bound.materialized
      assert float(metrics["byzantine_slots"]) >= 0


def test_wrappers_keep_the_inner_check_output(one_device_mesh):
  def refuse(metrics):
    raise ValueError(f"inner refused a round of {len(metrics)} metrics")

  inner = aggregators.weighted_mean()._replace(check_output=refuse)
  for agg, attack in [
    (aggregators.clipped(inner, 1.0), None),
    (inner, attacks.alie()),
  ]:
    eng, state, data = setup(agg, one_device_mesh, attack, clients_per_round=3)
    with pytest.raises(ValueError, match="inner refused a round"):
      eng.round(state, data)


def test_process_checks_its_clients_against_the_declared_population(
  one_device_mesh,
):
  clients = ref.logreg_clients([4, 5, 6, 7], 1, D_IN, K)

  def process(**kw):
    return fl.learning.build_dp_fed_avg_process(
      MODEL,
      lambda: optax.sgd(0.1),
      noise_multiplier=Z,
      clip=1.0,
      delta=DELTA,
      batch_size=4,
      mesh=one_device_mesh,
      **kw,
    )

  # Fixed-size sampling is accounted for 3 users: 4 given is refused.
  fixed = process(clients_per_round=3, sampling="fixed", population=N)
  with pytest.raises(
    ValueError,
    match=r"accounted for clients_per_round=3 users per round but the "
    r"round is given 4 clients",
  ):
    fixed.next(fixed.initialize(), clients)
  # More clients than the declared population.
  poisson = process(clients_per_round=1, sampling="poisson", population=3)
  with pytest.raises(
    ValueError, match=r"trains 4 clients, more than the declared population=3"
  ):
    poisson.next(poisson.initialize(), clients)
  # The process only sees the sample: the population must be declared.
  with pytest.raises(ValueError, match=r"simulate_sampling=False.*population"):
    process(clients_per_round=3, sampling="fixed")
  # Consistent: epsilon of the declared population.
  _, metrics = fixed.next(fixed.initialize(), clients[:3])
  assert metrics["dp_epsilon"] == pytest.approx(
    reference_epsilons(FIXED_EVENT, REPLACE_ONE)[0], rel=1e-6
  )
