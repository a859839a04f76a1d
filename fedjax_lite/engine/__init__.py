"""The vectorized round engine, its debug mode and federated evaluation."""

from fedjax_lite.engine.debug import debug_round
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
  "auto_block_size",
  "check_materialized_memory",
  "client_keys",
  "debug_round",
  "default_mesh",
  "device_memory_bytes",
  "evaluate",
  "finalize_metrics",
  "round_keys",
]
