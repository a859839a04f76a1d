"""Multi-process runs on jax.distributed: 2 processes x 2 CPU devices (gloo
collectives on localhost) against 1 process x 1 device."""

import json
import os
import pathlib
import shlex
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from fedjax_lite import distributed
from fedjax_lite.experiment.launch import free_port

WORKER = pathlib.Path(__file__).with_name("distributed_worker.py")
ROOT = WORKER.parent.parent


def start(out, n, pid, devices, placement, coordinator, timeout=60):
  env = dict(os.environ, PYTHONPATH=str(ROOT), WORKER_TIMEOUT=str(timeout))
  return subprocess.Popen(
    [
      sys.executable,
      str(WORKER),
      str(out),
      str(n),
      str(pid),
      str(devices),
      placement,
      coordinator,
    ],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def finish(procs, timeout=300):
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  return logs


# The launch test below also checks 2 processes against 1 device (and a
# resume); this lower-level variant runs with -m slow.
@pytest.mark.slow
@pytest.mark.parametrize("placement", ["sharded"])
def test_two_processes_equal_one_device(tmp_path, placement):
  coordinator = f"localhost:{free_port()}"
  finish(
    [
      start(tmp_path / "one", 1, 0, 1, "replicated", "-"),
    ]
  )
  finish(
    [
      start(tmp_path / "two", 2, pid, 2, placement, coordinator)
      for pid in (0, 1)
    ]
  )
  one = json.loads((tmp_path / "one.0").read_text())
  two = [json.loads((tmp_path / f"two.{p}").read_text()) for p in (0, 1)]
  assert one["devices"] == 1 and one["processes"] == 1
  assert two[0]["devices"] == 4 and two[0]["processes"] == 2
  for leaf_a, leaf_b in zip(
    jax.tree.leaves(one["params"]), jax.tree.leaves(two[0]["params"])
  ):
    np.testing.assert_allclose(leaf_a, leaf_b, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(one["loss"], two[0]["loss"], rtol=1e-6)
  # Both processes hold the same (replicated) server state.
  assert two[0]["params"] == two[1]["params"]
  if placement == "sharded":
    # Each process read only the clients its two devices hold (40 in all).
    assert two[0]["clients_loaded"] + two[1]["clients_loaded"] == 40
    assert 15 <= two[0]["clients_loaded"] <= 25


def test_coordinator_that_never_answers(tmp_path):
  port = free_port()  # nothing listens there
  p = start(tmp_path / "x", 2, 1, 1, "replicated", f"localhost:{port}", 3)
  (log,) = [p.communicate(timeout=120)[0]]
  assert p.returncode != 0
  assert "TimeoutError" in log and f"localhost:{port}" in log, log[-2000:]


def test_process_0_whose_peers_never_join(tmp_path):
  """A Python TimeoutError naming the missing processes, not JAX's abort."""
  port = free_port()
  p = start(tmp_path / "x", 3, 0, 1, "replicated", f"localhost:{port}", 3)
  (log,) = [p.communicate(timeout=120)[0]]
  assert p.returncode == 1, log[-2000:]
  assert "TimeoutError" in log and "processes [1, 2] did not join" in log


def test_coordinator_port_in_use(tmp_path):
  with socket.socket() as busy:
    busy.bind(("", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    p = start(tmp_path / "x", 2, 0, 1, "replicated", f"localhost:{port}", 3)
    (log,) = [p.communicate(timeout=120)[0]]
  assert p.returncode == 1, log[-2000:]
  assert f"cannot listen on port {port}" in log, log[-2000:]


def test_processes_started_with_different_counts(tmp_path):
  port = free_port()
  coord = f"localhost:{port}"
  p0 = start(tmp_path / "a", 2, 0, 1, "replicated", coord, 20)
  p1 = start(tmp_path / "b", 3, 1, 1, "replicated", coord, 20)
  logs = [p.communicate(timeout=120)[0] for p in (p0, p1)]
  for p, log in zip((p0, p1), logs):
    assert p.returncode == 1, log[-2000:]
    assert "process 1 was started with --num-processes 3" in log, log[-2000:]


def test_bad_arguments():
  with pytest.raises(ValueError, match="cannot share 4 devices equally"):
    distributed.split_devices(4, 3)
  assert distributed.split_devices(4, 2) == 2
  with pytest.raises(ValueError, match="host:port"):
    distributed.initialize("localhost", 2, 0)
  with pytest.raises(ValueError, match="process_id"):
    distributed.initialize("localhost:1234", 2, 2)
  jax.devices()  # this process's backend is up: too late to join a run
  with pytest.raises(RuntimeError, match="already initialised"):
    distributed.initialize("localhost:1234", 2, 0)


def _cli(args, timeout=600):
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  p = subprocess.run(
    [sys.executable, "-m", "fedjax_lite", *args],
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
    cwd=ROOT,
  )
  assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
  return p.stdout + p.stderr


def _final_params(run_dir: pathlib.Path):
  import flax.serialization  # noqa: PLC0415

  raw = flax.serialization.msgpack_restore(
    (run_dir / "checkpoint.msgpack").read_bytes()
  )
  return raw["meta"]["round"], jax.tree.leaves(raw["state"]["server"])


def test_launch_checkpoint_and_resume_equal_one_device(tmp_path):
  """`launch` runs 2 processes x 2 devices on client-sharded data for 2
  rounds; a second launch resumes the checkpoint process 0 wrote, to round
  3. Same parameters as 3 rounds in 1 process on 1 device."""
  exp = "experiments/fedavg_synthetic.py:smoke"
  _cli(
    [
      "run",
      exp,
      "--local-devices",
      "1",
      "--out",
      str(tmp_path / "one"),
      "--no-progress",
    ]
  )
  (one,) = (tmp_path / "one").iterdir()
  launch = ["launch", "--processes", "2", "--devices", "4"]
  launch += ["--log-dir", str(tmp_path)]
  _cli(
    launch
    + [
      exp,
      "--placement",
      "sharded",
      "--set",
      "num_rounds=2",
      "--out",
      str(tmp_path / "two"),
      "--no-progress",
    ]
  )
  (two,) = (tmp_path / "two").iterdir()
  assert _final_params(two)[0] == 2
  out = _cli(
    launch
    + [
      "--resume",
      str(two),
      "--placement",
      "sharded",
      "--set",
      "num_rounds=3",
      "--no-progress",
    ]
  )
  assert "round=3" in out
  r1, p1 = _final_params(one)
  r2, p2 = _final_params(two)
  assert r1 == r2 == 3
  for a, b in zip(p1, p2):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  rows = [
    json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()
  ]
  assert [r["round"] for r in rows] == [1, 2, 3]  # process 0 alone wrote


def test_launch_bad_process_count(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  p = subprocess.run(
    [
      sys.executable,
      "-m",
      "fedjax_lite",
      "launch",
      "--processes",
      "3",
      "--devices",
      "4",
      "experiments/fedavg_synthetic.py:smoke",
    ],
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
    cwd=ROOT,
  )
  assert p.returncode == 2
  assert "3 processes cannot share 4 devices equally" in p.stderr


def test_launch_options_anywhere_on_the_line():
  from fedjax_lite.experiment.cli import _split_launch_args  # noqa: PLC0415

  own, run = _split_launch_args(
    [
      "--resume",
      "runs/x",
      "--processes",
      "2",
      "--placement",
      "sharded",
      "--devices=4",
      "--",
      "--set",
      "num_rounds=3",
    ]
  )
  assert own == ["--processes", "2", "--devices=4"]
  assert run == [
    "--resume",
    "runs/x",
    "--placement",
    "sharded",
    "--set",
    "num_rounds=3",
  ]


def test_run_options_and_exit_status():
  from fedjax_lite.experiment import launch  # noqa: PLC0415

  opts = launch.run_options(
    [
      "--placement",
      "sharded",
      "experiments/x.py:smoke",
      "--set",
      "num_rounds=5",
      "seed=2",
      "--out=o",
      "--checkpoint-every",
      "1",
      "--no-progress",
    ]
  )
  assert opts["spec"] == "experiments/x.py:smoke"
  assert opts["out"] == "o" and opts["resume"] is None
  rest = ["--placement", "sharded", "--checkpoint-every", "1", "--no-progress"]
  assert opts["rest"] == rest
  opts = launch.run_options(["--resume", "runs/a b", "--set", "num_rounds=9"])
  assert opts["resume"] == "runs/a b" and opts["spec"] is None
  assert opts["out"] == "runs" and opts["rest"] == []
  folder = launch.RunFolder(["--resume", "runs/a b"], ["--processes", "2"])
  assert folder.resume_command(pathlib.Path("runs/a b")) == (
    "python -m fedjax_lite launch --processes 2 --resume 'runs/a b'"
  )
  assert launch.exit_status(-9) == 137 and launch.exit_status(3) == 3
  assert launch.describe_end(-9) == "killed by SIGKILL (exit status 137)"
  assert launch.describe_end(1) == "exit status 1"


def _child(parent: int, process_id: int) -> int | None:
  """The pid of ``parent``'s child started with ``--process-id N``."""
  for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
    try:
      ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
      argv = (stat.parent / "cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError, IndexError):
      continue
    if ppid == parent and b"--process-id" in argv:
      if argv[argv.index(b"--process-id") + 1] == str(process_id).encode():
        return int(stat.parent.name)
  return None


_NOISE = (
  "Fatal Python error",
  "terminate called",
  "Aborted",
  "Check failed",
  "Check failure",
  "Traceback",
)


# The default tier's two-process test is
# test_launch_checkpoint_and_resume_equal_one_device; these run with -m slow.
@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc")
@pytest.mark.parametrize("victim", [1, 0])
def test_launch_lost_process_then_resume(tmp_path, victim):
  """A process of a launched run is SIGKILLed after its first rounds: the
  launcher stops the other one before JAX aborts it, ends with one
  `error:` line naming the lost process and the resume command, and exits
  with 128 + SIGKILL. That command continues the run from its checkpoint."""
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  out = tmp_path / "out"
  launcher = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "fedjax_lite",
      "launch",
      "--processes",
      "2",
      "--devices",
      "2",
      "--log-dir",
      str(tmp_path),
      "experiments/fedavg_synthetic.py:smoke",
      "--set",
      "num_rounds=100000",
      "--checkpoint-every",
      "1",
      "--out",
      str(out),
      "--no-progress",
    ],
    env=env,
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    deadline = time.monotonic() + 240
    rows = 0
    while rows < 2:  # round 1 is then in the checkpoint
      assert launcher.poll() is None, launcher.communicate()
      assert time.monotonic() < deadline, "no round within 240 s"
      time.sleep(0.2)
      metrics = list(out.glob("*/metrics.jsonl"))
      if metrics:
        rows = len(metrics[0].read_text().splitlines())
    pid = _child(launcher.pid, victim)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    _, err = launcher.communicate(timeout=60)
    assert time.monotonic() - killed < 60
  finally:
    if launcher.poll() is None:
      launcher.kill()
      launcher.communicate()
  assert launcher.returncode == 128 + signal.SIGKILL, err[-3000:]
  errors = [line for line in err.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, err[-3000:]
  assert f"process {victim} of 2 was killed by SIGKILL" in errors[0]
  for noise in _NOISE:
    assert noise not in err, err[-3000:]
  (run_dir,) = out.iterdir()
  command = errors[0].split("Resume it with: ", 1)[1]
  assert f"--resume {run_dir}" in command
  done, _ = _final_params(run_dir)  # the last checkpoint loads
  assert done >= 1
  # Resume with the printed command, to one round past the checkpoint.
  args = shlex.split(command)
  assert args[:3] == ["python", "-m", "fedjax_lite"]
  text = _cli(args[3:] + ["--set", f"num_rounds={done + 1}"])
  assert f"round={done + 1}" in text
  assert _final_params(run_dir)[0] == done + 1
  rounds = [
    json.loads(x)["round"]
    for x in (run_dir / "metrics.jsonl").read_text().splitlines()
  ]
  assert rounds == list(range(1, done + 2))
