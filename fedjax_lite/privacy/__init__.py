"""Privacy: user-level differential privacy and secure aggregation.

Layer: beside ``aggregators/`` (imports ``aggregators/``, ``algorithms/``,
``data/``, ``models/``); the engine and ``learning.py`` may import it.

* :func:`dp_aggregator`, :func:`dp_fed_avg`, :func:`with_local_dp`: DP-FedAvg
  with fixed or adaptive
  clipping, Poisson or fixed-size sampling, central or local noise
  (:mod:`fedjax_lite.privacy.dp`, which states what the simulation
  guarantees and what it does not).
* :class:`DpMechanism`, :func:`epsilon`, :class:`EpsilonCurve`,
  :func:`calibrate_noise_multiplier`, :func:`poisson_cap`: accounting with
  dp-accounting (:mod:`fedjax_lite.privacy.accounting`).
* :func:`secure_aggregator`, :class:`SecAggRound`: SecAgg / SecAgg+
  (:mod:`fedjax_lite.privacy.secure_aggregation`).

TFF-style entry points: ``fedjax_lite.learning.dp_aggregator``,
``secure_aggregator`` and ``build_dp_fed_avg_process``.
"""

from fedjax_lite import _lazy

# Imported at first use (PEP 562): see fedjax_lite/_lazy.py.
__getattr__, __dir__, __all__ = _lazy.attach(
  __name__,
  {
    "accounting": (
      "DpMechanism",
      "EpsilonCurve",
      "calibrate_noise_multiplier",
      "epsilon",
      "overflow_probability",
      "poisson_cap",
      "truncation_delta",
    ),
    "dp": (
      "DpState",
      "dp_aggregator",
      "dp_fed_avg",
      "poisson_sample",
      "sum_noise_multiplier",
      "with_local_dp",
    ),
    "secure_aggregation": (
      "SecAggError",
      "SecAggRound",
      "dropped_clients",
      "harary_graph",
      "secagg_plus_degree",
      "secure_aggregator",
    ),
    "shamir": (),
  },
)
