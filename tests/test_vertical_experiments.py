"""The vertical experiment files run end to end in smoke mode (slow)."""

import json

import pytest

from experiment_files import load


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vertical_lr", "split_nn", "ftl"])
def test_experiment_smoke(name, tmp_path):
  module = load(name)
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
    module = load(name)
    assert module.get_config("smoke") != module.get_config()
    with pytest.raises(ValueError, match="unknown config arg"):
      module.get_config("nope")
