"""The process that runs one tool's metric writers for a training process.

Started by :class:`fedjax_lite.experiment.writers.ProcessWriter` (one per
tool and training process; see :mod:`fedjax_lite.experiment.writers` for
why and for the guarantees) as ``python -c <bootstrap> SYS_PATH TOOL
NICE``: the parent's ``sys.path``, then :func:`main` (``python -m
fedjax_lite.experiment.writer_process TOOL [NICE]`` runs the same). It
first raises its nice value to ``NICE`` (:func:`lower_priority`), then
imports the tool and the writer classes of
:mod:`~fedjax_lite.experiment.writers` (the only code that talks to the
tools), never JAX, and starts the tool (:func:`~fedjax_lite.experiment.
writers.preload`: W&B's service, MLflow's store modules) before the
parent's first call arrives.

Protocol, one JSON object a line (floats as Python's ``json`` writes them,
``NaN`` and ``Infinity`` included):

* stdin, from the parent: ``{"op": "open", "id": i, "kwargs": {...}}``
  (``writers.TOOL_WRITERS[tool](**kwargs)``), then ``{"op": "scalars",
  "id": i, "step": s, "scalars": {...}}``, ``{"op": "hparams", "id": i,
  "hparams": {...}}``, ``{"op": "flush", "id": i}``, ``{"op": "close",
  "id": i}``. EOF: the parent closed it after its last writer, or died; the
  calls read so far are carried out, the writers still open are flushed
  and closed as cut short (MLflow ``KILLED``, W&B exit code 1), and the
  process exits.
* stdout, to the parent: ``{"id": i, "closed": true}``; ``{"id": i,
  "error": {"type", "message"}}`` (writer ``i`` failed; its later calls are
  skipped); ``{"fatal": {...}}`` (the process cannot serve any writer; it
  exits). The tools' own output goes to stderr; the writers keep their
  runs' ids in ``tracking.json`` themselves.

Its stdin is read by a thread of its own, so the pipe never fills while
the tool starts; it ignores SIGINT (the parent stops on Ctrl-C and closes
its writers, which ends this process). Once every run is closed it exits
at once (``os._exit``, after ``wandb.teardown()`` for W&B): the tools'
remaining atexit hooks (MLflow's telemetry flush, ~0.8 s) would only delay
the parent's last ``close``.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import sys
import threading
import traceback


def lower_priority(nice: int) -> int:
  """Raises this process's nice value to ``nice`` (never lowers it) and
  returns the value in force.

  Why: on a machine whose cores the training process keeps busy (its XLA
  devices wait on each other at every cross-device reduce, so one device
  thread made to wait delays all), the tool's work should take the cycles
  the training leaves idle (its imports and compilation, its host-side
  steps between rounds) rather than share the cores with it. The process
  stays in the training process's session, so the kernel's per-session
  scheduling groups (``autogroup``) weigh it against the training
  process's threads, not as a group of its own. Once the training process
  waits for a ``close`` the cores are free, and the tool finishes at full
  speed."""
  if not hasattr(os, "nice"):  # pragma: no cover - Windows
    return 0
  current = os.nice(0)
  if nice > current:
    try:
      return os.nice(nice - current)
    except OSError:
      pass
  return current


def _describe(e: BaseException) -> dict:
  return {"type": type(e).__name__, "message": str(e)}


class _Replies:
  """Lines to the parent on the original stdout (a parent that is gone
  makes them no-ops: the files are still written)."""

  def __init__(self, fd: int):
    self._out = os.fdopen(fd, "wb", buffering=0)
    self._lock = threading.Lock()
    self._broken = False

  def send(self, **msg) -> None:
    data = (json.dumps(msg) + "\n").encode()
    with self._lock:
      if self._broken:
        return
      try:
        self._out.write(data)
      except OSError:
        self._broken = True


def _read_requests(requests: queue.SimpleQueue) -> None:
  try:
    for line in sys.stdin.buffer:
      requests.put(line)
  finally:
    requests.put(None)  # EOF


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if len(argv) not in (1, 2) or (len(argv) == 2 and not argv[1].isdigit()):
    print("usage: writer_process TOOL [NICE]", file=sys.stderr)
    return 2
  tool = argv[0]
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  if len(argv) == 2:
    lower_priority(int(argv[1]))
  # Replies keep the original stdout; whatever the tools print goes to
  # stderr (descriptor 1 becomes a copy of 2).
  replies = _Replies(os.dup(1))
  os.dup2(2, 1)
  requests: queue.SimpleQueue = queue.SimpleQueue()
  threading.Thread(
    target=_read_requests, args=(requests,), name="requests", daemon=True
  ).start()
  try:
    from fedjax_lite.experiment import writers  # pylint: disable=g-import-not-at-top

    cls = writers.TOOL_WRITERS[tool]
  except BaseException as e:  # pylint: disable=broad-except
    traceback.print_exc()
    replies.send(fatal=_describe(e))
    return 1
  writers.preload(tool)
  serve(tool, cls, writers, requests, replies)
  # Every run is closed and its files written: end now. The interpreter's
  # own exit would run the tools' atexit hooks first (MLflow's telemetry
  # flush: ~0.8 s), which the parent's close waits for; W&B's service is
  # told to stop as its own exit would.
  if tool == "wandb" and "wandb" in sys.modules:
    try:
      sys.modules["wandb"].teardown()
    except Exception:  # pylint: disable=broad-except
      traceback.print_exc()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(0)  # pylint: disable=protected-access


def serve(tool, cls, writers, requests, replies) -> None:
  """Carries out the parent's calls until EOF (see the module docstring)."""

  open_writers: dict = {}
  failed: set = set()
  while True:
    line = requests.get()
    if line is None:
      break
    try:
      msg = json.loads(line)
    except ValueError:
      continue
    op, wid = msg.get("op"), msg.get("id")
    if wid in failed:
      continue
    try:
      if op == "open":
        kwargs = dict(msg["kwargs"])
        resume = kwargs.get("resume")
        kwargs["resume"] = None if resume is None else writers.Resume(*resume)
        open_writers[wid] = cls(**kwargs)
      elif op == "scalars":
        open_writers[wid].write_scalars(msg["step"], msg["scalars"])
      elif op == "hparams":
        open_writers[wid].write_hparams(msg["hparams"])
      elif op == "flush":
        open_writers[wid].flush()
      elif op == "close":
        open_writers.pop(wid).close()
        replies.send(id=wid, closed=True)
    except Exception as e:  # pylint: disable=broad-except
      failed.add(wid)
      open_writers.pop(wid, None)
      if not isinstance(e, (writers.ConfigError, writers.MissingExtraError)):
        traceback.print_exc()
      replies.send(id=wid, error=_describe(e))
  # EOF with writers open: the parent died (or never closed them).
  cut_short = {"mlflow": {"status": "KILLED"}, "wandb": {"exit_code": 1}}
  for wid, writer in open_writers.items():
    try:
      writer.close(**cut_short.get(tool, {}))  # flushes first
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      replies.send(id=wid, error=_describe(e))


if __name__ == "__main__":
  sys.exit(main())
