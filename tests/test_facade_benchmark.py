"""experiments/benchmarks/facade.py runs in smoke mode and writes its record."""

import importlib.util
import json
from pathlib import Path

SCRIPT = (
  Path(__file__).resolve().parent.parent
  / "experiments"
  / "benchmarks"
  / "facade.py"
)


def test_facade_benchmark_smoke(tmp_path, capsys):
  spec = importlib.util.spec_from_file_location("facade_benchmark", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  res = module.main(["--smoke", "--out", str(tmp_path)])
  got = json.loads((tmp_path / "facade_smoke.json").read_text())
  assert got == json.loads(json.dumps(res))
  modes = {"engine", "facade_dataset", "facade_lists"}
  assert set(got["seconds_per_round"]) == modes
  assert all(v > 0 for v in got["seconds_per_round"].values())
  assert set(got["ratios_to_engine"]) == {"facade_dataset", "facade_lists"}
  assert set(got["meets_targets"]) == set(got["ratios_to_engine"])
  assert all(len(got["times"][m]) == got["rounds"] == 3 for m in modes)
  # The shared record: command line, machine, date, load, matmul peak.
  assert got["command"] == (
    f"python experiments/benchmarks/facade.py --smoke --out {tmp_path}"
  )
  assert got["machine"]["devices"] >= 1 and "cpu" in got["machine"]
  assert got["peak"]["peak_gflops"] > 0
  assert set(got["load_average"]) == {"start", "end"}
  for key in ("date", "load_before", "load_after", "config"):
    assert key in got
  # Every variant compiles its round once (no retracing between rounds).
  assert got["engine_traces"] == 1
  assert got["facade_traces"]["8"] == 1
  assert "| `process.next`, per-client list" in capsys.readouterr().out
