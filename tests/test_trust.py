"""Numbers that cannot lie: non-finite client updates, training labels,
divergence and resumes of checkpoints that belong to another run.

A client whose update holds a NaN or an infinity leaves the round before any
aggregator sees it (``RoundConfig(nonfinite="drop")``, counted as
``dropped_nonfinite``) or stops it with the client ids (``"raise"``); the
reference for a dropped client is the same round with that client's weight
at zero (every aggregator leaves zero-weight clients out).
"""

import hashlib
import json
import shutil

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_lite as fl
from fedjax_lite import aggregators as aggs
from fedjax_lite.__main__ import main
from fedjax_lite.experiment.records import read_jsonl
from fedjax_lite.privacy import dp_aggregator

from reference import logreg_clients  # pylint: disable=g-bad-import-order
from test_experiment import TINY_EXPERIMENT  # pylint: disable=g-bad-import-order

NUM_CLIENTS, BAD = 6, (2, 4)


@pytest.fixture(scope="module")
def setup():
  clients = logreg_clients([5, 7, 6, 8, 5, 6], seed=3, d=4, k=3)
  model = fl.models.logistic_regression(4, 3)
  params = model.init(jax.random.PRNGKey(0))
  return clients, model, params


HOW = {"none": 0, "nan": 1, "inf": 2, "zero": 3}


def _with_bad_clients(alg):
  """``alg`` whose clients marked in their data (feature ``how``, see
  :data:`HOW`) send NaN (``"nan"``), +inf (``"inf"``) or keep their update
  but weigh zero (``"zero"``). The choice is data, so one compiled round
  serves every case."""

  def client_update(bcast, cstate, data, rng):
    out = alg.client_update(bcast, cstate, data, rng)
    how = jnp.max(data.batches["how"])
    weight = jnp.where(how == HOW["zero"], 0.0, out.weight)
    value = jnp.where(how == HOW["nan"], jnp.nan, jnp.inf)
    send = (how == HOW["nan"]) | (how == HOW["inf"])
    update = jax.tree.map(
      lambda u: jnp.where(send, jnp.full_like(u, value), u), out.update
    )
    return out._replace(update=update, weight=weight)

  return alg._replace(client_update=client_update)


def _rounds(setup, aggregator, hows, nonfinite="drop", debug=False, bad=BAD):
  """One round from the same initial state for each ``how`` in ``hows``
  (clients ``bad`` misbehave that way), all on one engine: its round
  compiles once. Returns ``[(params, metrics), ...]``."""
  clients, model, params = setup
  alg = fl.fed_avg(model, optax.sgd(0.1), optax.sgd(1.0), aggregator=aggregator)
  engine = fl.Engine(
    _with_bad_clients(alg),
    fl.RoundConfig(
      NUM_CLIENTS,
      fl.LocalWork(batch_size=3),
      sampling="all",
      nonfinite=nonfinite,
    ),
    debug=debug,
  )
  out = []
  for how in hows:
    train = fl.FederatedDataset.from_clients(
      [
        {
          **c,
          "how": np.full(len(c["y"]), HOW[how] if k in bad else 0, np.int32),
        }
        for k, c in enumerate(clients)
      ]
    )
    data = engine.put_data(train)
    state = engine.init(params, seed=1, data=data)
    state, metrics = engine.round(state, data)
    out.append((state.server.params, jax.device_get(metrics)))
  return out


def _round(setup, aggregator, how, nonfinite="drop", debug=False, bad=BAD):
  (out,) = _rounds(setup, aggregator, [how], nonfinite, debug, bad)
  return out


AGGREGATORS = {
  "weighted_mean": lambda: None,
  "krum": lambda: aggs.krum(1),
  "multi_krum": lambda: aggs.krum(1, multi=2),
  "geometric_median": lambda: aggs.geometric_median(),
  "centered_clipping": lambda: aggs.centered_clipping(0.5),
  "clipped": lambda: aggs.clipped(aggs.weighted_mean(), 0.5),
  "coordinate_median": lambda: aggs.coordinate_median(),
  "trimmed_mean": lambda: aggs.trimmed_mean(0.2),
  "dp_aggregator": lambda: dp_aggregator(0.0, NUM_CLIENTS, clip=0.5),
}


HOWS = ("zero", "nan", "inf")


@pytest.fixture(scope="module")
def jitted_rounds(setup):
  """``name -> _rounds(setup, AGGREGATORS[name](), HOWS)``, each computed once
  for the module (the weighted mean's serves two tests)."""
  done = {}

  def rounds(name):
    if name not in done:
      done[name] = dict(zip(HOWS, _rounds(setup, AGGREGATORS[name](), HOWS)))
    return done[name]

  return rounds


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_nonfinite_clients_are_dropped_before_every_aggregator(
  jitted_rounds, name
):
  """Two clients of six send NaN (or inf): the aggregate is finite and equals
  the round where those clients weigh zero; ``dropped_nonfinite`` is 2,
  ``num_clients`` counts the four others and the loss is theirs."""
  out = jitted_rounds(name)
  (ref, ref_metrics), *bad = (out[how] for how in HOWS)
  for how, (got, metrics) in zip(HOWS[1:], bad):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
      assert np.all(np.isfinite(a)), (name, how)
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert float(metrics["dropped_nonfinite"]) == 2.0
    assert float(metrics["num_clients"]) == NUM_CLIENTS - 2
    assert np.isfinite(metrics["loss"])  # the four finite clients' mean
  assert float(ref_metrics["dropped_nonfinite"]) == 0.0


def test_debug_round_drops_the_same_clients(setup, jitted_rounds):
  # the jitted round: _round(setup, None, "nan")
  jitted, jm = jitted_rounds("weighted_mean")["nan"]
  debug, dm = _round(setup, None, "nan", debug=True)
  assert float(dm["dropped_nonfinite"]) == float(jm["dropped_nonfinite"]) == 2
  for a, b in zip(jax.tree.leaves(debug), jax.tree.leaves(jitted)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("debug", [False, True])
def test_nonfinite_raise_names_the_client_ids(setup, debug):
  with pytest.raises(fl.engine.NonFiniteUpdateError) as e:
    _round(setup, None, "nan", nonfinite="raise", debug=debug)
  assert "client ids [2, 4]" in str(e.value), str(e.value)
  # A round without bad clients passes.
  _, metrics = _round(setup, None, "none", nonfinite="raise", debug=debug)
  assert "_nonfinite_client_ids" not in metrics


def test_nonfinite_policy_is_checked():
  with pytest.raises(ValueError, match="nonfinite must be one of.*'keep'"):
    fl.RoundConfig(4, nonfinite="keep")


# ------------------------------------------------------------------- labels
@pytest.mark.parametrize(
  "labels, message",
  [
    (np.array([0, 1, 9, 2]), "range over [0, 9]; expected values in [0, 3)"),
    (np.array([0, 42, 1, 2]), "range over [0, 42]"),
    (np.array([-1, 0, 1, 2]), "range over [-1, 2]"),
    (np.array([0.0, 1.0, 2.0, 1.5], np.float32), "dtype float32"),
  ],
)
def test_put_data_without_model_checks_labels(labels, message):
  """The README's quick tour passes no model to put_data: the algorithm's
  model checks the labels."""
  rng = np.random.default_rng(0)
  clients = [
    {"x": rng.standard_normal((4, 4)).astype(np.float32), "y": labels},
    {
      "x": rng.standard_normal((4, 4)).astype(np.float32),
      "y": np.zeros(4, labels.dtype),
    },
  ]
  train = fl.FederatedDataset.from_clients(clients)
  model = fl.models.logistic_regression(4, 3)
  engine = fl.Engine(fl.fed_avg(model, optax.sgd(0.1)), fl.RoundConfig(2))
  with pytest.raises(ValueError) as e:
    engine.put_data(train)
  assert message in str(e.value), str(e.value)


def test_experiment_run_refuses_labels_out_of_range(tmp_path, capsys):
  """An experiment file whose training labels reach 42 for 3 classes: exit 2
  with one line naming the range, no run folder left finished."""
  src = TINY_EXPERIMENT.replace(
    '"y": rng.integers(0, 3, n).astype(np.int32)',
    '"y": np.where(np.arange(n) == 1, 42, 0).astype(np.int32)',
  )
  assert src != TINY_EXPERIMENT
  path = tmp_path / "bad_labels.py"
  path.write_text(src)
  code = main(
    ["run", str(path), "--out", str(tmp_path / "runs"), "--no-progress"]
  )
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2, err
  assert len(err) == 1 and err[0].startswith("error:"), err
  assert "[0, 42]" in err[0] and "[0, 3)" in err[0], err


# --------------------------------------------------------------- divergence
@pytest.fixture
def tiny(tmp_path):
  path = tmp_path / "tiny.py"
  path.write_text(TINY_EXPERIMENT)
  return str(path)


def test_nan_learning_rate_stops_the_run_as_diverged(tiny, tmp_path, capsys):
  """client_lr=nan: every client's update is NaN, so round 1 diverges; the run
  exits 3 with one error line, summary.json says "diverged", and the
  checkpoint holds the last finite state (round 0), from which a resume with
  a finite learning rate finishes."""
  out = tmp_path / "runs"
  argv = ["run", tiny, "--out", str(out), "--no-progress"]
  assert main([*argv, "--set", "client_lr=nan"]) == 3
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: the run diverged"), err
  assert "round 1" in err[0] and "non-finite" in err[0], err
  run_dir = next(out.glob("tiny-*"))
  summary = json.loads((run_dir / "summary.json").read_text())
  assert summary["status"] == "diverged" and summary["diverged_round"] == 1
  rows = read_jsonl(run_dir / "metrics.jsonl")
  assert [r["round"] for r in rows] == [1]
  assert rows[0]["train_dropped_nonfinite"] == 4.0
  raw = (run_dir / "checkpoint.msgpack").read_bytes()
  meta = flax.serialization.msgpack_restore(raw)["meta"]
  assert meta["round"] == 0 and meta["num_rows"] == 0
  resume = ["run", "--resume", str(run_dir), "--no-progress"]
  assert main([*resume, "--set", "client_lr=0.1"]) == 0
  rows = read_jsonl(run_dir / "metrics.jsonl")
  assert [r["round"] for r in rows] == [1, 2, 3, 4]
  assert all(np.isfinite(r["train_loss"]) for r in rows)


def test_on_divergence_continue_keeps_going(tiny, tmp_path, capsys):
  out = tmp_path / "runs"
  argv = ["run", tiny, "--out", str(out), "--no-progress"]
  assert (
    main([*argv, "--set", "client_lr=nan", "--on-divergence", "continue"]) == 0
  )
  run_dir = next(out.glob("tiny-*"))
  summary = json.loads((run_dir / "summary.json").read_text())
  assert summary["status"] == "finished"
  assert len(read_jsonl(run_dir / "metrics.jsonl")) == 4


def test_divergence_reasons():
  from fedjax_lite.experiment.loop import divergence

  assert divergence({"loss": np.float32(1.0), "num_clients": 3.0}) is None
  assert "loss=nan" in divergence({"loss": np.float32(np.nan)})
  assert "all 4 sampled clients" in divergence(
    {"loss": 0.0, "num_clients": 0.0, "dropped_nonfinite": 4.0}
  )
  assert divergence({"loss": 0.0, "num_clients": 0.0}) is None  # K = 0
  assert "parameters" in divergence({}, {"w": jnp.array([1.0, jnp.inf])})
  # a DP run without noise spends an infinite budget: a value, not divergence
  assert divergence({"loss": 0.5, "dp_epsilon": np.float64(np.inf)}) is None
  assert "dp_epsilon=nan" in divergence({"dp_epsilon": np.float64(np.nan)})
  assert "loss=inf" in divergence({"loss": np.float32(np.inf)})


# ------------------------------------------------- model/data, disk full
def test_model_data_dimension_mismatch_is_one_error_line(tmp_path, capsys):
  """A model built for 3 inputs on data with 4 features: put_data names the
  shapes (no flax ScopeParamShapeError traceback); the command line exits 2
  with one line."""
  rng = np.random.default_rng(0)
  clients = [
    {
      "x": rng.standard_normal((4, 4)).astype(np.float32),
      "y": np.zeros(4, np.int32),
    }
  ] * 2
  model = fl.models.logistic_regression(3, 3)
  engine = fl.Engine(fl.fed_avg(model, optax.sgd(0.1)), fl.RoundConfig(2))
  with pytest.raises(fl.checks.DataError) as e:
    engine.put_data(fl.FederatedDataset.from_clients(clients))
  assert "inputs 'x' of shape (4,) per example" in str(e.value), str(e.value)
  src = TINY_EXPERIMENT.replace(
    "fl.models.logistic_regression(4, 3)", "fl.models.logistic_regression(5, 3)"
  )
  assert src != TINY_EXPERIMENT
  path = tmp_path / "mismatch.py"
  path.write_text(src)
  code = main(
    ["run", str(path), "--out", str(tmp_path / "runs"), "--no-progress"]
  )
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1, err
  assert err[0].startswith("error:") and "of shape (4,)" in err[0], err


def test_full_disk_is_one_error_line_and_the_checkpoint_stays(
  tiny, tmp_path, capsys, monkeypatch
):
  """ENOSPC on every fsync once the first checkpoint is written: exit 2, one
  line naming the file and the resume command; the checkpoint still loads,
  and once space is back the resume finishes the run."""
  import os

  real_fsync = os.fsync
  out = tmp_path / "runs"

  def fsync(fd):
    if any(out.glob("tiny-*/checkpoint.msgpack")):
      raise OSError(28, "No space left on device")
    return real_fsync(fd)

  monkeypatch.setattr(os, "fsync", fsync)
  argv = [
    "run",
    tiny,
    "--out",
    str(out),
    "--no-progress",
    "--checkpoint-every",
    "1",
  ]
  assert main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  run_dir = next(out.glob("tiny-*"))
  assert len(err) == 1, err
  assert err[0].startswith("error: No space left on device while writing "), err
  assert str(run_dir) in err[0] and f"--resume {run_dir}" in err[0], err
  raw = (run_dir / "checkpoint.msgpack").read_bytes()
  meta = flax.serialization.msgpack_restore(raw)["meta"]
  assert meta["round"] == 0
  assert not list(run_dir.glob(".*.tmp"))  # no temporary file left behind
  monkeypatch.setattr(os, "fsync", real_fsync)
  assert main(["run", "--resume", str(run_dir), "--no-progress"]) == 0
  rows = read_jsonl(run_dir / "metrics.jsonl")
  assert [r["round"] for r in rows] == [1, 2, 3, 4]


# ------------------------------------------------- checkpoint identity
def _hashes(folder):
  return {
    str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(folder.rglob("*"))
    if p.is_file()
  }


# The tiny experiment with a model chosen by `hidden`: hidden=3 gives an MLP
# whose first layer has the logistic regression's shapes (4, 3) and (3,).
MODELS_EXPERIMENT = TINY_EXPERIMENT.replace(
  "model = fl.models.logistic_regression(4, 3)",
  "model = (fl.models.mlp(4, 3, config.hidden) if config.hidden\n"
  "               else fl.models.logistic_regression(4, 3))",
)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
  """``(path, lr, mlp)``: MODELS_EXPERIMENT at ``path`` and two runs of it
  (2 rounds each): the logistic regression's folder ``lr`` and the MLP's
  (``hidden=3``) ``mlp``, made once for the module. Tests that change a run
  folder or the experiment file do it on their own copy (:func:`_own_copy`)."""
  folder = tmp_path_factory.mktemp("two_runs")
  path = folder / "models.py"
  path.write_text(MODELS_EXPERIMENT)
  out = folder / "runs"
  argv = ["run", str(path), "--no-progress", "--set", "num_rounds=2"]
  assert main([*argv, "--out", str(out / "lr")]) == 0
  assert main([*argv, "--out", str(out / "mlp"), "--set", "hidden=3"]) == 0
  lr = next((out / "lr").glob("*"))
  mlp = next((out / "mlp").glob("*"))
  return path, lr, mlp


def _own_copy(two_runs, tmp_path):
  """``(path, lr)``: copies of the experiment file (same name) and of the
  logistic regression's run folder under ``tmp_path``; the folder's
  config.json names the copied file, so a resume of the copy reads (and a
  test may edit) that file as the run's own."""
  src, lr, _ = two_runs
  path = tmp_path / src.name
  shutil.copy(src, path)
  copy = tmp_path / "runs" / "lr" / lr.name
  shutil.copytree(lr, copy)
  record = (copy / "config.json").read_text()
  assert str(src) in record
  (copy / "config.json").write_text(record.replace(str(src), str(path)))
  return path, copy


def test_checkpoints_record_what_they_belong_to(two_runs):
  _, lr, _ = two_runs
  raw = (lr / "checkpoint.msgpack").read_bytes()
  identity = flax.serialization.msgpack_restore(raw)["meta"]["identity"]
  record = json.loads((lr / "config.json").read_text())
  assert identity["experiment"] == "models.py:"
  assert identity["experiment_sha256"] == record["experiment"]["sha256"]
  assert any(
    ".server.params['Dense_0']['kernel'] (4, 3) float32" == e
    for e in identity["state"]
  ), identity["state"]


def test_resume_of_another_models_checkpoint_changes_no_byte(
  two_runs, tmp_path, capsys
):
  """An MLP's checkpoint (first layer shaped like the logistic regression's)
  copied into the logistic-regression run's folder: the resume is refused
  with one line naming an entry the run does not have, and no file of the
  folder changes (metrics.jsonl keeps its rows, config.json its resumes)."""
  _, lr = _own_copy(two_runs, tmp_path)
  mlp = two_runs[2]
  shutil.copy(mlp / "checkpoint.msgpack", lr / "checkpoint.msgpack")
  before = _hashes(lr)
  capsys.readouterr()
  resume = [
    "run",
    "--resume",
    str(lr),
    "--no-progress",
    "--set",
    "num_rounds=4",
  ]
  assert main(resume) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: checkpoint"), err
  assert "another experiment or model" in err[0], err
  assert "Dense_1" in err[0], err  # the MLP's second layer
  assert _hashes(lr) == before


def test_resume_with_another_experiment_file_changes_no_byte(
  two_runs, tmp_path, capsys
):
  """`run other.py --resume FOLDER` where other.py builds the same state
  shapes: refused (the checkpoint names the experiment file it belongs to),
  and the folder is unchanged. Editing the folder's own file still resumes,
  with a warning."""
  path, lr = _own_copy(two_runs, tmp_path)
  other = tmp_path / "other.py"
  other.write_text(MODELS_EXPERIMENT)
  before = _hashes(lr)
  capsys.readouterr()
  resume = ["--resume", str(lr), "--no-progress", "--set", "num_rounds=4"]
  assert main(["run", str(other), *resume]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: checkpoint"), err
  assert "'models.py:'" in err[0] and "'other.py:'" in err[0], err
  assert _hashes(lr) == before
  path.write_text(MODELS_EXPERIMENT + "\n# an edit\n")
  assert main(["run", *resume]) == 0
  assert "changed since this run started" in capsys.readouterr().out
  assert [r["round"] for r in read_jsonl(lr / "metrics.jsonl")] == [1, 2, 3, 4]


def test_checkpoint_of_another_run_of_the_same_file_is_refused(
  two_runs, tmp_path, capsys
):
  """Two runs of different versions of one experiment file: the second's
  checkpoint copied into the first's folder is refused by the file hash it
  records, though every state entry matches."""
  path, lr = _own_copy(two_runs, tmp_path)
  path.write_text(MODELS_EXPERIMENT + "\n# another version\n")
  out = tmp_path / "runs" / "v2"
  assert (
    main(
      [
        "run",
        str(path),
        "--out",
        str(out),
        "--no-progress",
        "--set",
        "num_rounds=2",
      ]
    )
    == 0
  )
  v2 = next(out.glob("*"))
  shutil.copy(v2 / "checkpoint.msgpack", lr / "checkpoint.msgpack")
  before = _hashes(lr)
  capsys.readouterr()
  assert main(["run", "--resume", str(lr), "--no-progress"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "experiment_sha256" in err[0], err
  assert _hashes(lr) == before
