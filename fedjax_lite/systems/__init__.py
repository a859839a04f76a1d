"""Systems behaviour of cross-device clients on a simulated clock.

Layer: depends on jax and numpy only (never ``engine/`` or ``algorithms/``).

:mod:`~fedjax_lite.systems.behaviour`: a seeded, jittable model of client
speeds, network delays, availability (diurnal or traces) and dropout.
:mod:`~fedjax_lite.systems.reference`: an event-driven float64 reference of
synchronous rounds with over-selection and a deadline (Bonawitz et al. 2019),
FedBuff (Nguyen et al. 2022) and FedAsync (Xie et al. 2019). The jitted
engine's rounds on this clock are :mod:`fedjax_lite.engine.time_aware`.
"""

from fedjax_lite.systems.behaviour import (
  AlwaysAvailable,
  ClientBehaviour,
  Constant,
  Diurnal,
  LogLogistic,
  LogNormal,
  Pareto,
  SlotTrace,
  TaskTimes,
  WindowTrace,
  task_key,
)
from fedjax_lite.systems.reference import (
  AsyncResult,
  Population,
  ServerStep,
  SyncRound,
  client_seed,
  constant,
  fed_async,
  fedbuff,
  fedbuff_staleness,
  from_behaviour,
  hinge,
  polynomial,
  synchronous,
)
