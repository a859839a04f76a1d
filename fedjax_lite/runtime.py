"""Process-level XLA settings that make small-GEMM federated rounds fast on CPU.

Client GEMMs are tiny (a batch of 10 examples), so XLA's default CPU runtime
spends more time synchronising its worker threads than doing arithmetic. The
engine is instead fastest when every core is its own XLA host device, the client
axis is sharded over those devices, and each device computes single-threaded.

These settings only act before JAX initialises its CPU backend (the first call
that touches a device). ``import fedjax_lite`` applies them by default when the
backend is not yet initialised; set the environment variable
``FEDJAX_LITE_CPU_TUNING=0`` to opt out, or call :func:`configure_cpu`
yourself (before any JAX computation) to choose the device count.

What is set:

* ``jax_num_cpu_devices = <usable cores>``: one host device per core, so the
  engine's sharded client axis runs one stream of clients per core.
* ``--xla_cpu_experimental_ynn_fusion_type=-reduce``: stops XLA from farming out
  tiny reductions to its thread pool (measured: the main source of cross-thread
  synchronisation in a client step).
* ``--xla_cpu_multi_thread_eigen=false``: single-threaded Eigen kernels.

Memory-lean mode (``FEDJAX_LITE_LIBRARY_FUSIONS=0`` or
``configure_cpu(library_fusions=False)``): no YNNPACK library fusions at all
(``--xla_cpu_experimental_ynn_fusion_type=``). In jaxlib 0.10.2 a computation
sharded over several CPU devices holds on to ~3 KB per YNN matmul call until
it ends, so memory grows with the local steps in ONE round (or in the rounds
of one ``Engine.run``): measured +1.1 GB over 900 LSTM-sized gradient steps,
~11 GB in one full Shakespeare round, ~1.8 MB per mlp100 round. The lean mode
keeps memory flat but runs large matmuls as Eigen kernels: an LSTM-256 round
took 2.2x as long, mlp100 ~5% longer, logistic regression about the same.
Use it for long rounds on machines with little memory.
"""

from __future__ import annotations

import os
import warnings

_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
_FAST_XLA_FLAGS = (
  "--xla_cpu_multi_thread_eigen=false",
  _YNN_FLAG + "=-reduce",
)

_applied: dict | None = None


def usable_cores() -> int:
  """Number of CPU cores this process may run on (respects affinity masks)."""
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except AttributeError:  # pragma: no cover - non-Linux
    return max(1, os.cpu_count() or 1)


def backend_initialized() -> bool:
  """True once JAX has created its backends (flags no longer take effect)."""
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top

  return bool(xla_bridge.backends_are_initialized())


def _flag_supported(flag: str) -> bool:
  # Older jaxlibs reject unknown XLA flags with a fatal error, so only pass the
  # YNN flag where the installed jaxlib knows it.
  name = flag.split("=")[0].lstrip("-")
  if name != "xla_cpu_experimental_ynn_fusion_type":
    return True
  try:
    import jaxlib  # pylint: disable=g-import-not-at-top

    version = tuple(int(v) for v in jaxlib.__version__.split(".")[:2])
  except Exception:  # pragma: no cover
    return False
  return version >= (0, 8)


def configure_cpu(
  num_devices: int | None = None,
  *,
  single_thread: bool = True,
  library_fusions: bool | None = None,
  force: bool = False,
) -> dict:
  """Applies the fast CPU settings for federated rounds.

  Args:
    num_devices: XLA host devices to create; default one per usable core.
    single_thread: also pass the XLA flags that keep each device's kernels on
      one thread.
    library_fusions: keep XLA's YNNPACK matmul fusions (fast; memory grows
      with the steps of one computation, see the module docstring). Default:
      True unless the environment variable ``FEDJAX_LITE_LIBRARY_FUSIONS=0``.
    force: apply even if ``FEDJAX_LITE_CPU_TUNING=0`` is set.

  Returns:
    A dict describing what was applied (``{"applied": False, "reason": ...}``
    when the backend was already initialised).
  """
  global _applied
  if not force and os.environ.get("FEDJAX_LITE_CPU_TUNING", "1") == "0":
    return {"applied": False, "reason": "FEDJAX_LITE_CPU_TUNING=0"}
  if backend_initialized():
    if _applied is not None:
      return _applied
    return {
      "applied": False,
      "reason": "JAX backend already initialised; call "
      "fedjax_lite.configure_cpu() before any JAX computation",
    }
  import jax  # pylint: disable=g-import-not-at-top

  n = usable_cores() if num_devices is None else int(num_devices)
  if n < 1:
    raise ValueError(f"num_devices must be >= 1, got {num_devices!r}.")
  if library_fusions is None:
    library_fusions = os.environ.get("FEDJAX_LITE_LIBRARY_FUSIONS", "1") != "0"
  flags = os.environ.get("XLA_FLAGS", "")
  added = []
  wanted = list(_FAST_XLA_FLAGS) if single_thread else []
  if not library_fusions:
    wanted = [f for f in wanted if not f.startswith(_YNN_FLAG)]
    wanted.append(_YNN_FLAG + "=")
  for flag in wanted:
    name = flag.split("=")[0]
    if name not in flags and _flag_supported(flag):
      added.append(flag)
  if added:
    os.environ["XLA_FLAGS"] = " ".join([flags] + added).strip()
  user_count = "xla_force_host_platform_device_count" in flags
  if not user_count:
    try:
      jax.config.update("jax_num_cpu_devices", n)
    except Exception as e:  # pragma: no cover - depends on jax version
      warnings.warn(f"could not set jax_num_cpu_devices: {e}")
  _applied = {
    "applied": True,
    "num_cpu_devices": None if user_count else n,
    "library_fusions": bool(library_fusions),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }
  return _applied


def auto_configure() -> None:
  """Called on ``import fedjax_lite``: apply :func:`configure_cpu` if possible."""
  if os.environ.get("FEDJAX_LITE_CPU_TUNING", "1") == "0":
    return
  try:
    if not backend_initialized():
      configure_cpu()
  except Exception as e:  # pragma: no cover - never block an import
    warnings.warn(f"fedjax_lite CPU tuning skipped: {e}")


def settings() -> dict:
  """What :func:`configure_cpu` applied in this process (for reports)."""
  return dict(_applied) if _applied else {"applied": False}


def device_memory_bytes(device) -> tuple[int | None, str]:
  """Memory one device can hold and where the number came from.

  Accelerators: ``device.memory_stats()["bytes_limit"]``. CPU (or when the
  backend reports nothing): the host's physical memory from ``os.sysconf``
  (all CPU devices of a process share it).
  """
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), "device.memory_stats()['bytes_limit']"
  try:
    pages = os.sysconf("SC_PHYS_PAGES")
    page = os.sysconf("SC_PAGE_SIZE")
    return int(pages) * int(page), "host physical memory (os.sysconf)"
  except (ValueError, OSError, AttributeError):
    return None, "unknown"
