"""Shared pieces of every benchmark script in this folder: one timing helper,
one result record, machine facts and worker processes.

* :func:`time_calls` times callables one way everywhere: ``warmup`` calls of
  each variant first (compiling; their seconds are kept apart), then the
  timed calls. Several variants are interleaved round-robin (``cycles``
  cycles of ``repeats`` consecutive calls of each), so that a change of the
  machine's load hits all of them alike. Reported per variant: every timed
  call's seconds, their median (``seconds_per_round``) and minimum, and the
  1-minute load average before and after the timed calls.
* :func:`start_record` and :func:`write_record`: a result record is the
  command line, the machine (``lscpu`` model and flags, Python, JAX and its
  devices), the date, the load average at the start and at the end, and the
  float32 matmul peak measured in the same run (so a fraction of peak is
  always of this machine, now), plus the script's results. It is written as
  JSON (non-finite floats as text) and, where the script renders one, as
  markdown, whose header :func:`record_markdown` writes.
* :func:`run_worker` runs one measurement in a process of its own (its JSON
  on the last stdout line) with the load average before and after;
  :func:`summarize` pools several such processes of one system.

Only the standard library is imported at module level, so the PyTorch
workers (``torch_loops.py``) use this file from an environment without JAX.
Run as a script, it prints the float32 matmul peak of its process as JSON.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Mapping, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))  # the repository
EXPERIMENTS = os.path.join(ROOT, "experiments")
RESULTS = os.path.join(EXPERIMENTS, "results")

PEAK_WHERE = {
  "worker": "a process of its own, JAX's default XLA settings",
  "here": "the first device of the benchmark's process, as configured",
}


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


def time_calls(
  calls: Callable[[], object] | Mapping[str, Callable[[], object]],
  repeats: int,
  *,
  warmup: int = 1,
  cycles: int = 1,
  before: Callable[[str], object] | None = None,
  alternate: bool = False,
) -> dict:
  """Seconds per call of one callable, or of several interleaved.

  Every variant of ``calls`` (a callable, or a mapping name -> callable) is
  first called ``warmup`` times (compiling; ``warmup_seconds`` is their
  total); then ``cycles`` cycles each call every variant ``repeats`` times
  in a row, in the mapping's order (reversed in odd cycles with
  ``alternate``, so that neither side always goes first). A call must return
  only when its work is done (e.g. through ``jax.block_until_ready``).
  ``before(name)``, when given, runs untimed before every call of variant
  ``name`` (work a round needs that is not the thing measured).

  Returns, per variant (the dict itself for a single callable):
  ``round_seconds`` (every timed call, in order; ``cycles * repeats``),
  ``seconds_per_round`` (their median), ``best_seconds`` (their minimum),
  ``warmup_seconds``, and ``load_before`` / ``load_after`` (the 1-minute load
  average around the timed calls).
  """
  if repeats < 1 or cycles < 1:
    raise ValueError(
      f"time_calls needs repeats >= 1 and cycles >= 1, got repeats="
      f"{repeats}, cycles={cycles}"
    )
  single = callable(calls)
  named = {"": calls} if single else dict(calls)

  def call(name: str) -> float:
    if before is not None:
      before(name)
    t = time.perf_counter()
    named[name]()
    return time.perf_counter() - t

  warm = {name: sum(call(name) for _ in range(warmup)) for name in named}
  times = {name: [] for name in named}
  load_before = load_average()
  for c in range(cycles):
    order = list(named)[:: -1 if alternate and c % 2 else 1]
    for name in order:
      times[name] += [call(name) for _ in range(repeats)]
  load_after = load_average()
  out = {
    name: {
      "warmup_seconds": warm[name],
      "round_seconds": ts,
      "seconds_per_round": statistics.median(ts),
      "best_seconds": min(ts),
      "load_before": load_before,
      "load_after": load_after,
    }
    for name, ts in times.items()
  }
  return out[""] if single else out


def matmul_peak(n: int | None = None, repeats: int = 10) -> dict:
  """float32 ``n x n`` matmul GFLOP/s with jax on this process's first
  device: ``2 n^3`` over the median (``peak_gflops``) and the fastest
  (``best_gflops``) of ``repeats`` timed products after a compiling one.
  ``n`` is 2048 on CPU and 8192 on an accelerator unless given."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  if n is None:
    n = 2048 if jax.devices()[0].platform == "cpu" else 8192
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  t = time_calls(lambda: f(a, a).block_until_ready(), repeats)
  return {
    "matmul_n": n,
    "peak_gflops": 2 * n**3 / t["seconds_per_round"] / 1e9,
    "best_gflops": 2 * n**3 / t["best_seconds"] / 1e9,
  }


def measure_peak(where: str = "worker") -> dict:
  """:func:`matmul_peak` in a fresh process with JAX's default XLA settings
  (``where="worker"``, for scripts whose measurements run in processes of
  their own) or in this process as configured (``"here"``: with
  fedjax_lite's CPU settings, one device of one core)."""
  if where not in PEAK_WHERE:
    raise ValueError(
      f"where must be one of {sorted(PEAK_WHERE)}, got {where!r}"
    )
  if where == "here":
    out = matmul_peak()
  else:
    out = run_worker([os.path.abspath(__file__)], env={"XLA_FLAGS": ""})
  out["where"] = PEAK_WHERE[where]
  return out


def run_worker(
  argv: Sequence[str],
  *,
  python: str | None = None,
  env: dict | None = None,
  cwd: str | None = None,
) -> dict:
  """Runs ``python argv...`` in a new process (``env`` added to this one's)
  and returns the JSON of its last stdout line, with the load average
  before and after added."""
  cmd = [python or sys.executable, *argv]
  full_env = dict(os.environ)
  full_env.update(env or {})
  before = load_average()
  proc = subprocess.run(
    cmd, capture_output=True, text=True, env=full_env, cwd=cwd, check=False
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


# ----------------------------------------------------------------- records
def machine(devices: bool = False) -> dict:
  """This machine: :func:`cpu_info`, the Python and JAX versions and, with
  ``devices``, JAX's device count and platform and fedjax_lite's XLA
  settings when it is imported (that starts JAX's backend: a script that
  only launches worker processes leaves it off)."""
  info = {"cpu": cpu_info(), "python": platform.python_version()}
  try:
    import jax  # pylint: disable=g-import-not-at-top
  except ImportError:
    return info
  info["jax"] = jax.__version__
  if devices:
    info["devices"] = len(jax.devices())
    info["platform"] = jax.devices()[0].platform
    runtime = sys.modules.get("fedjax_lite.runtime")
    if runtime is not None:
      info["settings"] = runtime.settings()
  return info


def command_line(script: str, argv: Sequence[str] | None = None) -> str:
  """``python <script relative to the repository> <argv>`` (``argv``: this
  process's arguments unless given)."""
  args = sys.argv[1:] if argv is None else list(argv)
  path = os.path.relpath(os.path.abspath(script), ROOT)
  return " ".join(["python", path, *args])


def start_record(
  script: str,
  argv: Sequence[str] | None = None,
  *,
  peak: str = "worker",
  devices: bool = False,
) -> dict:
  """A run's record before its results: the command line, the date (UTC),
  :func:`machine`, the load average (1, 5, 15 minutes) now, and the matmul
  peak measured now (:func:`measure_peak`'s ``where``)."""
  return {
    "command": command_line(script, argv),
    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    "machine": machine(devices),
    "load_average": {"start": list(os.getloadavg())},
    "peak": measure_peak(peak),
  }


def json_safe(x):
  """``x`` with non-finite floats as text ("nan", "inf"), as strict JSON
  and the run folders write them."""
  if isinstance(x, float) and not math.isfinite(x):
    return str(x)
  if isinstance(x, dict):
    return {k: json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [json_safe(v) for v in x]
  return x


def write_record(
  record: dict,
  json_path: str | os.PathLike | None,
  markdown: str | Callable[[dict], str] | None = None,
  md_path: str | os.PathLike | None = None,
) -> None:
  """Adds the load average at the end to ``record`` (in place) and writes it
  as JSON to ``json_path`` (nothing when None) and ``markdown`` (a text, or
  a function of the finished record that renders it) to ``md_path``
  (default: ``json_path`` with ``.md``)."""
  record.setdefault("load_average", {})["end"] = list(os.getloadavg())
  if callable(markdown):
    markdown = markdown(record)
  if json_path is not None:
    json_path = os.fspath(json_path)
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as f:
      f.write(json.dumps(json_safe(record), indent=1) + "\n")
  if markdown is not None:
    md_path = os.fspath(md_path or os.path.splitext(json_path)[0] + ".md")
    os.makedirs(os.path.dirname(os.path.abspath(md_path)), exist_ok=True)
    with open(md_path, "w") as f:
      f.write(markdown)


def read_record(path: str | os.PathLike) -> dict:
  """A record from its JSON file. Records written before
  :func:`write_record` existed keep the machine under ``cpu`` (or as a
  string under ``machine``) and the load under ``load_average_start`` /
  ``_end``: they are moved to where :func:`record_markdown` reads them."""
  with open(path) as f:
    record = json.load(f)
  if isinstance(record.get("machine"), str):
    record["machine"] = {"description": record["machine"]}
  if "machine" not in record and "cpu" in record:
    record["machine"] = {"cpu": record.pop("cpu")}
  if "load_average" not in record and "load_average_start" in record:
    record["load_average"] = {
      "start": record.pop("load_average_start"),
      "end": record.pop("load_average_end", None),
    }
  return record


def record_markdown(record: dict) -> str:
  """The command line, then the machine, matmul peak, date and load average
  of ``record`` as one paragraph (what every results page starts with)."""
  m = record.get("machine", {})
  cpu = m.get("cpu", {})
  if "description" in m:
    facts = [m["description"]]
  else:
    facts = [
      f"{cpu.get('model', '?')}, {cpu.get('cores', '?')} cores, AVX-512: "
      f"{'yes' if cpu.get('avx512f') else 'no'}"
    ]
  if "jax" in m:
    devices = (
      f" on {m['devices']} {m.get('platform', '')} devices".replace("  ", " ")
      if "devices" in m
      else ""
    )
    facts.append(f"Python {m.get('python', '?')}, JAX {m['jax']}{devices}")
  peak = record.get("peak") or {}
  if "peak_gflops" in peak:
    facts.append(
      f"float32 matmul peak {peak['peak_gflops']:.0f} GFLOP/s "
      f"({peak['matmul_n']}^2, {peak.get('where', 'same run')})"
    )
  text = f"Machine: {'; '.join(facts)}. Date: {record.get('date', '?')}."
  load = record.get("load_average") or {}
  if load.get("start") is not None:
    ends = [load["start"], load.get("end")]
    text += " Load average (1, 5, 15 min) at the start / end: " + " / ".join(
      ", ".join(f"{x:.1f}" for x in v) for v in ends if v is not None
    )
    text += "."
  return f"Command: `{record['command']}`\n\n{text}"


if __name__ == "__main__":
  print(json.dumps(matmul_peak()))
