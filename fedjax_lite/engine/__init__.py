"""The vectorized round engine and federated evaluation."""

from fedjax_lite.engine.evaluation import EvalResult, evaluate
from fedjax_lite.engine.round import (AXIS, Engine, EngineState, RoundConfig,
                                      auto_block_size, default_mesh,
                                      finalize_metrics)
