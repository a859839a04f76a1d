r"""``python -m fedjax_lite launch``: one experiment as N processes on this host.

  python -m fedjax_lite launch --processes 2 [--devices 4] \\
      experiments/fedavg_synthetic.py [run options, e.g. --set num_rounds=5]

starts ``python -m fedjax_lite run ... --coordinator localhost:PORT
--num-processes N --process-id i --local-devices D`` for ``i = 0 .. N-1``
(``D = devices / N``), prints process 0's output, keeps the others' in
``OUT/launch-<port>-<i>.log`` and shows their tail if one fails. When a
process fails the others are stopped (they would wait for it in the round's
collectives); Ctrl-C or SIGTERM is passed on to every process, which then
checkpoint and stop together.

On a cluster there is no launcher to run: start the same ``run`` command on
every host with its own ``--process-id`` (SLURM: ``srun --ntasks=N python -m
fedjax_lite run X.py --coordinator $HEAD:12355 --num-processes $SLURM_NTASKS
--process-id $SLURM_PROCID``) and a run folder on a shared filesystem, which
process 0 writes and every process reads to resume.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from fedjax_lite import distributed, runtime


def free_port() -> int:
  """A TCP port nothing listens on now (for the coordinator)."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return int(s.getsockname()[1])


def launch(
  run_args: Sequence[str],
  processes: int,
  devices: int | None = None,
  *,
  port: int | None = None,
  timeout_s: int = 120,
  log_dir: str | os.PathLike = "runs",
) -> int:
  """Runs ``python -m fedjax_lite run <run_args>`` as ``processes`` processes.

  Args:
    run_args: the ``run`` command's arguments (experiment file and options).
    processes: processes to start.
    devices: CPU devices in all (default: one per usable core, at least one
      per process); must be a multiple of ``processes``.
    port: the coordinator's port on localhost (default: a free one).
    timeout_s: how long processes wait for each other to start.
    log_dir: folder of the other processes' logs.

  Returns:
    0 when every process succeeded, else the first failing exit code.
  """
  if devices is None:
    devices = max(processes, runtime.usable_cores())
    devices -= devices % processes
  per_process = distributed.split_devices(devices, processes)
  port = free_port() if port is None else int(port)
  log_dir = Path(log_dir)
  log_dir.mkdir(parents=True, exist_ok=True)
  procs, logs = [], []
  for i in range(processes):
    cmd = [
      sys.executable,
      "-m",
      "fedjax_lite",
      "run",
      *run_args,
      "--coordinator",
      f"localhost:{port}",
      "--num-processes",
      str(processes),
      "--process-id",
      str(i),
      "--local-devices",
      str(per_process),
      "--timeout",
      str(timeout_s),
    ]
    if i == 0:
      procs.append(subprocess.Popen(cmd, start_new_session=True))
      logs.append(None)
    else:
      log = log_dir / f"launch-{port}-{i}.log"
      with open(log, "w") as f:
        procs.append(
          subprocess.Popen(
            cmd + ["--no-progress"],
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
          )
        )
      logs.append(log)

  def forward(signum, _frame):
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)

  old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    return _wait(procs, logs)
  finally:
    for s, h in old.items():
      signal.signal(s, h)


_INTERRUPTED = (128 + signal.SIGINT, 128 + signal.SIGTERM)


def _wait(procs, logs, grace_s: float = 120.0) -> int:
  while True:
    codes = [p.poll() for p in procs]
    stopped = [i for i, c in enumerate(codes) if c in _INTERRUPTED]
    if stopped:
      # An interrupt: every process checkpoints after the same round and
      # exits with 128+signal; give the others time to do so.
      deadline = time.monotonic() + grace_s
      for p in procs:
        try:
          p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
          p.kill()
          p.wait()
      code = procs[stopped[0]].returncode
      print(
        f"interrupted (exit code {code}); resume with `launch ... --resume "
        "RUN_DIR`.",
        file=sys.stderr,
      )
      return int(code)
    failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
    if failed:
      i = failed[0]
      time.sleep(1.0)  # let the others exit on their own (e.g. SIGTERM)
      for p in procs:
        if p.poll() is None:
          p.kill()
      for p in procs:
        p.wait()
      if logs[i] is not None:
        tail = Path(logs[i]).read_text(errors="replace")[-3000:]
        print(
          f"process {i} failed (exit code {codes[i]}); the end of "
          f"{logs[i]}:\n{tail}",
          file=sys.stderr,
        )
      else:
        print(f"process 0 failed (exit code {codes[i]}).", file=sys.stderr)
      return int(codes[i])
    if all(c == 0 for c in codes):
      return 0
    time.sleep(0.2)
