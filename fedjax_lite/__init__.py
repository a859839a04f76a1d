"""fedjax_lite: a JAX-accelerated, vectorized federated-learning research engine.

Client training is written for ONE client, vmapped over blocks of clients and
streamed through ``lax.scan``; sampling, gathering, local training, aggregation
and the server update run in one jitted round.

On import, when JAX's CPU backend is not initialised yet, the package applies
its fast CPU settings (one XLA host device per core, single-threaded kernels;
see :mod:`fedjax_lite.runtime`). Set ``FEDJAX_LITE_CPU_TUNING=0`` to opt out.
"""

from fedjax_lite import runtime as _runtime

_runtime.auto_configure()

# pylint: disable=g-import-not-at-top,wrong-import-position
from fedjax_lite import aggregators
from fedjax_lite import algorithms
from fedjax_lite import attacks
from fedjax_lite import checks
from fedjax_lite import compression
from fedjax_lite import data
from fedjax_lite import datasets
from fedjax_lite import engine
from fedjax_lite import experiment
from fedjax_lite import hetero
from fedjax_lite import learning
from fedjax_lite import models
from fedjax_lite import privacy
from fedjax_lite import vertical
from fedjax_lite.algorithms import (
  Aggregate,
  ClientOutput,
  FederatedAlgorithm,
  fed_avg,
)
from fedjax_lite.data import ClientData, DeviceData, FederatedDataset, LocalWork
from fedjax_lite.engine import (
  Engine,
  EngineState,
  EvalResult,
  NonFiniteUpdateError,
  RoundConfig,
  evaluate,
)
from fedjax_lite.models import Model
from fedjax_lite.runtime import configure_cpu

__version__ = "0.1.0"
