r"""``python -m fedjax_lite launch``: one experiment as N processes on this host.

  python -m fedjax_lite launch --processes 2 [--devices 4] \\
      experiments/fedavg_synthetic.py [run options, e.g. --set num_rounds=5]

starts ``python -m fedjax_lite run ... --coordinator localhost:PORT
--num-processes N --process-id i --local-devices D`` for ``i = 0 .. N-1``
(``D = devices / N``), prints process 0's output and keeps the others' in
``LOG_DIR/launch-<port>-<i>.log`` (process 0's error output goes to
``launch-<port>-0.log`` too). Ctrl-C or SIGTERM is passed on to every
process, which then checkpoint and stop together.

When a process ends with an error, or is lost (killed, e.g. by SIGKILL or
the out-of-memory killer), the others cannot go on: they wait for it in the
round's collectives, and JAX's coordination service then aborts them. The
launcher stops them first (SIGTERM, then SIGKILL after ``grace_s``), keeps
the noise of their ending out of the terminal (it stays in their logs) and
ends with one line that names the process and how to resume the run, e.g.
``error: process 1 of 2 was killed by SIGKILL (exit status 137), so the run
stopped (...); checkpoint in RUN_DIR. Resume it with: python -m fedjax_lite
launch --processes 2 --devices 4 --resume RUN_DIR``. The launcher's exit
status is the failing process's: its exit code, or ``128 + signal number``
when a signal killed it (the shell's convention: 137 for SIGKILL). The run
folder keeps the last checkpoint written before the loss (checkpoints are
written atomically), and the printed command continues from it.

On a cluster there is no launcher to run: start the same ``run`` command on
every host with its own ``--process-id`` (SLURM: ``srun --ntasks=N python -m
fedjax_lite run X.py --coordinator $HEAD:12355 --num-processes $SLURM_NTASKS
--process-id $SLURM_PROCID``) and a run folder on a shared filesystem, which
process 0 writes and every process reads to resume. There, a lost process
ends the others with JAX's own abort (see :mod:`fedjax_lite.distributed`);
resume with ``run --resume RUN_DIR`` on every host.
"""

from __future__ import annotations

import os
import queue
import re
import select
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

from fedjax_lite import distributed, runtime
from fedjax_lite.experiment.loop import CHECKPOINT

# Defaults of `launch` (and of the command line's launch options).
DEFAULT_TIMEOUT_S = 120
DEFAULT_LOG_DIR = "runs"


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
  timeout_s: int = DEFAULT_TIMEOUT_S,
  log_dir: str | os.PathLike = DEFAULT_LOG_DIR,
  grace_s: float = 3.0,
) -> int:
  """Runs ``python -m fedjax_lite run <run_args>`` as ``processes`` processes.

  Args:
    run_args: the ``run`` command's arguments (experiment file and options).
    processes: processes to start.
    devices: CPU devices in all (default: one per usable core, at least one
      per process); must be a multiple of ``processes``.
    port: the coordinator's port on localhost (default: a free one).
    timeout_s: how long processes wait for each other to start.
    log_dir: folder of the processes' logs.
    grace_s: once a process has failed, how long the others get to end after
      SIGTERM before they are killed.

  Returns:
    0 when every process succeeded; else the exit status of the process that
    failed first (``128 + signal`` when a signal killed it), or the
    interrupted processes' ``128 + signal`` after Ctrl-C / SIGTERM.
  """
  if devices is None:
    devices = max(processes, runtime.usable_cores())
    devices -= devices % processes
  per_process = distributed.split_devices(devices, processes)
  port = free_port() if port is None else int(port)
  log_dir = Path(log_dir)
  log_dir.mkdir(parents=True, exist_ok=True)
  own = ["--processes", str(processes), "--devices", str(devices)]
  if timeout_s != DEFAULT_TIMEOUT_S:
    own += ["--timeout", str(timeout_s)]
  if str(log_dir) != DEFAULT_LOG_DIR:
    own += ["--log-dir", str(log_dir)]
  folder = RunFolder(run_args, own)
  procs, logs = [], []
  relay = None
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
    log = log_dir / f"launch-{port}-{i}.log"
    logs.append(log)
    if i == 0:
      # Its output is the run's; its error output passes through a relay
      # that can hold back what it prints once another process is lost.
      p = subprocess.Popen(cmd, stderr=subprocess.PIPE, start_new_session=True)
      procs.append(p)
      relay = _Relay(p.stderr, log)
    else:
      with open(log, "w") as f:
        procs.append(
          subprocess.Popen(
            cmd + ["--no-progress"],
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
          )
        )
  sup = _Supervisor(
    procs, logs, relay, folder, grace_s, log_dir / f"launch-{port}-*.log"
  )
  old = {
    s: signal.signal(s, sup.forward) for s in (signal.SIGINT, signal.SIGTERM)
  }
  try:
    return sup.wait()
  finally:
    for s, h in old.items():
      signal.signal(s, h)
    sup.stop_all()


def exit_status(returncode: int) -> int:
  """A ``subprocess`` return code as a shell exit status: ``-N`` (killed by
  signal N) becomes ``128 + N``."""
  return 128 - returncode if returncode < 0 else returncode


def describe_end(returncode: int) -> str:
  """``"killed by SIGKILL (exit status 137)"`` or ``"exit status 1"``."""
  if returncode < 0:
    try:
      name = signal.Signals(-returncode).name
    except ValueError:
      name = f"signal {-returncode}"
    return f"killed by {name} (exit status {exit_status(returncode)})"
  return f"exit status {returncode}"


_INTERRUPTED = (128 + signal.SIGINT, 128 + signal.SIGTERM)


class _Supervisor:
  """Waits for the processes: a thread per process reports its end, in the
  order they end (the first to fail is the cause; the others fail because
  it did)."""

  def __init__(self, procs, logs, relay, folder, grace_s, log_pattern):
    self.procs, self.logs, self.relay = procs, logs, relay
    self.folder, self.grace_s, self.log_pattern = folder, grace_s, log_pattern
    self.ended: dict[int, tuple[float, int]] = {}
    self.interrupted = False
    self._queue: queue.Queue = queue.Queue()
    for i, p in enumerate(procs):
      threading.Thread(target=self._reap, args=(i, p), daemon=True).start()

  def _reap(self, i, p):
    code = p.wait()
    self._queue.put((time.monotonic(), i, code))

  def forward(self, signum, _frame):
    """Ctrl-C / SIGTERM of the launcher: passed on to every process."""
    self.interrupted = True
    self._signal_alive(signum)

  def _signal_alive(self, signum):
    for i, p in enumerate(self.procs):
      if i not in self.ended and p.returncode is None:
        try:
          p.send_signal(signum)
        except OSError:
          pass

  def _next(self, timeout: float) -> bool:
    """Records the next process to end within ``timeout`` s (True if one
    did)."""
    try:
      t, i, code = self._queue.get(timeout=max(timeout, 0.0))
    except queue.Empty:
      return False
    self.ended[i] = (t, code)
    return True

  def _wait_all(self, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while len(self.ended) < len(self.procs):
      if not self._next(deadline - time.monotonic()):
        break

  def stop_all(self) -> None:
    """Kills what still runs and waits for every process (and the relay)."""
    self._signal_alive(signal.SIGKILL)
    while len(self.ended) < len(self.procs):
      self._next(1.0)
    if self.relay is not None:
      self.relay.close()

  def _report(self, line: str) -> None:
    """``line`` on a line of its own (after process 0's progress bar)."""
    if self.relay is not None and self.relay.mid_line:
      line = "\n" + line
      self.relay.mid_line = False
    print(line, file=sys.stderr, flush=True)

  def wait(self) -> int:
    n = len(self.procs)
    while len(self.ended) < n:
      if not self._next(0.5):
        continue
      failed = {i: e for i, e in self.ended.items() if e[1] != 0}
      if not failed:
        continue
      first = min(failed, key=lambda i: failed[i][0])
      # 130 / 143: the process stopped on SIGINT / SIGTERM (and checkpointed)
      if self.interrupted or failed[first][1] in _INTERRUPTED:
        return self._interrupted(first)
      return self._failed()
    return 0

  def _interrupted(self, first: int) -> int:
    # Every process checkpoints after the same round and exits with
    # 128+signal; give the others time to do so.
    self._wait_all(120.0)
    self.stop_all()
    code = exit_status(self.ended[first][1])
    self._report(f"interrupted (exit status {code}); {self.folder.hint()}")
    return code

  def _failed(self) -> int:
    # Ends that come within 0.1 s of each other may be reported out of
    # order; among them, one killed by a signal is taken for the cause, one
    # that aborted (JAX's reaction to a lost peer) for a consequence.
    time.sleep(0.1)
    while self._next(0.0):
      pass
    failed = {i: e for i, e in self.ended.items() if e[1] != 0}
    t0 = min(t for t, _ in failed.values())

    def rank(i):
      t, code = failed[i]
      aborted = code == -signal.SIGABRT
      return (t > t0 + 0.1, aborted, code > 0, t)

    i = min(failed, key=rank)
    t, code = failed[i]
    if i != 0 and self.relay is not None:
      # Process 0 lost a peer: what it prints from now on is the noise of
      # its ending (tracebacks, JAX's abort); keep it in its log only.
      self.relay.mute_after(t - _Relay.MARGIN_S)
    self._signal_alive(signal.SIGTERM)
    self._wait_all(self.grace_s)
    self.stop_all()
    n = len(self.procs)
    if code > 0 and i != 0:
      tail = Path(self.logs[i]).read_text(errors="replace")[-3000:]
      self._report(f"the end of {self.logs[i]}:\n{tail.rstrip()}")
    what = "was" if code < 0 else "failed with"
    self._report(
      f"error: process {i} of {n} {what} {describe_end(code)}, so the run "
      f"stopped (the processes' output: {self.log_pattern}); "
      + self.folder.hint()
    )
    return exit_status(code)


class _Relay:
  """Passes process 0's error output on to ours ``DELAY_S`` late, and writes
  all of it to its log. The delay lets :meth:`mute_after` hold back what came
  after a moment in the past: the output of a process whose peer was lost."""

  DELAY_S = 1.0
  MARGIN_S = 0.5  # how early, before a peer's end was seen, to hold back

  def __init__(self, pipe, log: Path):
    self._fd = pipe.fileno()
    self._pipe = pipe
    self._log = open(log, "wb")
    self._pending: list = []
    self._muted_after = float("inf")
    self.mid_line = False  # the last output passed on ended mid-line
    self._lock = threading.Lock()
    self._thread = threading.Thread(target=self._pump, daemon=True)
    self._thread.start()

  def mute_after(self, t: float) -> None:
    with self._lock:
      self._muted_after = min(self._muted_after, t)

  def _flush(self, upto: float) -> None:
    out = sys.stderr.buffer if hasattr(sys.stderr, "buffer") else None
    with self._lock:
      ready = [(t, b) for t, b in self._pending if t <= upto]
      self._pending = [(t, b) for t, b in self._pending if t > upto]
      data = b"".join(b for t, b in ready if t < self._muted_after)
    if not data:
      return
    self.mid_line = not data.endswith(b"\n")
    try:
      if out is not None:
        sys.stderr.flush()
        out.write(data)
        out.flush()
      else:
        sys.stderr.write(data.decode(errors="replace"))
        sys.stderr.flush()
    except (OSError, ValueError):
      pass

  def _pump(self) -> None:
    while True:
      ready, _, _ = select.select([self._fd], [], [], 0.1)
      if ready:
        data = os.read(self._fd, 65536)
        if not data:
          break
        self._log.write(data)
        self._log.flush()
        with self._lock:
          self._pending.append((time.monotonic(), data))
      self._flush(time.monotonic() - self.DELAY_S)

  def close(self) -> None:
    """After process 0 has ended: the rest of its output, then the log."""
    if self._log.closed:
      return
    self._thread.join(timeout=10.0)
    self._flush(float("inf"))
    self._log.close()
    self._pipe.close()


class RunFolder:
  """The folder of a launched run (a new one in ``--out``, or the one named
  by ``--resume``) and the command that resumes it."""

  def __init__(self, run_args: Sequence[str], launch_args: Sequence[str]):
    self.run_args = list(run_args)
    self.launch_args = list(launch_args)
    opts = run_options(run_args)
    self.resume = opts["resume"]
    self.out = Path(opts["out"])
    self.rest = opts["rest"]
    self._before = None if self.resume else self._listing()

  def _listing(self) -> set:
    try:
      return {p.name for p in self.out.iterdir()}
    except OSError:
      return set()

  def find(self) -> Path | None:
    """The run folder (None: process 0 had not made it yet)."""
    if self.resume is not None:
      return Path(self.resume)
    new = [self.out / n for n in self._listing() - self._before]
    new = [p for p in new if (p / "config.json").is_file()]
    if not new:
      return None
    return max(new, key=lambda p: (p / "config.json").stat().st_mtime)

  def resume_command(self, run_dir: Path) -> str:
    return _command(self.launch_args + ["--resume", str(run_dir)] + self.rest)

  def restart_command(self) -> str:
    return _command(self.launch_args + self.run_args)

  def hint(self) -> str:
    """``"Resume it with: ..."`` (or how to start it again)."""
    run_dir = self.find()
    if run_dir is not None and (run_dir / CHECKPOINT).is_file():
      return f"checkpoint in {run_dir}. Resume it with: " + (
        self.resume_command(run_dir)
      )
    return (
      "no checkpoint was written, so it cannot be resumed. Start it again "
      f"with: {self.restart_command()}"
    )


def _command(args: Sequence[str]) -> str:
  return "python -m fedjax_lite launch " + shlex.join(args)


def run_options(run_args: Sequence[str]) -> dict:
  """The ``run`` arguments that name the run (``spec``, ``out``, ``resume``;
  ``--set`` overrides are saved in the run folder) and the ``rest`` (options
  such as ``--placement`` that a resume needs again), as tokens."""
  from fedjax_lite.experiment import cli  # pylint: disable=g-import-not-at-top

  parser = cli.build_parser()[1]["run"]
  actions = parser._option_string_actions  # pylint: disable=protected-access
  found = {"spec": None, "out": parser.get_default("out"), "resume": None}
  rest: list = []
  args = list(run_args)
  i = 0
  while i < len(args):
    token = args[i]
    name, eq, value = token.partition("=")
    action = actions.get(name) if _is_option(token) else None
    if action is None:
      if found["spec"] is None and not _is_option(token):
        found["spec"] = token
      elif token != "--":
        rest.append(token)
      i += 1
      continue
    j = i + 1
    values = [value] if eq else []
    if not eq:
      nargs = action.nargs
      if nargs is None:
        nargs = 1
      if isinstance(nargs, int):
        values = args[j : j + nargs]
      else:  # "?", "*", "+"
        while j + len(values) < len(args) and not _is_option(
          args[j + len(values)]
        ):
          values.append(args[j + len(values)])
          if nargs == "?":
            break
      j += len(values)
    if action.dest in ("out", "resume") and values:
      found[action.dest] = values[-1]
    elif action.dest != "overrides":
      rest += args[i:j]
    i = j
  return {**found, "rest": rest}


def _is_option(token: str) -> bool:
  return (
    token.startswith("-")
    and len(token) > 1
    and not re.fullmatch(r"-\d+(\.\d*)?|-\.\d+", token)
  )
