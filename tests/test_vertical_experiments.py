"""The vertical experiment files run end to end in smoke mode (slow)."""

import importlib.util
import json
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def _load(name):
  spec = importlib.util.spec_from_file_location(
    name, EXPERIMENTS / f"{name}.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vertical_lr", "split_nn", "ftl"])
def test_experiment_smoke(name, tmp_path):
  module = _load(name)
  summary = module.main(["--smoke", "--out", str(tmp_path)])
  (run_dir,) = tmp_path.iterdir()
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
    module = _load(name)
    assert module.get_config("smoke") != module.get_config()
    with pytest.raises(ValueError, match="unknown config arg"):
      module.get_config("nope")
