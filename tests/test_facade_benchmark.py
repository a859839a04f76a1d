"""experiments/facade_benchmark.py runs in smoke mode and writes its record."""

import json

from experiment_files import load


def test_facade_benchmark_smoke(tmp_path, capsys):
  module = load("facade_benchmark")
  res = module.main(["--smoke", "--out", str(tmp_path)])
  got = json.loads((tmp_path / "facade_smoke.json").read_text())
  assert got == json.loads(json.dumps(res))
  modes = {"engine", "facade_dataset", "facade_lists"}
  assert set(got["seconds_per_round"]) == modes
  assert all(v > 0 for v in got["seconds_per_round"].values())
  assert set(got["ratios_to_engine"]) == {"facade_dataset", "facade_lists"}
  assert set(got["meets_targets"]) == set(got["ratios_to_engine"])
  assert all(len(got["times"][m]) == got["rounds"] == 3 for m in modes)
  for key in ("cpu", "date", "loadavg_before", "command", "config"):
    assert key in got
  # Every variant compiles its round once (no retracing between rounds).
  assert got["engine_traces"] == 1
  assert got["facade_traces"]["8"] == 1
  assert "| `process.next`, per-client list" in capsys.readouterr().out
