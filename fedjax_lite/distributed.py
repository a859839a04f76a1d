r"""Multi-process runs on JAX's own multi-controller runtime.

One federated round can span several processes (one per host, or several on
one machine): every process runs the same program, ``jax.devices()`` lists
the devices of all processes, and the engine's ``"clients"`` mesh axis spans
processes x devices. The round is one SPMD computation; its cross-device
reductions are XLA collectives (gloo over TCP between CPU processes, NCCL
between GPUs). There is no home-made RPC: :func:`initialize` wraps
``jax.distributed.initialize``.

With client-sharded data (``Engine.put_data(..., placement="sharded")``)
each process uploads, and with a :class:`~fedjax_lite.data.ClientLoader`
reads, only the clients its own devices hold. Server state and metrics are
replicated: every process holds the same values, process 0 writes files.

On one machine, :mod:`fedjax_lite.experiment.launch` starts the processes
(``python -m fedjax_lite launch --processes 2 experiments/X.py``). On a
cluster, start one process per host (SLURM: ``srun --ntasks=N``) with
``--coordinator host0:port --num-processes N --process-id $SLURM_PROCID``.

A lost process (killed, out of memory) ends the run: the others fail in the
round's collectives, and JAX's coordination service then ends them with a C++
abort ("Terminating process because the JAX distributed service detected
fatal errors"), at once when process 0 (which hosts the service) is lost,
after the heartbeat timeout (100 s) when another one is. jax 0.10.2 has no
hook to turn that abort into a Python error: the client's
``missed_heartbeat_callback`` itself aborts (``std::bad_cast``) when given a
Python function, and ``jax_enable_recoverability`` spares only process 0. The
launcher therefore stops the other processes itself and ends with one line
naming the lost process and the command that resumes the run; without it,
resume with ``run --resume RUN_DIR`` on every host (the run folder keeps the
last checkpoint written before the loss).
"""

from __future__ import annotations

import re
import socket
import sys
import time

from fedjax_lite import checks, runtime

__all__ = [
  "broadcast_text",
  "initialize",
  "is_main",
  "process_count",
  "split_devices",
]

_state: dict = {}


def split_devices(num_devices: int, num_processes: int) -> int:
  """Devices per process when ``num_devices`` are split over processes.

  Raises:
    ValueError: the process count does not divide the devices.
  """
  checks.positive_int("num_devices", num_devices)
  checks.positive_int("num_processes", num_processes)
  if num_devices % num_processes:
    raise ValueError(
      f"{num_processes} processes cannot share {num_devices} devices "
      "equally; choose a process count that divides the device count "
      f"(e.g. {', '.join(str(p) for p in _divisors(num_devices))})."
    )
  return num_devices // num_processes


def _divisors(n: int) -> list[int]:
  return [p for p in range(1, n + 1) if n % p == 0]


def _check_address(coordinator: str) -> None:
  if not isinstance(coordinator, str) or not re.fullmatch(
    r"[^\s:]+:\d{1,5}", coordinator
  ):
    raise ValueError(
      f"coordinator must be 'host:port' (e.g. 'localhost:12355'), got "
      f"{coordinator!r}."
    )


def _wait_for_coordinator(
  coordinator: str, timeout_s: float, process_id: int, num_processes: int
) -> socket.socket:
  """Polls the coordinator's TCP port until it accepts a connection (JAX's
  own wait ends in a process abort, a C++ check failure, rather than a
  Python error) and returns the connection."""
  host, port = coordinator.rsplit(":", 1)
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      return socket.create_connection((host, int(port)), timeout=1.0)
    except OSError:
      if time.monotonic() > deadline:
        raise TimeoutError(
          f"process {process_id} of {num_processes}: no answer from the "
          f"coordinator at {coordinator} within {timeout_s} s. Start "
          "process 0 (it hosts the coordinator) on that host and port, "
          "check that every process was given the same --coordinator, or "
          "raise the timeout."
        ) from None
      time.sleep(0.2)


# Rendezvous before jax.distributed.initialize, on the coordinator's port:
# JAX's coordination service aborts the process (a C++ check failure) when a
# process never joins, so the processes first meet over a plain TCP socket
# and turn every wait that runs out into a Python TimeoutError. Process 0
# listens; every other process connects and sends "<id> <num_processes>";
# once all have joined, process 0 closes its listener (freeing the port for
# JAX's service) and answers each "go" (or "error: ..." for a mismatch).
_HELLO = "fedjax_lite-join"


def _read_line(conn: socket.socket, deadline: float) -> str:
  data = b""
  while not data.endswith(b"\n"):
    conn.settimeout(max(deadline - time.monotonic(), 0.01))
    chunk = conn.recv(256)
    if not chunk:
      break
    data += chunk
  return data.decode(errors="replace").strip()


def _gather_peers(coordinator: str, num_processes: int, timeout_s: float):
  """Process 0: waits for processes ``1 .. n-1`` to connect (the
  rendezvous above); TimeoutError naming the missing ones."""
  port = int(coordinator.rsplit(":", 1)[1])
  deadline = time.monotonic() + timeout_s
  joined: set = set()
  conns: list = []
  error = None
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      listener.bind(("", port))
    except OSError as e:
      raise OSError(
        f"process 0: cannot listen on port {port} of {coordinator} ({e}); "
        "choose a free port for --coordinator."
      ) from e
    listener.listen(num_processes)
    try:
      while len(joined) < num_processes - 1 and error is None:
        listener.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
          conn, _ = listener.accept()
        except socket.timeout:
          missing = sorted(set(range(1, num_processes)) - joined)
          raise TimeoutError(
            f"process 0 of {num_processes}: processes {missing} did not "
            f"join at {coordinator} within {timeout_s} s. Start them with "
            "the same --coordinator and --num-processes (and their own "
            "--process-id), or raise the timeout."
          ) from None
        try:
          words = _read_line(conn, deadline).split()
        except OSError:
          words = []
        if (
          len(words) != 3
          or words[0] != _HELLO
          or not all(w.isdigit() for w in words[1:])
        ):
          conn.close()  # not one of ours (e.g. a port scan): ignore it
          continue
        conns.append(conn)
        pid, count = int(words[1]), int(words[2])
        if count != num_processes:
          error = (
            f"process {pid} was started with --num-processes {count}, "
            f"process 0 with {num_processes}"
          )
        elif pid in joined or not 0 < pid < num_processes:
          error = f"process id {pid} joined twice or is out of range"
        joined.add(pid)
    except BaseException:
      for c in conns:
        c.close()
      raise
  # The listener is closed: JAX's coordination service may bind the port.
  reply = ("go" if error is None else f"error: {error}") + "\n"
  for c in conns:
    try:
      c.sendall(reply.encode())
      c.settimeout(5.0)
      c.recv(16)  # the peer closes first (its side keeps TIME_WAIT)
    except OSError:
      pass
    finally:
      c.close()
  if error is not None:
    raise ValueError(f"process 0 of {num_processes}: {error}.")


def _join(
  coordinator: str, timeout_s: float, process_id: int, num_processes: int
) -> None:
  """Processes ``1 .. n-1``: the rendezvous with process 0, then a wait for
  its coordination service to listen on the same port."""
  deadline = time.monotonic() + timeout_s
  conn = _wait_for_coordinator(
    coordinator, timeout_s, process_id, num_processes
  )
  with conn:
    conn.sendall(f"{_HELLO} {process_id} {num_processes}\n".encode())
    try:
      reply = _read_line(conn, deadline + timeout_s)
    except OSError:
      reply = ""
  if reply.startswith("error: "):
    raise ValueError(f"process {process_id} of {num_processes}: {reply[7:]}.")
  if reply != "go":
    raise TimeoutError(
      f"process {process_id} of {num_processes}: process 0 at {coordinator} "
      "stopped waiting before every process had joined (see its error); "
      "start all processes within --timeout of each other."
    )
  # Process 0 now starts JAX's coordination service on the same port.
  _wait_for_coordinator(
    coordinator, timeout_s, process_id, num_processes
  ).close()


def initialize(
  coordinator: str,
  num_processes: int,
  process_id: int,
  *,
  local_devices: int | None = None,
  timeout_s: int = 60,
  cpu: bool | None = None,
) -> dict:
  """Joins this process to a multi-process run (call before any JAX work).

  Args:
    coordinator: ``"host:port"`` of process 0's coordination service.
    num_processes: processes in the run.
    process_id: this process's index, ``0 .. num_processes-1``.
    local_devices: CPU devices of this process (default: one per usable
      core, as :func:`fedjax_lite.configure_cpu` chooses).
    timeout_s: seconds to wait for the coordinator and the other processes.
    cpu: run on CPU devices with gloo collectives; False: the default
      backend (GPUs with NCCL); None (default): CPU unless a CUDA plugin of
      jax is installed.

  Returns:
    ``{"process_id", "num_processes", "local_devices", "global_devices"}``.

  Raises:
    TimeoutError: the coordinator (or another process) did not answer
      within ``timeout_s``.
    RuntimeError: JAX was already initialised in this process.
  """
  _check_address(coordinator)
  checks.positive_int("num_processes", num_processes)
  if not checks.is_int(process_id) or not 0 <= process_id < num_processes:
    raise ValueError(
      f"process_id must be an int in [0, {num_processes}), got {process_id!r}."
    )
  checks.positive_int("timeout_s", timeout_s)
  checks.positive_int("local_devices", local_devices, allow_none=True)
  if _state:
    return dict(_state)
  if runtime.backend_initialized():
    raise RuntimeError(
      "JAX is already initialised in this process; call "
      "fedjax_lite.distributed.initialize before any JAX computation."
    )
  import jax  # pylint: disable=g-import-not-at-top

  if cpu is None:
    cpu = not has_cuda_plugin()
  if cpu:
    runtime.configure_cpu(local_devices, force=True)
    if local_devices is not None:
      jax.config.update("jax_num_cpu_devices", int(local_devices))
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if process_id != 0:
    _join(coordinator, timeout_s, process_id, num_processes)
  else:
    print(
      f"fedjax_lite: coordinator at {coordinator}, waiting up to {timeout_s}"
      f" s for {num_processes} processes to join",
      file=sys.stderr,
      flush=True,
    )
    _gather_peers(coordinator, num_processes, timeout_s)
  try:
    jax.distributed.initialize(
      coordinator_address=coordinator,
      num_processes=int(num_processes),
      process_id=int(process_id),
      initialization_timeout=int(timeout_s),
    )
    # The first backend use connects the collectives of all processes.
    devices = jax.devices()
  except Exception as e:  # pylint: disable=broad-except
    text = str(e)
    if any(
      s in text for s in ("DEADLINE", "timed out", "Timed out", "UNAVAIL")
    ):
      raise TimeoutError(
        f"process {process_id} of {num_processes}: no answer from the "
        f"coordinator at {coordinator} (or from the other processes) within "
        f"{timeout_s} s. Start process 0 on that host and port, check that "
        "every process was given the same --coordinator and "
        "--num-processes, or raise --timeout."
      ) from e
    raise
  _state.update(
    process_id=int(jax.process_index()),
    num_processes=int(jax.process_count()),
    local_devices=len(jax.local_devices()),
    global_devices=len(devices),
  )
  return dict(_state)


def has_cuda_plugin() -> bool:
  """True when a CUDA plugin of jaxlib is installed (GPUs are likely)."""
  import importlib.util  # pylint: disable=g-import-not-at-top

  return any(
    importlib.util.find_spec(p) is not None
    for p in ("jax_cuda12_plugin", "jax_cuda13_plugin")
  )


def is_main() -> bool:
  """True in process 0 (the one that writes files), and in a plain run."""
  import jax  # pylint: disable=g-import-not-at-top

  return jax.process_index() == 0


def process_count() -> int:
  import jax  # pylint: disable=g-import-not-at-top

  return jax.process_count()


def broadcast_text(text: str, size: int = 4096) -> str:
  """Process 0's ``text`` in every process (e.g. a run folder it named).

  A no-op in a single-process run.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  if jax.process_count() == 1:
    return text
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  raw = text.encode()
  if len(raw) > size:
    raise ValueError(f"text of {len(raw)} bytes; at most {size} can be sent.")
  buf = np.zeros(size, np.uint8)
  buf[: len(raw)] = np.frombuffer(raw, np.uint8)
  out = np.asarray(multihost_utils.broadcast_one_to_all(buf))
  return bytes(out).rstrip(b"\0").decode()
