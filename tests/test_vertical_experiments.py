"""The vertical experiment files run end to end in smoke mode (slow)."""

import json

import pytest

from fedjax_lite.__main__ import main
from fedjax_lite.experiment import config as cfglib

from experiment_files import EXPERIMENTS, load  # pylint: disable=g-bad-import-order

SCRIPT = """
import dataclasses, json

@dataclasses.dataclass(frozen=True)
class Config:
  steps: int = 5
  scale: float = 1.0

def get_config(arg=""):
  return Config(steps=1) if arg == "smoke" else Config()

def run(config, run_dir):
  summary = {"steps": config.steps, "value": config.scale * config.steps}
  (run_dir / "summary.json").write_text(json.dumps(summary))
  return summary
"""


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vertical_lr", "split_nn", "ftl"])
def test_experiment_smoke(name, tmp_path, capsys):
  assert (
    main(["run", f"{EXPERIMENTS / name}.py:smoke", "--out", str(tmp_path)]) == 0
  )
  (run_dir,) = tmp_path.iterdir()
  summary = json.loads(capsys.readouterr().out.rsplit("run folder:", 1)[0])
  for f in ("metrics.jsonl", "curves.png", "summary.json"):
    assert (run_dir / f).stat().st_size > 0, f
  assert json.loads((run_dir / "summary.json").read_text()) == json.loads(
    json.dumps(summary)
  )
  if name == "vertical_lr":
    assert summary["paillier"]["epochs"][0]["abs_loss_diff"] < 1e-3
  if name == "ftl":
    assert summary["paillier_step"]["max_abs_param_diff"] < 1e-5


def test_experiment_configs():
  for name in ("vertical_lr", "split_nn", "ftl"):
    module = load(name)
    assert module.get_config("smoke") != module.get_config()
    with pytest.raises(ValueError, match="unknown config arg"):
      module.get_config("nope")


def test_run_command_runs_script_style_files(tmp_path, capsys):
  """`python -m fedjax_lite run X.py[:arg]` of a file with run(config,
  run_dir) and no build: a fresh folder, config.json, the summary printed;
  the engine's options, resume and sweep are refused by name."""
  path = tmp_path / "script_exp.py"
  path.write_text(SCRIPT)
  out = tmp_path / "runs"
  assert (
    main(["run", f"{path}:smoke", "--out", str(out), "--set", "scale=2"]) == 0
  )
  (run_dir,) = out.iterdir()
  assert run_dir.name.startswith("script_exp-smoke-")
  record = json.loads((run_dir / "config.json").read_text())
  assert record["config"] == {"steps": 1, "scale": 2.0}
  assert record["experiment"]["arg"] == "smoke"
  printed = capsys.readouterr().out
  assert json.loads(printed.split("run folder:")[0]) == {
    "steps": 1,
    "value": 2.0,
  }
  assert json.loads((run_dir / "summary.json").read_text())["value"] == 2.0
  assert (
    main(["run", str(path), "--out", str(out), "--log", "tensorboard"]) == 2
  )
  assert capsys.readouterr().err == (
    "error: script_exp.py defines run(config, run_dir) (not an engine "
    "Experiment): --log does not apply to it; use --set and --out.\n"
  )
  assert main(["sweep", str(path), "--out", str(out), "--seeds", "2"]) == 2
  assert "defines run(config, run_dir), not build(config)" in (
    capsys.readouterr().err
  )
  assert len(list(out.iterdir())) == 1  # nothing made by the refusals
  ef = cfglib.load_experiment_file(str(path))
  assert ef.script
  (tmp_path / "neither.py").write_text("def get_config(arg=''):\n  return 1\n")
  with pytest.raises(cfglib.ConfigError, match=r"has no function build\(\)"):
    cfglib.load_experiment_file(str(tmp_path / "neither.py"))
