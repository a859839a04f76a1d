"""fedjax_lite: a JAX-accelerated, vectorized federated-learning research engine.

Client training is written for ONE client, vmapped over blocks of clients and
streamed through ``lax.scan``; sampling, gathering, local training, aggregation
and the server update run in one jitted round.

On import, when JAX's CPU backend is not initialised yet, the package applies
its fast CPU settings (one XLA host device per core, single-threaded kernels;
see :mod:`fedjax_lite.runtime`). Set ``FEDJAX_LITE_CPU_TUNING=0`` to opt out.

Subpackages and the names below are imported at first use (``fl.Engine``,
``fl.privacy``), so ``import fedjax_lite`` and a FedAvg run load only the
core; the extras (``privacy``, ``vertical``, ``data``, ``hetero``,
``experiment``) import their libraries when first used, or name the
``pip install "fedjax_lite[...]"`` that provides them.
"""

from fedjax_lite import _lazy
from fedjax_lite import runtime as _runtime

_runtime.auto_configure()

__version__ = "0.1.0"

__getattr__, __dir__, __all__ = _lazy.attach(
  __name__,
  {
    "aggregators": (),
    "algorithms": (
      "Aggregate",
      "ClientOutput",
      "FederatedAlgorithm",
      "fed_avg",
    ),
    "attacks": (),
    "checks": (),
    "compression": (),
    "data": ("ClientData", "DeviceData", "FederatedDataset", "LocalWork"),
    "datasets": (),
    "distributed": (),
    "engine": (
      "Engine",
      "EngineState",
      "EvalResult",
      "NonFiniteUpdateError",
      "RoundConfig",
      "evaluate",
    ),
    "experiment": (),
    "flower": (),
    "hetero": (),
    "learning": (),
    "models": ("Model",),
    "privacy": (),
    "runtime": ("configure_cpu",),
    "systems": (),
    "vertical": (),
  },
)
