"""Shared pieces of the benchmark scripts: machine facts, the matmul peak,
timed rounds, separate worker processes and result files.

Every benchmark here measures seconds per round as the median of timed
rounds after a warm-up round, runs each system in its own process,
interleaves the systems' processes, and records the CPU, the 1-minute load
average before and after each process, and the float32 matmul peak measured
in the same run (so a fraction of peak is always of this machine, now).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Sequence


def cpu_info() -> dict:
  """Machine, core count, ``lscpu`` model and AVX flags."""
  info = {"machine": platform.machine(), "cores": os.cpu_count()}
  try:
    out = subprocess.run(
      ["lscpu"], capture_output=True, text=True, check=False
    ).stdout
  except OSError:
    return info
  for line in out.splitlines():
    if line.startswith("Model name:"):
      info["model"] = line.split(":", 1)[1].strip()
    if line.startswith("Flags:"):
      flags = line.split(":", 1)[1].split()
      info["avx512f"] = "avx512f" in flags
      info["avx2"] = "avx2" in flags
  return info


def load_average() -> float:
  """The 1-minute load average."""
  return os.getloadavg()[0]


def time_rounds(round_fn: Callable[[], object], rounds: int) -> dict:
  """Runs ``round_fn`` once to warm up (compile), then ``rounds`` timed
  times; ``round_fn`` must block until its results are ready."""
  t = time.perf_counter()
  round_fn()
  warmup = time.perf_counter() - t
  times = []
  for _ in range(rounds):
    t = time.perf_counter()
    round_fn()
    times.append(time.perf_counter() - t)
  return {
    "warmup_seconds": warmup,
    "round_seconds": times,
    "seconds_per_round": statistics.median(times),
  }


def matmul_peak(n: int = 2048, repeats: int = 10) -> dict:
  """float32 ``n x n`` matmul GFLOP/s with jax in THIS process (call it in a
  process of its own, with the XLA settings whose peak you want)."""
  import jax
  import jax.numpy as jnp

  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  f(a, a).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, a).block_until_ready()
    times.append(time.perf_counter() - t)
  return {
    "matmul_n": n,
    "peak_gflops": 2 * n**3 / statistics.median(times) / 1e9,
    "best_gflops": 2 * n**3 / min(times) / 1e9,
  }


def run_worker(
  argv: Sequence[str], *, python: str | None = None, env: dict | None = None
) -> dict:
  """Runs ``python argv...`` in a new process and returns the JSON of its
  last stdout line, with the load average before and after added."""
  cmd = [python or sys.executable, *argv]
  full_env = dict(os.environ)
  full_env.update(env or {})
  before = load_average()
  proc = subprocess.run(
    cmd, capture_output=True, text=True, env=full_env, check=False
  )
  if proc.returncode != 0:
    raise RuntimeError(
      f"worker {' '.join(cmd)} failed ({proc.returncode}):\n"
      f"{proc.stderr[-4000:]}"
    )
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  out["load_before"], out["load_after"] = before, load_average()
  return out


def summarize(results: Sequence[dict]) -> dict:
  """Pools the timed rounds of several processes of one system."""
  times = [t for r in results for t in r["round_seconds"]]
  loads = [r[k] for r in results for k in ("load_before", "load_after")]
  return {
    "seconds_per_round": statistics.median(times),
    "round_seconds": times,
    "processes": len(results),
    "max_load": max(loads),
  }


def write_json(path: str | None, results: dict) -> None:
  """Writes ``results`` (with the date and command line) to ``path``."""
  if not path:
    return
  results = dict(results)
  results["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
  results["command"] = " ".join([os.path.basename(sys.executable)] + sys.argv)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(results, f, indent=1)
