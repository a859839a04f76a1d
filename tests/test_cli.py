"""The command line: help, clear errors, and exact resume after SIGTERM or
SIGKILL."""

import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import flax.serialization
import jax
import numpy as np
import pytest

from fedjax_lite.__main__ import main
from fedjax_lite.experiment.records import TIMING_KEYS, read_jsonl

from experiment_files import EXPERIMENTS  # pylint: disable=g-bad-import-order
from test_experiment import TINY_EXPERIMENT  # pylint: disable=g-bad-import-order


@pytest.fixture
def tiny(tmp_path):
  path = tmp_path / "tiny.py"
  path.write_text(TINY_EXPERIMENT)
  return str(path)


@pytest.fixture(scope="module")
def one_round_run(tmp_path_factory):
  """``(experiment file, run folder)`` of one finished 1-round run of the
  tiny experiment, made once for the module; tests damage copies of the
  folder (:func:`copy_run`)."""
  from fedjax_lite.experiment.files import run_file

  root = tmp_path_factory.mktemp("one_round")
  path = root / "tiny.py"
  path.write_text(TINY_EXPERIMENT)
  res = run_file(str(path), ["num_rounds=1"], out=root / "runs", progress=False)
  return str(path), res.run_dir


def copy_run(one_round_run, tmp_path) -> pathlib.Path:
  """A copy of the 1-round run folder in ``tmp_path`` (what
  ``run_file(tiny, ["num_rounds=1"], out=tmp_path)`` makes)."""
  _, run_dir = one_round_run
  return pathlib.Path(shutil.copytree(run_dir, tmp_path / run_dir.name))


def test_help_lists_commands_options_and_config_fields(tiny, capsys):
  with pytest.raises(SystemExit) as e:
    main(["--help"])
  assert e.value.code == 0
  assert "{run,sweep,compare,launch,export}" in capsys.readouterr().out
  with pytest.raises(SystemExit):
    main(["run", tiny, "--help"])
  out = capsys.readouterr().out
  for text in (
    "--set",
    "--resume",
    "--checkpoint-every",
    "--out",
    "--placement",
    "--coordinator",
    "client_lr: float = 0.1",
    "num_rounds: int = 4",
    "Tiny test experiment",
  ):
    assert text in out, text
  with pytest.raises(SystemExit):
    main(["sweep", "--help"])
  assert "--seeds" in capsys.readouterr().out


@pytest.mark.parametrize(
  "argv, message",
  [
    (
      ["run", "{tiny}", "--set", "num_round=3"],
      "unknown config field 'num_round' for Config; expected one of "
      "num_rounds,",
    ),
    (
      ["run", "{tiny}", "--set", "num_rounds=three"],
      "--set num_rounds: expected an int, got 'three'",
    ),
    (["run", "{tiny}x"], "does not exist"),
    (["run"], "needs an experiment file"),
    (["run", "--resume", "{dir}"], "not a run folder (no config.json)"),
    (["run", "--resume", "{dir}/nope"], "no such folder"),
    (["sweep", "--resume", "{dir}"], "not a sweep folder (no sweep.json)"),
    (
      ["sweep", "{tiny}", "--grid", "num_rounds=1,2"],
      "cannot sweep 'num_rounds'",
    ),
    (["sweep", "{tiny}", "--seeds", "x"], "--seeds expects a count"),
    (["compare", "{dir}", "--out", "{dir}/cmp"], "no metrics.jsonl"),
  ],
)
def test_bad_input_exits_2_with_a_clear_message(
  tiny, tmp_path, capsys, argv, message
):
  argv = [a.format(tiny=tiny, dir=tmp_path) for a in argv]
  assert main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and message in err, err


def test_module_entry_point_runs():
  out = subprocess.run(
    [sys.executable, "-m", "fedjax_lite", "run", "--help"],
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert out.returncode == 0, out.stderr
  assert "--checkpoint-every" in out.stdout


def _num_lines(path):
  try:
    return path.read_text().count("\n")
  except FileNotFoundError:
    return 0


def _strip(rows):
  return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def _checkpoint_round(run_dir):
  try:
    raw = flax.serialization.msgpack_restore(
      (run_dir / "checkpoint.msgpack").read_bytes()
    )
  except (FileNotFoundError, ValueError):
    return -1
  return int(raw["meta"]["round"])


# SIGKILL (no handler runs: the run resumes from its last periodic
# checkpoint) is the default tier's kill/resume test; SIGTERM runs with -m slow.
@pytest.mark.parametrize(
  "signum",
  [pytest.param(signal.SIGTERM, marks=pytest.mark.slow), signal.SIGKILL],
  ids=["SIGTERM", "SIGKILL"],
)
def test_kill_mid_run_then_resume_is_bit_identical(tiny, tmp_path, signum):
  """40 slow rounds (50 ms each) with the default checkpoint settings: run
  once uninterrupted; run again, stop it after >= 8 rounds (SIGTERM: it
  checkpoints and exits; SIGKILL: no handler can run, it resumes from its
  last periodic checkpoint), resume it; the final states (params, Adam state,
  client states, rng, round) and all metrics must be identical, each round
  in metrics.jsonl exactly once."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
    env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
  ).strip()
  cmd = [
    sys.executable,
    "-m",
    "fedjax_lite",
    "run",
    f"{tiny}:long",
    "--no-progress",
    "--out",
  ]
  full = subprocess.Popen(
    cmd + [str(tmp_path / "full")],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  cut = subprocess.Popen(
    cmd + [str(tmp_path / "cut")],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    deadline = time.monotonic() + 300
    while True:
      dirs = list((tmp_path / "cut").glob("tiny-long-*"))
      if (
        dirs
        and _num_lines(dirs[0] / "metrics.jsonl") >= 8
        and (signum == signal.SIGTERM or _checkpoint_round(dirs[0]) >= 1)
      ):
        break
      assert cut.poll() is None, cut.communicate()
      assert time.monotonic() < deadline, "the run never reached round 8"
      time.sleep(0.01)
    cut.send_signal(signum)
    _, err = cut.communicate(timeout=300)
  finally:
    if cut.poll() is None:
      cut.kill()
  cut_dir = dirs[0]
  if signum == signal.SIGTERM:
    assert cut.returncode == 128 + signal.SIGTERM, err
    assert "Resume with: python -m fedjax_lite run --resume" in err
    summary = json.loads((cut_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert 8 <= summary["rounds_done"] < 40
    assert len(read_jsonl(cut_dir / "metrics.jsonl")) == summary["rounds_done"]
  else:
    assert cut.returncode == -signal.SIGKILL, err
    assert not (cut_dir / "summary.json").exists()
    assert 1 <= _checkpoint_round(cut_dir) < 40

  resumed = subprocess.run(
    [
      sys.executable,
      "-m",
      "fedjax_lite",
      "run",
      "--resume",
      str(cut_dir),
      "--no-progress",
    ],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert resumed.returncode == 0, resumed.stderr
  _, err = full.communicate(timeout=300)
  assert full.returncode == 0, err
  full_dir = next((tmp_path / "full").glob("tiny-long-*"))

  def final_state(d):
    raw = flax.serialization.msgpack_restore(
      (d / "checkpoint.msgpack").read_bytes()
    )
    return raw["state"]

  a, b = final_state(full_dir), final_state(cut_dir)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert int(a["round"]) == 40
  assert int(np.sum(a["clients"])) == 40 * 4  # client states were restored
  rows_full = read_jsonl(full_dir / "metrics.jsonl")
  rows_cut = read_jsonl(cut_dir / "metrics.jsonl")
  assert [r["round"] for r in rows_cut] == list(range(1, 41))
  assert _strip(rows_cut) == _strip(rows_full)
  assert json.loads((cut_dir / "config.json").read_text())["resumes"]


def test_resume_without_checkpoint_says_restart(
  one_round_run, tmp_path, capsys
):
  """A run folder whose run died before its first checkpoint: one clear
  line with the command that restarts it, no traceback."""
  tiny, _ = one_round_run
  run_dir = copy_run(one_round_run, tmp_path)
  (run_dir / "checkpoint.msgpack").unlink()
  assert main(["run", "--resume", str(run_dir)]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "Traceback" not in err, err
  assert "no checkpoint.msgpack there" in err and "cannot be resumed" in err
  assert (
    f"restarted: python -m fedjax_lite run {tiny} --set num_rounds=1" in err
  )
  assert main(["sweep", "--resume", str(run_dir)]) == 2
  assert (
    "that is a run folder; resume it with `python -m fedjax_lite run "
    "--resume" in capsys.readouterr().err
  )


def test_sweep_whose_every_setting_diverges_exits_3(tiny, tmp_path, capsys):
  """A sweep stops as diverged like a run, at the first round in which every
  setting diverged (one error line, exit 3, the last finite state as the
  checkpoint); ``--on-divergence continue`` runs every round."""
  out = tmp_path / "runs"
  argv = ["sweep", tiny, "--out", str(out), "--no-progress", "--seeds", "2"]
  assert main([*argv, "--set", "client_lr=nan", "num_rounds=2"]) == 3
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: the sweep diverged"), err
  assert "round 1 (every setting diverged (setting 0: all 4" in err[0], err
  sweep_dir = next(out.glob("tiny-sweep-*"))
  rows = read_jsonl(sweep_dir / "metrics.jsonl")
  assert [(r["round"], r["setting"]) for r in rows] == [(1, 0), (1, 1)]
  raw = (sweep_dir / "checkpoint.msgpack").read_bytes()
  meta = flax.serialization.msgpack_restore(raw)["meta"]
  assert meta["round"] == 0 and meta["num_rows"] == 0
  more = ["--on-divergence", "continue", "--set", "client_lr=nan"]
  assert main([*argv, *more, "num_rounds=2"]) == 0
  sweep_dir = max(out.glob("tiny-sweep-*"))
  rows = read_jsonl(sweep_dir / "metrics.jsonl")
  assert [r["round"] for r in rows] == [1, 1, 2, 2]
  assert all(r["train_dropped_nonfinite"] == 4.0 for r in rows)


def test_damaged_checkpoint_names_the_file(one_round_run, tmp_path, capsys):
  run_dir = copy_run(one_round_run, tmp_path)
  path = run_dir / "checkpoint.msgpack"
  path.write_bytes(path.read_bytes()[:40])  # truncated
  assert main(["run", "--resume", str(run_dir)]) == 2
  err = capsys.readouterr().err
  assert "Traceback" not in err and str(path) in err and "damaged" in err, err


# ------------------------------------------- issue 23: no silent wrong number
SMOKE = str(EXPERIMENTS / "fedavg_synthetic.py") + ":smoke"


def _one_error_line(capsys) -> str:
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  assert "Traceback" not in err, err
  return err


@pytest.mark.parametrize(
  "args, message",
  [
    (
      [SMOKE, "--set", "num_rounds=-5"],
      "Experiment.num_rounds must be >= 1, got -5",
    ),
    (
      [str(EXPERIMENTS / "fedavg_synthetic.py") + ":nosuchpreset"],
      "unknown config arg 'nosuchpreset'; expected one of '', 'smoke'",
    ),
  ],
  ids=["negative_num_rounds", "unknown_preset"],
)
def test_bad_config_exits_2_naming_the_value(tmp_path, capsys, args, message):
  out = tmp_path / "runs"
  assert main(["run", *args, "--out", str(out), "--no-progress"]) == 2
  assert message in _one_error_line(capsys)
  assert not out.exists() or not any(out.iterdir())  # no run folder left


def _hashes(folder):
  return {
    str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(folder.rglob("*"))
    if p.is_file()
  }


def test_refused_resume_leaves_the_folder_unchanged(tmp_path, capsys):
  """`--resume --set num_rounds=N` below the checkpoint's round: one error
  line naming N and the round; every file of the folder is byte-for-byte
  the same, so the folder still resumes without the override."""
  assert main(["run", SMOKE, "--out", str(tmp_path), "--no-progress"]) == 0
  run_dir = next(tmp_path.glob("fedavg_synthetic-smoke-*"))
  capsys.readouterr()
  before = _hashes(run_dir)
  argv = ["run", "--resume", str(run_dir), "--no-progress"]
  assert main([*argv, "--set", "num_rounds=1"]) == 2
  err = _one_error_line(capsys)
  assert "num_rounds=1" in err and "round 3" in err, err
  assert _hashes(run_dir) == before
  assert main(argv) == 0, capsys.readouterr().err
  record = json.loads((run_dir / "config.json").read_text())
  assert record["config"]["num_rounds"] == 3
  assert [r["overrides"] for r in record["resumes"]] == [{}]


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", ""])
def test_resume_with_corrupt_config_json_exits_2(
  one_round_run, tmp_path, capsys, text
):
  run_dir = copy_run(one_round_run, tmp_path)
  path = run_dir / "config.json"
  path.write_text(text)
  assert main(["run", "--resume", str(run_dir)]) == 2
  err = _one_error_line(capsys)
  assert str(path) in err and "expected" in err, err
  assert path.read_text() == text


def test_unwritable_out_exits_2(tiny, tmp_path, capsys, monkeypatch):
  """A read-only --out (simulated: the tests may run as root) and an --out
  that is a file: one error line naming the folder."""
  out = tmp_path / "readonly"
  real_mkdir = pathlib.Path.mkdir

  def mkdir(self, *args, **kwargs):
    if str(self).startswith(str(out)):
      raise PermissionError(13, "Permission denied", str(self))
    return real_mkdir(self, *args, **kwargs)

  monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
  assert main(["run", tiny, "--out", str(out), "--no-progress"]) == 2
  err = _one_error_line(capsys)
  assert f"--out {out}" in err and "Permission denied" in err, err
  monkeypatch.undo()
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  assert main(["run", tiny, "--out", str(a_file), "--no-progress"]) == 2
  assert f"--out {a_file}" in _one_error_line(capsys)
