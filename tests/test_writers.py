"""Metric writers and callbacks: every row of metrics.jsonl read back from
TensorBoard (its EventAccumulator), W&B (the offline run's ``.wandb`` file,
decoded with wandb's own protobuf records) and MLflow (MlflowClient) with
the same values, each round once across a resume; sweeps make one tracking
run per setting; callbacks get the params of their round; non-finite values
are ``null`` in metrics.jsonl."""

import dataclasses
import json
import math
import os
import pathlib
import signal
import struct
import subprocess
import sys
import time
import zlib

import jax
import numpy as np
import pytest

import fedjax_lite.experiment as fe
from fedjax_lite._optional import MissingExtraError
from fedjax_lite.experiment import writers as wlib
from fedjax_lite.experiment.cli import main
from fedjax_lite.experiment.loop import Callback, CallbackError
from fedjax_lite.experiment.records import (
  TIMING_KEYS,
  MetricsLog,
  final_values,
  read_jsonl,
)
from fedjax_lite.experiment.session import RunOptions

from test_experiment import TINY_EXPERIMENT  # pylint: disable=g-bad-import-order

LOG = ["--log", "tensorboard,wandb", "--log", "mlflow"]


# ------------------------------------------------------------------ readers
def tensorboard_scalars(logdir) -> dict:
  """``{step: {tag: value}}`` as TensorBoard reads ``logdir``."""
  from tensorboard.backend.event_processing.event_accumulator import (
    EventAccumulator,
  )

  acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
  acc.Reload()
  out: dict = {}
  for tag in acc.Tags()["scalars"]:
    for event in acc.Scalars(tag):
      assert tag not in out.setdefault(event.step, {}), (tag, event.step)
      out[event.step][tag] = event.value
  return out


def wandb_records(path) -> list:
  """The records of an offline run's ``.wandb`` file: a LevelDB-format log
  (7-byte header ``:W&B``, 0xBEE1, version 0; 32 KiB blocks of chunks with a
  CRC-32, a length and a type: full, first, middle, last) of
  ``wandb_internal_pb2.Record`` messages."""
  from wandb.proto import wandb_internal_pb2

  data = path.read_bytes()
  assert data[:7] == struct.pack("<4sHB", b":W&B", 0xBEE1, 0)
  records, pending, i, block = [], b"", 7, 32768
  while i < len(data):
    if block - i % block < 7:  # a block's tail too short for a header
      i += block - i % block
      continue
    crc, length, kind = struct.unpack("<IHB", data[i : i + 7])
    chunk = data[i + 7 : i + 7 + length]
    i += 7 + length
    assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc
    pending += chunk
    if kind in (1, 4):  # full or last
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      records.append(record)
      pending = b""
  return records


def wandb_history(run_folder) -> tuple[dict, dict, dict]:
  """``({step: {key: value}}, run record, config)`` of one offline run
  folder."""
  (path,) = run_folder.glob("*.wandb")
  history, run, config = {}, None, {}
  for r in wandb_records(path):
    kind = r.WhichOneof("record_type")
    if kind in ("run", "config"):
      items = r.run.config.update if kind == "run" else r.config.update
      for u in items:
        config[u.key or "/".join(u.nested_key)] = json.loads(u.value_json)
    if kind == "history":
      items = {
        item.key or "/".join(item.nested_key): json.loads(item.value_json)
        for item in r.history.item
      }
      values = {k: v for k, v in items.items() if not k.startswith("_")}
      assert r.history.step.num not in history
      history[r.history.step.num] = values
    elif kind == "run":
      run = r.run
  return history, run, config


def mlflow_client(run_dir):
  from mlflow.tracking import MlflowClient

  return MlflowClient(f"sqlite:///{run_dir.resolve() / 'mlflow.db'}")


def mlflow_history(client, run_id) -> dict:
  """``{step: {key: value}}`` of an MLflow run (each step once per key)."""
  out: dict = {}
  for key in client.get_run(run_id).data.metrics:
    for m in client.get_metric_history(run_id, key):
      assert key not in out.setdefault(m.step, {}), (key, m.step)
      out[m.step][key] = m.value
  return out


def metrics_of(row) -> dict:
  """A metrics.jsonl row's values as the writers get them."""
  skip = {"round", "setting", "seed", "client_lr"}
  return {k: v for k, v in row.items() if k not in skip}


# ----------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def offline(tmp_path_factory):
  """W&B offline, silent, every file under a temporary folder."""
  home = tmp_path_factory.mktemp("wandb_home")
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    for var, sub in (
      ("WANDB_DIR", "dir"),
      ("WANDB_CACHE_DIR", "cache"),
      ("WANDB_CONFIG_DIR", "config"),
      ("WANDB_DATA_DIR", "data"),
      ("WANDB_ARTIFACT_DIR", "artifacts"),
    ):
      mp.setenv(var, str(home / sub))
    mp.delenv("WANDB_PROJECT", raising=False)
    yield home


@pytest.fixture(scope="module")
def tiny_module(tmp_path_factory):
  path = tmp_path_factory.mktemp("tiny") / "tiny.py"
  path.write_text(TINY_EXPERIMENT)
  return str(path)


@pytest.fixture(scope="module")
def tracked(offline, tiny_module, tmp_path_factory):
  """A run logged to every tool: 2 rounds; resumed to 4; then, as if killed
  after round 4 with its last checkpoint at round 2, resumed from round 2
  again (rounds 3 and 4 computed twice). Returns the run folder and the
  rows of metrics.jsonl before the last resume."""
  out = tmp_path_factory.mktemp("runs")
  base = ["--no-progress", *LOG]
  argv = ["run", tiny_module, "--out", str(out), *base]
  assert main([*argv, "--set", "num_rounds=2"]) == 0
  run_dir = next(out.glob("tiny-*"))
  round2 = (run_dir / "checkpoint.msgpack").read_bytes()
  resume = ["run", "--resume", str(run_dir), *base, "--set", "num_rounds=4"]
  assert main(resume) == 0
  first = read_jsonl(run_dir / "metrics.jsonl")
  (run_dir / "checkpoint.msgpack").write_bytes(round2)
  assert main(resume) == 0
  return run_dir, first


# -------------------------------------------------------------------- tests
def test_every_tool_reads_back_the_jsonl_rows_once_per_round(tracked):
  """TensorBoard (float32: its ``simple_value``), W&B (exact) and MLflow
  (exact) hold each round of metrics.jsonl exactly once, across a resume
  that computed rounds 3 and 4 twice: TensorBoard keeps the recomputed
  values (the resumed file purges steps > 2), MLflow and W&B the first
  ones (equal but for the timing columns)."""
  run_dir, first = tracked
  rows = read_jsonl(run_dir / "metrics.jsonl")
  assert [r["round"] for r in rows] == [1, 2, 3, 4]
  assert all(r["train_num_clients"] == 4.0 for r in rows)
  assert "test_accuracy_p10" in rows[1] and "round_time_s" in rows[0]
  strip = lambda rs: [
    {k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rs
  ]
  assert strip(rows) == strip(first)  # the resume is bit-identical

  tb = tensorboard_scalars(run_dir / "tensorboard")
  assert sorted(tb) == [1, 2, 3, 4]
  for r in rows:
    want = metrics_of(r)
    assert set(tb[r["round"]]) == set(want)
    for k, v in want.items():
      assert tb[r["round"]][k] == np.float32(v), (r["round"], k)

  state = wlib.read_state(run_dir)
  client = mlflow_client(run_dir)
  ml = mlflow_history(client, state["mlflow"][""]["run_id"])
  assert ml == {r["round"]: metrics_of(r) for r in first}
  params = client.get_run(state["mlflow"][""]["run_id"]).data.params
  assert params["client_lr"] == "0.1" and params["algorithm"] == "tiny_avg"
  assert params["num_rounds"] == "2"  # MLflow params keep the first value

  wb = state["wandb"][""]
  assert len(wb["dirs"]) == 3  # one folder per session, one run id
  merged: dict = {}
  for folder in wb["dirs"]:
    history, run, _ = wandb_history(run_dir / folder)
    assert run.run_id == wb["id"]
    assert not set(history) & set(merged)
    merged.update(history)
  assert merged == {r["round"]: metrics_of(r) for r in first}
  _, _, config = wandb_history(run_dir / wb["dirs"][0])
  assert config["client_lr"] == 0.1 and config["algorithm"] == "tiny_avg"


def test_sweep_writes_one_tracking_run_per_setting(
  offline, tiny_module, tmp_path
):
  """Two seeds: two TensorBoard subfolders, two W&B runs grouped by the
  sweep's folder name, two MLflow runs in one experiment, each with its
  setting's rows of metrics.jsonl and its seed as an hparam."""
  argv = ["sweep", tiny_module, "--out", str(tmp_path), "--no-progress"]
  assert main([*argv, "--seeds", "2", "--set", "num_rounds=2", *LOG]) == 0
  sweep_dir = next(tmp_path.glob("tiny-sweep-*"))
  rows = read_jsonl(sweep_dir / "metrics.jsonl")
  settings = [{"seed": 0}, {"seed": 1}]
  keys = [wlib.setting_key(i, s) for i, s in enumerate(settings)]
  assert keys == ["setting0_seed=0", "setting1_seed=1"]
  tb_dirs = sorted(p.name for p in (sweep_dir / "tensorboard").iterdir())
  assert tb_dirs == keys
  state = wlib.read_state(sweep_dir)
  client = mlflow_client(sweep_dir)
  (experiment,) = [
    e for e in client.search_experiments() if e.name == sweep_dir.name
  ]
  runs = client.search_runs([experiment.experiment_id])
  assert sorted(r.info.run_name for r in runs) == [
    f"{sweep_dir.name}/{k}" for k in keys
  ]
  for i, key in enumerate(keys):
    mine = [r for r in rows if r["setting"] == i]
    assert [r["round"] for r in mine] == [1, 2]
    want = {r["round"]: metrics_of(r) for r in mine}
    tb = tensorboard_scalars(sweep_dir / "tensorboard" / key)
    assert tb == {
      t: {k: np.float32(v) for k, v in m.items()} for t, m in want.items()
    }
    run_id = state["mlflow"][key]["run_id"]
    assert mlflow_history(client, run_id) == want
    assert client.get_run(run_id).data.params["seed"] == str(i)
    (folder,) = state["wandb"][key]["dirs"]
    history, run, config = wandb_history(sweep_dir / folder)
    assert history == want
    assert run.run_group == sweep_dir.name
    assert run.display_name == f"{sweep_dir.name}/{key}"
    assert config["seed"] == i
  # Settings' seeds differ, so their curves do.
  assert rows[0]["train_loss"] != rows[1]["train_loss"]


@pytest.fixture(scope="module")
def tiny_exp(tiny_module):
  """The tiny experiment (4 rounds), built once: its runs here, and those
  of ``dataclasses.replace(tiny_exp, num_rounds=...)``, share one engine
  and its compiled rounds."""
  ef = fe.load_experiment_file(tiny_module)
  return ef.build(ef.get_config())


def test_callbacks_get_the_params_of_their_round(tiny_exp):
  """A default callback (params every round) and one with params_every=2
  get, at each round they may read, exactly the params of a run stopped
  at that round; elsewhere params() refuses with a message."""
  exp = tiny_exp
  every, second, refused, rows = {}, {}, [], []

  def each(t, row, params):
    rows.append(row)
    every[t] = jax.device_get(params())

  def even(t, row, params):
    if t % 2 == 0:
      second[t] = jax.device_get(params())
      return
    with pytest.raises(ValueError) as e:
      params()
    refused.append((t, str(e.value)))

  res = fe.train(exp, None, progress=False, callbacks=[each, Callback(even, 2)])
  assert [r["round"] for r in rows] == [1, 2, 3, 4]
  assert rows == res.rows  # the rows metrics.jsonl would hold
  assert sorted(second) == [2, 4]
  assert [t for t, _ in refused] == [1, 3]
  assert (
    "reads params every 2 rounds (params_every=2), and round 3 is "
    in (refused[1][1])
  )
  for t in (1, 2, 3, 4):
    ref = fe.train(dataclasses.replace(exp, num_rounds=t), None, progress=False)
    want = jax.device_get(ref.params)
    jax.tree.map(np.testing.assert_array_equal, every[t], want)
    if t in second:
      jax.tree.map(np.testing.assert_array_equal, second[t], want)
  # A callback that reads no params (params_every=0) leaves the chunks.
  quiet = []
  fe.train(
    exp,
    None,
    progress=False,
    callbacks=[Callback(lambda t, row, p: quiet.append(t), 0)],
  )
  assert quiet == [1, 2, 3, 4]


def test_a_failing_callback_stops_the_run_at_its_round_and_resumes(
  tiny_exp, tmp_path
):
  exp = tiny_exp
  run_dir = tmp_path / "run"

  def boom(t, row, params):
    if t == 3:
      raise RuntimeError("no more")

  with pytest.raises(CallbackError) as e:
    fe.train(
      exp,
      run_dir,
      progress=False,
      checkpoint_every=2,
      callbacks=[Callback(boom, 0)],
    )
  assert str(e.value) == (
    "callback test_a_failing_callback_stops_the_run_at_its_round_and_resumes"
    ".<locals>.boom raised after round 3 (RuntimeError: no more); the run "
    f"stopped there; the last checkpoint (round 2) in {run_dir} resumes it."
  )
  assert (e.value.round, e.value.checkpoint_round) == (3, 2)
  assert [r["round"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [
    1,
    2,
    3,
  ]
  res = fe.train(exp, run_dir, progress=False, resume=True)
  full = fe.train(exp, None, progress=False)
  strip = lambda rs: [
    {k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rs
  ]
  assert strip(read_jsonl(run_dir / "metrics.jsonl")) == strip(full.rows)
  jax.tree.map(np.testing.assert_array_equal, res.params, full.params)


class Recorder(wlib.MetricWriter):
  def __init__(self):
    self.steps, self.hparams, self.closed = [], None, False

  def write_scalars(self, step, scalars):
    self.steps.append((step, dict(scalars)))

  def write_hparams(self, hparams):
    self.hparams = dict(hparams)

  def close(self):
    self.closed = True


def test_a_writer_object_gets_every_row_and_the_flat_config(tiny_exp):
  exp = dataclasses.replace(tiny_exp, num_rounds=2)
  rec = Recorder()
  res = fe.train(exp, None, progress=False, writers=[rec])
  assert rec.closed
  assert rec.steps == [(r["round"], metrics_of(r)) for r in res.rows]
  assert rec.hparams["client_lr"] == 0.1
  assert rec.hparams["round_config.clients_per_round"] == 4
  assert rec.hparams["model"] == exp.model.name
  with pytest.raises(ValueError, match="sweep\\(writers=...\\) takes writer"):
    fe.sweep(exp, 2, writers=[Recorder()], progress=False)
  with pytest.raises(ValueError, match=r"need a run folder for their files"):
    fe.train(exp, None, progress=False, writers="tensorboard")


def test_non_finite_values_are_null_in_jsonl_and_nan_for_writers(tmp_path):
  log = MetricsLog(tmp_path)
  nan, inf = math.nan, math.inf
  log.append({"round": 1, "a": nan, "b": inf, "c": -inf, "d": 1.5})
  log.append({"round": 2, "a": np.float32("nan"), "d": 2.5})
  log.close()
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert lines[0] == ('{"round": 1, "a": null, "b": null, "c": null, "d": 1.5}')
  assert json.loads(lines[1]) == {"round": 2, "a": None, "d": 2.5}
  rows = read_jsonl(tmp_path / "metrics.jsonl")
  assert rows == log.rows
  assert (tmp_path / "metrics.csv").read_text().splitlines() == [
    "round,a,b,c,d",
    "1,nan,nan,nan,1.5",
    "2,nan,,,2.5",
  ]
  assert final_values(rows) == {
    "round": 2,
    "a": None,
    "b": None,
    "c": None,
    "d": 2.5,
  }
  # Replayed to a writer (a resume): null arrives as NaN.
  rec = Recorder()
  tracking = wlib.Tracking([[rec]])
  for r in rows:
    tracking.write(r)
  (s1, got1), (s2, got2) = rec.steps
  assert (s1, s2) == (1, 2) and got2["d"] == 2.5
  assert all(math.isnan(got1[k]) for k in "abc") and got1["d"] == 1.5
  # Live rows keep the float itself: TensorBoard and MLflow store NaN and
  # infinities their way (MLflow: +-1.7976931348623157e308).
  writers = wlib.make_writers("tensorboard,mlflow", tmp_path / "tools")
  tracking = wlib.Tracking([writers])
  tracking.write({"round": 1, "a": nan, "b": inf, "c": -inf})
  tracking.close()
  tb = tensorboard_scalars(tmp_path / "tools" / "tensorboard")[1]
  assert math.isnan(tb["a"]) and tb["b"] == inf and tb["c"] == -inf
  run_id = wlib.read_state(tmp_path / "tools")["mlflow"][""]["run_id"]
  ml = mlflow_history(mlflow_client(tmp_path / "tools"), run_id)[1]
  big = sys.float_info.max
  assert math.isnan(ml["a"]) and ml["b"] == big and ml["c"] == -big


def test_unknown_writer_names_the_known_ones(tmp_path, tiny_module, capsys):
  message = (
    "unknown metric writer 'tensorbord'; expected one of jsonl, "
    "tensorboard, wandb, mlflow (comma-separated, e.g. 'tensorboard,wandb')."
  )
  with pytest.raises(ValueError) as e:
    wlib.make_writers("jsonl,tensorbord", tmp_path)
  assert str(e.value) == message
  with pytest.raises(ValueError) as e:
    RunOptions(writers=["mlflow", "tensorbord"])
  assert str(e.value) == message
  with pytest.raises(ValueError, match="writers must be writer names"):
    RunOptions(writers=3)
  with pytest.raises(TypeError, match="callbacks must be a list"):
    RunOptions(callbacks=print)
  with pytest.raises(ValueError, match="params_every of callback print"):
    RunOptions(callbacks=[Callback(print, -1)])
  out = tmp_path / "runs"
  for argv in (
    ["run", tiny_module, "--out", str(out), "--log", "tensorbord"],
    ["launch", "--processes", "2", tiny_module, "--log=tensorbord"],
  ):
    assert main(argv) == 2
    assert capsys.readouterr().err == f"error: --log: {message}\n"
  assert not out.exists()


def test_a_missing_tool_is_the_install_hint(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
  with pytest.raises(MissingExtraError) as e:
    wlib.make_writers("tensorboard,wandb", tmp_path)
  assert str(e.value) == (
    'fedjax_lite.experiment needs wandb: pip install "fedjax_lite[tracking]"'
  )
  assert not (tmp_path / "tensorboard").exists()  # refused before any file


def test_a_tool_starting_in_the_background_gets_everything_in_order():
  """StartInBackground: rows written while the tool starts are held and
  handed over in order; a flush does not wait for the start; a start that
  fails raises at the next flush."""
  import threading  # pylint: disable=g-import-not-at-top

  go = threading.Event()

  class Recorder(wlib.MetricWriter):
    def __init__(self):
      self.calls = []

    def write_scalars(self, step, scalars):
      self.calls.append(("scalars", step, dict(scalars)))

    def write_hparams(self, hparams):
      self.calls.append(("hparams", dict(hparams)))

    def flush(self):
      self.calls.append(("flush",))

    def close(self):
      self.calls.append(("close",))

  def start():
    assert go.wait(10)
    return Recorder()

  w = wlib.StartInBackground(start)
  w.write_hparams({"lr": 0.1})
  w.write_scalars(1, {"loss": 2.0})
  w.flush()  # returns while the start waits
  assert w.writer is None
  w.write_scalars(2, {"loss": 1.5})
  go.set()
  w.ready()  # waits for the start, hands over what was held
  w.flush()
  w.write_scalars(3, {"loss": 1.0})
  w.close()
  assert w.writer.calls == [
    ("hparams", {"lr": 0.1}),
    ("scalars", 1, {"loss": 2.0}),
    ("scalars", 2, {"loss": 1.5}),
    ("flush",),
    ("scalars", 3, {"loss": 1.0}),
    ("close",),
  ]

  def fail():
    raise fe.ConfigError("the wandb writer could not start a W&B run: no key")

  w = wlib.StartInBackground(fail)
  w.write_scalars(1, {"loss": 2.0})
  w._thread.join()  # pylint: disable=protected-access
  with pytest.raises(fe.ConfigError, match="could not start a W&B run: no key"):
    w.flush()


# ------------------------------------------------------- writer processes
def _gone(pid: int) -> bool:
  """Whether process ``pid`` has ended (a zombie counts as ended)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] == "Z"
  except FileNotFoundError:
    return True
  except OSError:  # no /proc: ask the kernel
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return True
    return False


def _wait_gone(pids, timeout=120.0) -> bool:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if all(_gone(p) for p in pids):
      return True
    time.sleep(0.1)
  return False


def test_tools_run_in_processes_of_their_own_without_jax(tmp_path):
  """Each tool's writers run in one process per tool (a sweep's settings
  share it), which imports the writers module without JAX; the training
  process imports no tool; closing the last writer ends the process."""
  code = (
    "import sys; import fedjax_lite.experiment.writers; "
    "print(sorted({'jax', 'mlflow', 'wandb', 'tensorboardX'} & "
    "set(sys.modules)))"
  )
  env = dict(os.environ, FEDJAX_LITE_CPU_TUNING="0")
  out = subprocess.run(
    [sys.executable, "-c", code], env=env, capture_output=True, text=True
  )
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "[]"
  a = wlib.make_writers("tensorboard", tmp_path, key="a")
  b = wlib.make_writers("tensorboard", tmp_path, key="b")
  assert isinstance(a[0], wlib.ProcessWriter) and a[0].pid == b[0].pid
  assert a[0].pid != os.getpid()
  tracking = wlib.Tracking([a, b])
  tracking.write({"round": 1, "loss": 0.5, "setting": 0})
  tracking.write({"round": 1, "loss": 0.25, "setting": 1})
  tracking.close()
  assert _gone(a[0].pid)
  assert tensorboard_scalars(tmp_path / "tensorboard" / "a") == {
    1: {"loss": 0.5}
  }
  assert tensorboard_scalars(tmp_path / "tensorboard" / "b") == {
    1: {"loss": 0.25}
  }
  # A writer made after the last one closed gets a new process.
  (c,) = wlib.make_writers("tensorboard", tmp_path, key="c")
  assert c.pid != a[0].pid
  c.close()


def _nice_of(pid: int, want: int, timeout: float = 120.0) -> int:
  """Process ``pid``'s nice value once it equals ``want`` (the child sets
  it as it starts), or its value at the timeout."""
  deadline = time.monotonic() + timeout
  nice = os.getpriority(os.PRIO_PROCESS, pid)
  while nice != want and time.monotonic() < deadline:
    time.sleep(0.05)
    nice = os.getpriority(os.PRIO_PROCESS, pid)
  return nice


def test_prestarted_processes_run_at_low_priority_and_serve_the_writers(
  tmp_path, monkeypatch
):
  """prestart starts a tool's process before its writers exist (names
  that are not tools skipped): at nice 19, in this session but a process
  group of its own; the writers made later use it; an unused one ends with
  discard_unused; FEDJAX_LITE_WRITER_NICE sets the nice value and a bad
  value is refused."""
  pids = wlib.prestart(["jsonl", "tensorboard"])
  assert list(pids) == ["tensorboard"]
  pid = pids["tensorboard"]
  assert _nice_of(pid, 19) == 19
  assert os.getpgid(pid) == pid and os.getsid(pid) == os.getsid(0)
  assert wlib.prestart(["tensorboard"]) == pids  # already running: kept
  (w,) = wlib.make_writers("tensorboard", tmp_path)
  assert w.pid == pid
  w.write_scalars(1, {"loss": 0.5})
  w.close()
  assert _gone(pid)
  assert tensorboard_scalars(tmp_path / "tensorboard") == {1: {"loss": 0.5}}

  unused = wlib.prestart(["tensorboard"])["tensorboard"]
  assert unused != pid
  wlib.discard_unused()
  assert _wait_gone([unused])

  monkeypatch.setenv("FEDJAX_LITE_WRITER_NICE", "0")
  kept = wlib.prestart(["tensorboard"])["tensorboard"]
  mine = os.getpriority(os.PRIO_PROCESS, 0)
  assert _nice_of(kept, mine, timeout=2.0) == mine
  wlib.discard_unused()
  assert _wait_gone([kept])
  monkeypatch.setenv("FEDJAX_LITE_WRITER_NICE", "low")
  with pytest.raises(fe.ConfigError) as e:
    wlib.prestart(["tensorboard"])
  assert str(e.value) == (
    "FEDJAX_LITE_WRITER_NICE must be an integer from 0 (the training "
    "process's priority) to 19 (the lowest), got 'low'."
  )


def _writer_children() -> list[int]:
  """This process's live children that are writer processes (Linux)."""
  pids = []
  for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
    try:
      fields = stat.read_text().rsplit(")", 1)[1].split()
      cmd = (stat.parent / "cmdline").read_bytes()
    except OSError:
      continue
    if int(fields[1]) == os.getpid() and fields[0] != "Z":
      if b"writer_process" in cmd:
        pids.append(int(stat.parent.name))
  return pids


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_a_run_refused_before_its_writers_ends_their_processes(
  tmp_path, tiny_module, capsys
):
  """`run --log tensorboard` starts the tool's process before JAX is
  imported; a run refused before it makes its writers (a bad --set) ends
  that process instead of leaving it idle."""
  before = set(_writer_children())  # other tests' (normally none)
  argv = ["run", tiny_module, "--out", str(tmp_path / "runs")]
  argv += ["--log", "tensorboard", "--set", "num_rounds=x"]
  assert main(argv) == 2
  assert "num_rounds" in capsys.readouterr().err
  deadline = time.monotonic() + 60
  while set(_writer_children()) - before and time.monotonic() < deadline:
    time.sleep(0.05)
  assert set(_writer_children()) - before == set()


def test_a_failing_writer_process_raises_naming_the_tool(tmp_path):
  """A store error in the child (a resume of an MLflow run the store
  lacks): the next call (at the latest close) raises once, naming the tool
  and the child's error; a child killed meanwhile: the same, with the
  signal; neither hangs."""
  bad = tmp_path / "bad"
  bad.mkdir()
  state = {"mlflow": {"": {"run_id": "0123abc", "experiment_id": "0"}}}
  (bad / wlib.STATE_FILE).write_text(json.dumps(state))
  (w,) = wlib.make_writers("mlflow", bad, resume=wlib.Resume(2, 2))
  with pytest.raises(wlib.WriterProcessError) as e:
    w.write_hparams({"lr": 0.1})
    w.write_scalars(3, {"loss": 1.0})
    w.flush()
    w.close()
  assert "the mlflow writer failed in its process" in str(e.value)
  assert "MlflowException: Run with id=0123abc not found" in str(e.value)
  w.write_scalars(2, {"loss": 1.0})  # raised once: later calls do nothing
  w.close()

  (w,) = wlib.make_writers("tensorboard", tmp_path / "killed")
  w.write_scalars(1, {"loss": 1.0})
  os.kill(w.pid, signal.SIGKILL)
  with pytest.raises(wlib.WriterProcessError) as e:
    w.write_scalars(2, {"loss": 1.0})
    w.flush()
    w.close()
  assert f"the tensorboard writer's process (pid {w.pid}) ended (killed " in (
    str(e.value)
  )
  assert "SIGKILL" in str(e.value)
  w.close()


PARENT = """
import json, os, signal, sys
from fedjax_lite.experiment import writers as wlib
ws = wlib.make_writers("tensorboard,mlflow", sys.argv[1])
tracking = wlib.Tracking([ws])
for w in ws:
  w.write_hparams({"lr": 0.1})
for r in (1, 2, 3):
  tracking.write({"round": r, "loss": 1.0 / r, "nan": float("nan")})
tracking.flush()
print(json.dumps([w.pid for w in ws]), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_parent_leaves_the_rows_written_and_no_process(tmp_path):
  """SIGKILL of the training process: each writer process reads EOF,
  writes every row it was handed (all, after a flush), ends the tool's run
  (MLflow: KILLED) and exits."""
  out = subprocess.run(
    [sys.executable, "-c", PARENT, str(tmp_path)],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == -signal.SIGKILL, out.stderr
  pids = json.loads(out.stdout)
  assert _wait_gone(pids), pids
  want = {r: {"loss": 1.0 / r} for r in (1, 2, 3)}
  tb = tensorboard_scalars(tmp_path / "tensorboard")
  assert {r: {"loss": v["loss"]} for r, v in tb.items()} == {
    r: {"loss": np.float32(v["loss"])} for r, v in want.items()
  }
  assert all(math.isnan(v["nan"]) for v in tb.values())
  run_id = wlib.read_state(tmp_path)["mlflow"][""]["run_id"]
  client = mlflow_client(tmp_path)
  ml = mlflow_history(client, run_id)
  assert {r: {"loss": v["loss"]} for r, v in ml.items()} == want
  assert all(math.isnan(v["nan"]) for v in ml.values())
  assert client.get_run(run_id).info.status == "KILLED"
