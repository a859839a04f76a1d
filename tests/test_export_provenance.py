"""Provenance in config.json/summary.json, exporting a run's global model
(`export_params`, `load_params`, `Model.load_params`, the `export` command)
and the modes of a run folder's files."""

import argparse
import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import stat
import subprocess
import sys
import textwrap

import flax.serialization
import jax
import numpy as np
import pytest

import fedjax_lite as fl
from fedjax_lite import runtime
from fedjax_lite.experiment import checkpoint as ckpt
from fedjax_lite.experiment import cli, export, run_folder
from fedjax_lite.experiment.records import TIMING_KEYS, read_jsonl

from experiment_files import EXPERIMENTS  # pylint: disable=g-bad-import-order
from test_experiment import TINY_EXPERIMENT  # pylint: disable=g-bad-import-order

GIT = shutil.which("git")


@contextlib.contextmanager
def umask(mask):
  old = os.umask(mask)
  try:
    yield
  finally:
    os.umask(old)


def git(repo, *args):
  return subprocess.run(
    ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@x.org"]
    + ["-c", "commit.gpgsign=false", *args],
    capture_output=True,
    text=True,
    check=True,
    timeout=30,
  ).stdout.strip()


def run(spec, out, *sets):
  argv = ["run", str(spec), "--out", str(out), "--no-progress"]
  assert cli.main(argv + (["--set", *sets] if sets else [])) == 0
  (folder,) = [p for p in out.iterdir() if p.is_dir()]
  return folder


def export_main(argv):
  """``python -m fedjax_lite export ARGV`` through the command's own parser."""
  parser = argparse.ArgumentParser(prog="python -m fedjax_lite")
  export.add_export_parser(parser.add_subparsers(dest="command"))
  return export.export_command(parser.parse_args(["export", *map(str, argv)]))


def hashes(folder):
  return {
    str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(folder.rglob("*"))
    if p.is_file()
  }


def strip(rows):
  return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def tiny_experiment(path):
  ef = fl.experiment.load_experiment_file(str(path))
  return ef.build(ef.get_config())


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
  """A git checkout holding the tiny experiment (committed), and its
  4-round run made under umask 022."""
  if GIT is None:
    pytest.skip("git is not installed")
  root = tmp_path_factory.mktemp("repo")
  (root / "tiny.py").write_text(TINY_EXPERIMENT)
  (root / "notes.txt").write_text("notes\n")
  git(root, "init", "-q")
  git(root, "add", "tiny.py", "notes.txt")
  git(root, "commit", "-q", "-m", "tiny")
  with umask(0o022):
    run_dir = run(root / "tiny.py", root / "runs")
  return root, run_dir


def test_summary_and_config_record_versions_devices_and_git(repo):
  root, run_dir = repo
  summary = json.loads((run_dir / "summary.json").read_text())
  record = json.loads((run_dir / "config.json").read_text())
  head = git(root, "rev-parse", "HEAD")
  for prov in (summary["provenance"], record["environment"]):
    versions = prov["packages"]
    for dist in ("jax", "jaxlib", "flax", "optax", "numpy", "msgpack"):
      assert versions[dist] == importlib.metadata.version(dist), dist
    assert versions["fedjax_lite"] == fl.__version__
    assert prov["python"] == platform.python_version()
    assert prov["device_kind"] == jax.devices()[0].device_kind
    assert prov["num_devices"] == jax.device_count()
    assert prov["backend"] == jax.default_backend()
    assert prov["process_count"] == jax.process_count() == 1
    cpu = prov["cpu_settings"]
    assert {k: cpu[k] for k in runtime.settings()} == runtime.settings()
    assert cpu["usable_cores"] == runtime.usable_cores()
    exp = prov["experiment"]
    assert exp["file"] == str((root / "tiny.py").resolve())
    assert exp["sha256"] == record["experiment"]["sha256"]
    assert exp["sha256"] == hashlib.sha256(TINY_EXPERIMENT.encode()).hexdigest()
    assert exp["git_commit"] == head and len(head) == 40
    # the run folder is untracked in the checkout: still clean
    assert exp["git_dirty"] is False


def test_git_dirty_after_a_tracked_file_changes_and_absent_outside(
  repo, tmp_path, monkeypatch
):
  root, _ = repo
  notes = root / "notes.txt"
  try:
    notes.write_text("notes, edited\n")
    prov = run_folder.provenance(root / "tiny.py")["experiment"]
    assert prov["git_dirty"] is True
    assert prov["git_commit"] == git(root, "rev-parse", "HEAD")
  finally:
    notes.write_text("notes\n")
  assert run_folder.provenance(root / "tiny.py")["experiment"]["git_dirty"] is (
    False
  )
  outside = tmp_path / "tiny.py"
  outside.write_text(TINY_EXPERIMENT)
  prov = run_folder.provenance(outside)["experiment"]
  assert prov["git_commit"] is None and prov["git_dirty"] is None
  monkeypatch.setenv("PATH", str(tmp_path))  # no git program at all
  prov = run_folder.provenance(root / "tiny.py")["experiment"]
  assert prov["git_commit"] is None and prov["sha256"] is not None


def test_export_then_load_then_evaluate_reproduces_the_final_accuracy(
  repo, tmp_path
):
  root, run_dir = repo
  before = hashes(run_dir)
  out = tmp_path / "params.msgpack"
  with umask(0o022):
    assert export_main([run_dir, "--out", out]) == 0
  assert hashes(run_dir) == before  # read only
  assert stat.S_IMODE(out.stat().st_mode) == 0o644
  exp = tiny_experiment(root / "tiny.py")
  params = exp.model.load_params(out)
  summary = json.loads((run_dir / "summary.json").read_text())
  last = read_jsonl(run_dir / "metrics.jsonl")[-1]
  res = fl.evaluate(exp.model, params, exp.test)
  assert res.mean["accuracy"] == summary["final"]["test_accuracy"]
  assert res.mean["accuracy"] == last["test_accuracy"]
  assert res.mean["loss"] == last["test_loss"]
  # exactly the checkpoint's server params, in the model's own structure
  raw = flax.serialization.msgpack_restore(
    (run_dir / "checkpoint.msgpack").read_bytes()
  )
  want = raw["state"]["server"]["params"]
  loaded = fl.experiment.load_params(out)
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  assert jax.tree.structure(params) == jax.tree.structure(
    exp.model.init(jax.random.PRNGKey(0))
  )
  for a, b, c in zip(
    jax.tree.leaves(want), jax.tree.leaves(loaded), jax.tree.leaves(params)
  ):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    assert a.dtype == b.dtype == c.dtype == np.float32


def test_round_n_is_replayed_and_later_rounds_are_refused(
  repo, tmp_path, capsys
):
  root, run_dir = repo
  before = hashes(run_dir)
  exp = tiny_experiment(root / "tiny.py")
  rows = {r["round"]: r for r in read_jsonl(run_dir / "metrics.jsonl")}
  assert "test_accuracy" in rows[2]  # eval_every=2
  res = export.export_params(run_dir, tmp_path / "r2.msgpack", round=2)
  assert (res.round, res.source) == (2, "replay")
  ev = fl.evaluate(exp.model, exp.model.load_params(res.path), exp.test)
  assert ev.mean["accuracy"] == rows[2]["test_accuracy"]
  assert ev.mean["loss"] == rows[2]["test_loss"]
  assert ev.mean["accuracy"] != rows[4]["test_accuracy"]
  # round 0: the initial params
  assert export_main([run_dir, "--out", tmp_path / "r0", "--round", 0]) == 0
  assert "after round 0 (replayed)" in capsys.readouterr().out
  init = exp.initial_params()
  for a, b in zip(
    jax.tree.leaves(init),
    jax.tree.leaves(exp.model.load_params(tmp_path / "r0")),
  ):
    np.testing.assert_array_equal(np.asarray(a), b)
  # the checkpoint's round by number: no replay
  res4 = export.export_params(run_dir, tmp_path / "r4", round=4)
  assert (res4.round, res4.source) == (4, "checkpoint")
  # after the checkpoint: refused, naming the rounds available
  assert export_main([run_dir, "--out", tmp_path / "r5", "--round", 5]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: --round 5:")
  assert "checkpoint is at round 4" in err and "rounds 0..4" in err, err
  assert not (tmp_path / "r5").exists()
  with pytest.raises(ValueError, match=r"round \(--round\) must be None"):
    export.export_params(run_dir, tmp_path / "r", round=-1)
  assert hashes(run_dir) == before


def test_replay_is_refused_when_it_cannot_reproduce_the_run(repo, tmp_path):
  """An edited experiment file, or recorded metrics the replay does not
  match, stop an export of an earlier round with what to do."""
  root, run_dir = repo
  file = root / "tiny.py"
  try:
    file.write_text(TINY_EXPERIMENT + "# edited\n")
    with pytest.raises(ValueError, match="changed since the run started"):
      export.export_params(run_dir, tmp_path / "x", round=2)
    export.export_params(run_dir, tmp_path / "final")  # the checkpoint: fine
  finally:
    file.write_text(TINY_EXPERIMENT)
  copy = tmp_path / "copy"
  shutil.copytree(run_dir, copy)
  rows = read_jsonl(copy / "metrics.jsonl")
  rows[0]["train_loss"] *= 1.01
  (copy / "metrics.jsonl").write_text(
    "".join(json.dumps(r) + "\n" for r in rows)
  )
  with pytest.raises(ValueError) as e:
    export.export_params(copy, tmp_path / "y", round=2)
  assert "round 1 gives train_loss=" in str(e.value), e.value
  assert "Export the checkpoint's round instead" in str(e.value)
  assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_resume_after_export_is_unaffected(repo, tmp_path):
  """A copy of the run, exported (checkpoint and replay), then resumed to
  round 6, computes what an uninterrupted 6-round run computes; that run's
  round 4, replayed, is bit for bit the 4-round run's checkpoint."""
  root, run_dir = repo
  copy = tmp_path / "copy"
  shutil.copytree(run_dir, copy)
  export.export_params(copy, tmp_path / "a.msgpack")
  export.export_params(copy, tmp_path / "b.msgpack", round=1)
  notes = root / "notes.txt"
  try:  # a tracked file changes before the resume: summary.json says dirty
    notes.write_text("notes, edited\n")
    argv = ["run", "--resume", str(copy), "--set", "num_rounds=6"]
    assert cli.main(argv + ["--no-progress"]) == 0
  finally:
    notes.write_text("notes\n")
  prov = json.loads((copy / "summary.json").read_text())["provenance"]
  assert prov["experiment"]["git_dirty"] is True
  assert prov["experiment"]["git_commit"] == git(root, "rev-parse", "HEAD")
  fresh = run(root / "tiny.py", tmp_path / "fresh", "num_rounds=6")
  assert strip(read_jsonl(copy / "metrics.jsonl")) == strip(
    read_jsonl(fresh / "metrics.jsonl")
  )
  a = export.export_params(copy, tmp_path / "c.msgpack")
  b = export.export_params(fresh, tmp_path / "d.msgpack")
  assert a.round == b.round == 6
  assert (tmp_path / "c.msgpack").read_bytes() == (
    tmp_path / "d.msgpack"
  ).read_bytes()
  replayed = export.export_params(fresh, tmp_path / "e.msgpack", round=4)
  assert replayed.source == "replay"
  assert (tmp_path / "e.msgpack").read_bytes() == (
    tmp_path / "a.msgpack"
  ).read_bytes()


def test_loading_into_another_model_names_the_leaf(repo, tmp_path):
  _, run_dir = repo
  out = tmp_path / "p.msgpack"
  export.export_params(run_dir, out)
  wider = fl.models.logistic_regression(5, 3)
  with pytest.raises(ValueError) as e:
    wider.load_params(out)
  msg = str(e.value)
  assert "leaf ['Dense_0']['kernel'] has shape (4, 3) float32" in msg, msg
  assert "expects (5, 3) float32" in msg and str(out) in msg, msg
  deeper = fl.models.mlp(4, 3, hidden=(3,))  # Dense_0 fits, Dense_1 is new
  with pytest.raises(ValueError, match=r"has no leaf \['Dense_1'\]\['"):
    deeper.load_params(out)
  with pytest.raises(ValueError, match="is a run's checkpoint"):
    fl.experiment.load_params(run_dir / "checkpoint.msgpack")
  with pytest.raises(FileNotFoundError, match="no params file or folder"):
    fl.experiment.load_params(tmp_path / "nope.msgpack")


def test_export_refuses_to_overwrite_or_write_into_the_run(
  repo, tmp_path, capsys
):
  _, run_dir = repo
  out = tmp_path / "p.msgpack"
  out.write_bytes(b"keep")
  assert export_main([run_dir, "--out", out]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: --out ") and "already exists" in err, err
  assert "--overwrite" in err and out.read_bytes() == b"keep"
  with pytest.raises(ValueError, match="already exists"):
    export.export_params(run_dir, out)
  os.chmod(out, 0o640)
  assert export_main([run_dir, "--out", out, "--overwrite"]) == 0
  assert stat.S_IMODE(out.stat().st_mode) == 0o640  # as open() keeps it
  assert fl.experiment.load_params(out)["Dense_0"]["kernel"].shape == (4, 3)
  before = hashes(run_dir)
  assert export_main([run_dir, "--out", run_dir / "params.msgpack"]) == 2
  assert "lies inside the run folder" in capsys.readouterr().err
  assert hashes(run_dir) == before
  assert export_main([tmp_path / "none", "--out", tmp_path / "x"]) == 2
  assert "no such folder" in capsys.readouterr().err
  assert export_main([tmp_path, "--out", tmp_path / "x"]) == 2
  assert "not a run folder (no config.json)" in capsys.readouterr().err


def test_orbax_format_round_trips(repo, tmp_path):
  pytest.importorskip("orbax.checkpoint")
  root, run_dir = repo
  exp = tiny_experiment(root / "tiny.py")
  res = export.export_params(run_dir, tmp_path / "ob", format="orbax")
  assert (tmp_path / "ob").is_dir()
  export.export_params(run_dir, tmp_path / "p.msgpack")
  for a, b in zip(
    jax.tree.leaves(exp.model.load_params(tmp_path / "ob")),
    jax.tree.leaves(fl.experiment.load_params(tmp_path / "p.msgpack")),
  ):
    np.testing.assert_array_equal(a, b)
  assert jax.tree.structure(
    fl.experiment.load_params(tmp_path / "ob")
  ) == jax.tree.structure(res.params)
  with pytest.raises(ValueError, match="already exists"):
    export.export_params(run_dir, tmp_path / "ob", format="orbax")
  export.export_params(
    run_dir, tmp_path / "ob", format="orbax", round=2, overwrite=True
  )
  r2 = export.export_params(run_dir, tmp_path / "r2.msgpack", round=2)
  for a, b in zip(
    jax.tree.leaves(fl.experiment.load_params(tmp_path / "ob")),
    jax.tree.leaves(r2.params),
  ):
    np.testing.assert_array_equal(a, b)


def test_orbax_missing_gives_the_install_hint(
  repo, tmp_path, monkeypatch, capsys
):
  _, run_dir = repo
  monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)
  out = tmp_path / "ob"
  assert export_main([run_dir, "--out", out, "--format", "orbax"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(
    "error: "
  ) and "needs orbax-checkpoint: pip install" in (err), err
  assert len(err.splitlines()) == 1 and not out.exists()


def _modes(folder):
  files = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
  return stat.S_IMODE(folder.stat().st_mode), files


def test_run_folder_modes_follow_the_umask(repo, tmp_path):
  _, run_dir = repo  # made under umask 022
  folder_mode, files = _modes(run_dir)
  assert folder_mode == 0o755
  names = {
    "config.json",
    "metrics.jsonl",
    "metrics.csv",
    "checkpoint.msgpack",
    "curves.png",
    "summary.json",
  }
  assert names <= set(files) and set(files.values()) == {0o644}, files
  (tmp_path / "t.py").write_text(TINY_EXPERIMENT)
  with umask(0o077):
    private = run(tmp_path / "t.py", tmp_path / "runs", "num_rounds=1")
  folder_mode, files = _modes(private)
  assert folder_mode == 0o700
  assert names <= set(files) and set(files.values()) == {0o600}, files
  assert stat.S_IMODE((tmp_path / "runs").stat().st_mode) == 0o700
  # an atomic rewrite keeps a file's mode, as open(path, "w") does
  target = tmp_path / "kept.json"
  target.write_text("{}")
  os.chmod(target, 0o640)
  with umask(0o022):
    ckpt.atomic_write_text(target, "[]")
    ckpt.atomic_write_text(tmp_path / "new.json", "[]")
  assert stat.S_IMODE(target.stat().st_mode) == 0o640
  assert stat.S_IMODE((tmp_path / "new.json").stat().st_mode) == 0o644
  assert target.read_text() == "[]"
  assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_readme_snippet_evaluates_the_exported_model(tmp_path, monkeypatch):
  """The docstring's three lines, run on the README experiment's smoke
  run, print its final test metrics."""
  run_dir = run(EXPERIMENTS / "fedavg_synthetic.py:smoke", tmp_path / "runs")
  monkeypatch.chdir(tmp_path)
  export.export_params(run_dir, "params.msgpack")
  head = "``experiments/fedavg_synthetic.py``::\n\n"
  code = textwrap.dedent(export.__doc__.split(head)[1].split("\n\n")[0])
  assert len(code.strip().splitlines()) == 3
  printed = []
  exec(code, {"fl": fl, "print": printed.append})  # pylint: disable=exec-used
  final = json.loads((run_dir / "summary.json").read_text())["final"]
  assert printed[0]["accuracy"] == final["test_accuracy"]
  assert printed[0]["loss"] == final["test_loss"]
