"""The vectorized round engine, its debug mode and federated evaluation.

The round's stages are the functions of :mod:`fedjax_lite.engine.stages`;
:mod:`fedjax_lite.engine.blocks` runs them as one jitted round (vmapped
blocks, sharded over devices) and :mod:`fedjax_lite.engine.debug` client by
client in Python; :mod:`fedjax_lite.engine.time_aware` runs rounds on a
simulated clock (deadlines, FedBuff, FedAsync).
"""

from fedjax_lite.engine import stages, time_aware
from fedjax_lite.engine.debug import StageError, debug_round
from fedjax_lite.engine.evaluation import EvalResult, evaluate
from fedjax_lite.engine.plan import (
  BlockPlan,
  check_materialized_memory,
  device_memory_bytes,
)
from fedjax_lite.engine.round import (
  AXIS,
  Engine,
  EngineState,
  NonFiniteUpdateError,
  RoundConfig,
  auto_block_size,
  client_keys,
  default_mesh,
  finalize_metrics,
  round_keys,
)

__all__ = [
  "AXIS",
  "BlockPlan",
  "Engine",
  "EngineState",
  "EvalResult",
  "NonFiniteUpdateError",
  "RoundConfig",
  "StageError",
  "auto_block_size",
  "check_materialized_memory",
  "client_keys",
  "debug_round",
  "default_mesh",
  "device_memory_bytes",
  "evaluate",
  "finalize_metrics",
  "round_keys",
  "stages",
  "time_aware",
]
