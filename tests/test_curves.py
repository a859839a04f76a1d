"""Convergence curves: the global model on training clients, x axes, smoothing."""

import json
import textwrap

import numpy as np
import optax
import pytest

import fedjax_lite as fl
import fedjax_lite.experiment as fe
from fedjax_lite.experiment import plots
from fedjax_lite.experiment.evaluator import Evaluator
from fedjax_lite.experiment.runs import engine_for

SIZES = [3, 6, 4, 6, 3, 5, 6, 4, 5, 3, 6, 4]  # 12 clients, two size buckets


def _dataset(seed, sizes=SIZES):
  rng = np.random.default_rng(seed)
  return fl.FederatedDataset.from_clients(
    [
      {
        "x": rng.standard_normal((n, 4)).astype(np.float32),
        "y": rng.integers(0, 3, n).astype(np.int32),
      }
      for n in sizes
    ]
  )


def _experiment(**kw):
  model = fl.models.logistic_regression(4, 3)
  return fe.Experiment(
    **{
      "model": model,
      "algorithm": fl.fed_avg(model, optax.sgd(0.5)),
      "train": _dataset(0),
      "test": _dataset(1, [4, 5, 3]),
      "round_config": fl.RoundConfig(
        4, fl.LocalWork(batch_size=2, num_epochs=3)
      ),
      "num_rounds": 4,
      "eval_every": 2,
      "train_eval_clients": 5,
      **kw,
    }
  )


def _reference(params, data, clients):
  """float64 numpy loss and accuracy of softmax(x W + b) over the examples of
  ``clients`` (every example weighs the same)."""
  w = np.asarray(params["Dense_0"]["kernel"], np.float64)
  b = np.asarray(params["Dense_0"]["bias"], np.float64)
  x = np.concatenate([data.client(k)["x"] for k in clients]).astype(np.float64)
  y = np.concatenate([data.client(k)["y"] for k in clients])
  logits = x @ w + b
  top = logits.max(1, keepdims=True)
  lse = top[:, 0] + np.log(np.exp(logits - top).sum(1))
  loss = lse - logits[np.arange(y.size), y]
  return loss.mean(), (logits.argmax(1) == y).mean()


# ------------------------------------------- the global model on train clients
def test_global_train_metrics_are_the_global_model_on_the_sampled_clients(
  tmp_path,
):
  exp = _experiment()
  res = fe.train(exp, tmp_path / "run", progress=False)
  rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert [r["round"] for r in rows if "global_train_loss" in r] == [2, 4]
  assert [r["round"] for r in rows if "test_loss" in r] == [2, 4]
  last = rows[-1]
  sample = exp.train_eval_sample()
  assert sample.size == 5
  loss, acc = _reference(res.params, exp.train, sample)
  np.testing.assert_allclose(last["global_train_loss"], loss, rtol=1e-5)
  np.testing.assert_allclose(last["global_train_accuracy"], acc, rtol=1e-6)
  ev = fl.evaluate(exp.model, res.params, exp.train, clients=sample)
  np.testing.assert_allclose(last["global_train_loss"], ev.mean["loss"])
  # The test metrics are the same params on the test clients.
  test_loss, _ = _reference(res.params, exp.test, range(3))
  np.testing.assert_allclose(last["test_loss"], test_loss, rtol=1e-5)
  # The local-training mean is another number (clients fit their own data).
  assert abs(last["train_loss"] - last["global_train_loss"]) > 1e-2
  summary = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert summary["final"]["global_train_loss"] == last["global_train_loss"]
  assert (tmp_path / "run" / "curves.png").read_bytes()[:4] == b"\x89PNG"
  # The Evaluator holds the same clients at every evaluation.
  evaluator = Evaluator(exp, engine_for(exp))
  np.testing.assert_array_equal(evaluator.train_clients, sample)
  assert evaluator(res.params) == evaluator(res.params)
  assert evaluator(res.params)["global_train_loss"] == pytest.approx(loss)


def test_train_eval_sample_is_fixed_by_the_seed():
  exp = _experiment()
  sample = exp.train_eval_sample()
  np.testing.assert_array_equal(sample, _experiment().train_eval_sample())
  assert sample.dtype == np.int64
  assert np.all(np.diff(sample) > 0) and 0 <= sample[0] and sample[-1] < 12
  # The documented draw.
  rng = np.random.default_rng((0, 0x7E5A))
  np.testing.assert_array_equal(
    sample, np.sort(rng.choice(12, size=5, replace=False))
  )
  others = [_experiment(seed=s).train_eval_sample() for s in (1, 2, 3)]
  assert any(not np.array_equal(sample, o) for o in others)
  # None: min(100, clients), i.e. all 12 here; 0: off.
  np.testing.assert_array_equal(
    _experiment(train_eval_clients=None).train_eval_sample(), np.arange(12)
  )
  off = _experiment(train_eval_clients=0)
  assert off.train_eval_sample().size == 0
  evaluator = Evaluator(off, engine_for(off))
  row = evaluator(off.initial_params())
  assert "test_loss" in row and not any(k.startswith("global") for k in row)
  # The initial (zero) model predicts uniformly: loss log(3) on any client.
  on = Evaluator(exp, engine_for(exp))(exp.initial_params())
  assert on["global_train_loss"] == pytest.approx(np.log(3), rel=1e-6)


@pytest.mark.parametrize(
  "value, message",
  [
    (-1, r"train_eval_clients must be an int >= 0 or None \(0: off"),
    (2.5, r"train_eval_clients must be an int >= 0 or None .* got 2.5"),
    (True, r"train_eval_clients must be an int >= 0 or None .* got True"),
    (
      13,
      r"train_eval_clients=13 exceeds the 12 training clients; expected at "
      r"most 12 \(None: min\(100, 12\) = 12\)",
    ),
  ],
)
def test_train_eval_clients_is_validated(value, message):
  with pytest.raises(ValueError, match=message):
    _experiment(train_eval_clients=value)


def test_experiment_files_pass_train_eval_clients_through_overrides(tmp_path):
  path = tmp_path / "small.py"
  path.write_text(
    textwrap.dedent('''
      import dataclasses
      import fedjax_lite as fl
      import numpy as np
      import optax

      @dataclasses.dataclass(frozen=True)
      class Config:
        train_eval_clients: int | None = None

      def get_config(arg=""):
        return Config()

      def build(config):
        rng = np.random.default_rng(0)
        train = fl.FederatedDataset.from_clients(
            [{"x": rng.standard_normal((3, 2)).astype(np.float32),
              "y": np.zeros(3, np.int32)} for _ in range(6)])
        model = fl.models.logistic_regression(2, 2)
        return fl.experiment.Experiment(
            model=model, algorithm=fl.fed_avg(model, optax.sgd(0.1)),
            train=train, round_config=fl.RoundConfig(
                2, fl.LocalWork(batch_size=3)),
            num_rounds=1, train_eval_clients=config.train_eval_clients)
    ''')
  )
  ef = fe.load_experiment_file(str(path))
  cfg = ef.get_config()
  assert ef.build(cfg).train_eval_sample().size == 6
  exp = ef.build(fe.apply_overrides(cfg, ["train_eval_clients=3"]))
  assert exp.train_eval_clients == 3 and exp.train_eval_sample().size == 3
  assert (
    ef.build(
      fe.apply_overrides(cfg, ["train_eval_clients=none"])
    ).train_eval_clients
    is None
  )
  with pytest.raises(fe.ConfigError, match="expected an int or none"):
    fe.apply_overrides(cfg, ["train_eval_clients=all"])
  with pytest.raises(
    fe.ConfigError,
    match=r"rejected the config: Experiment.train_eval_clients=7 exceeds the "
    "6 training clients",
  ):
    ef.build(fe.apply_overrides(cfg, ["train_eval_clients=7"]))


# ------------------------------------------------------------------ x axes
def _rows():
  """Six rounds: evaluation after rounds 2, 4 and 6; chunks of 2 rounds share
  their wall time; a non-finite local loss (None) at round 5."""
  rows = []
  for t in range(1, 7):
    r = {
      "round": t,
      "train_loss": None if t == 5 else 1.0 / t,
      "train_accuracy": 0.1 * t,
      "train_uplink_bytes": 100.0 + 10 * t,
      "train_num_clients": [4, 3, 4, 2, 4, 4][t - 1],
      "wall_time": 0.5 * ((t + 1) // 2) + 0.25,
    }
    if t % 2 == 0:
      r.update(
        global_train_loss=2.0 / t + 0.1,
        global_train_accuracy=0.05 * t,
        test_loss=2.0 / t + 0.3,
        test_accuracy=0.04 * t,
      )
    rows.append(r)
  return rows


def test_curves_against_seconds_and_bytes_use_the_rows_columns():
  rows = _rows()
  total, cumulative = 0.0, []
  for r in rows:
    total += r["train_uplink_bytes"] * r["train_num_clients"]
    cumulative.append(total)
  evals = [1, 3, 5]  # row indices of rounds 2, 4, 6
  by_rounds = plots.curve_data(rows)
  np.testing.assert_array_equal(by_rounds["test_loss"].x, [2, 4, 6])
  np.testing.assert_array_equal(by_rounds["train_loss"].x, range(1, 7))
  assert np.isnan(by_rounds["train_loss"].y[4])  # None: a gap
  seconds = plots.curve_data(rows, x="seconds")
  np.testing.assert_allclose(
    seconds["global_train_loss"].x, [rows[i]["wall_time"] for i in evals]
  )
  np.testing.assert_allclose(
    seconds["train_loss"].x, [r["wall_time"] for r in rows]
  )
  sent = plots.curve_data(rows, x="bytes")
  np.testing.assert_allclose(sent["train_loss"].x, cumulative)
  np.testing.assert_allclose(
    sent["test_loss"].x, [cumulative[i] for i in evals]
  )
  np.testing.assert_allclose(
    sent["test_loss"].y, [rows[i]["test_loss"] for i in evals]
  )
  assert cumulative[-1] == 100 * 21 + 10 * (4 + 6 + 12 + 8 + 20 + 24)
  # What the figure draws is that data, under the axis' name.
  fig = fe.plot_curves(rows, x="bytes")
  lines = {ln.get_gid(): ln for ax in fig.axes for ln in ax.lines}
  assert set(lines) >= {"global_train_loss", "test_loss", "train_loss"}
  np.testing.assert_allclose(
    lines["test_loss"].get_xdata(), sent["test_loss"].x
  )
  np.testing.assert_allclose(
    lines["global_train_loss"].get_ydata(), sent["global_train_loss"].y
  )
  assert lines["train_loss"].get_label() == "mean local-training loss"
  assert lines["global_train_loss"].get_label() == "train, global model"
  assert fig.axes[0].get_xlabel() == "cumulative uplink bytes"
  assert fig.axes[-1].get_title() == "Uplink per client"


def test_bytes_axis_refuses_runs_without_uplink_columns(tmp_path):
  rows = [
    {k: v for k, v in r.items() if k != "train_uplink_bytes"} for r in _rows()
  ]
  with pytest.raises(
    fe.ConfigError,
    match=r"x='bytes' needs the columns train_uplink_bytes .* the row of "
    r"round 1 has no train_uplink_bytes\. Plot against x='rounds'",
  ):
    fe.plot_curves(rows, x="bytes")
  rows = _rows()
  del rows[3]["train_num_clients"]
  with pytest.raises(fe.ConfigError, match="round 4 has no train_num_clients"):
    plots.curve_data(rows, x="bytes")
  no_time = [{k: v for k, v in r.items() if k != "wall_time"} for r in _rows()]
  with pytest.raises(
    fe.ConfigError,
    match="x='seconds' needs a number in the column 'wall_time' of every "
    "row; the row of round 1 has no wall_time",
  ):
    plots.curve_data(no_time, x="seconds")
  # compare names the run that lacks them and writes nothing.
  run = tmp_path / "plain"
  run.mkdir()
  (run / "metrics.jsonl").write_text(
    "".join(json.dumps(r) + "\n" for r in [{"round": 1, "train_loss": 1.0}])
  )
  with pytest.raises(fe.ConfigError, match="run 'plain': x='bytes' needs"):
    fe.compare([run], tmp_path / "cmp", x="bytes")
  assert not (tmp_path / "cmp").exists()


@pytest.mark.parametrize(
  "kw, message",
  [
    (
      dict(x="time"),
      "x must be one of 'rounds', 'seconds', 'bytes', got 'time'",
    ),
    (dict(smooth=1.0), r"smooth must be a weight in \[0, 1\) .* got 1.0"),
    (dict(smooth="0.5"), r"smooth must be a weight in \[0, 1\)"),
    (dict(fmt="pdf"), "fmt must be 'png' or 'svg'"),
  ],
)
def test_bad_plot_arguments_are_named(tmp_path, kw, message):
  with pytest.raises(fe.ConfigError, match=message):
    fe.plot_curves(_rows(), **kw)
  with pytest.raises(fe.ConfigError, match=message):
    fe.plot_runs({"a": [_rows()]}, **kw)


# --------------------------------------------------------- smoothing, files
def test_smoothing_is_the_documented_moving_average():
  rows = _rows()
  w = 0.6
  y = [r["train_loss"] for r in rows]  # a None at round 5
  expected, s = [], None
  for v in y:
    if v is None:
      expected.append(np.nan)
      continue
    s = v if s is None else w * s + (1 - w) * v
    expected.append(s)
  data = plots.curve_data(rows, smooth=w)
  np.testing.assert_allclose(data["train_loss"].y, expected)
  np.testing.assert_allclose(
    data["test_loss"].y[1], w * (2 / 2 + 0.3) + (1 - w) * (2 / 4 + 0.3)
  )
  fig = fe.plot_curves(rows, smooth=w)
  line = next(ln for ln in fig.axes[0].lines if ln.get_gid() == "train_loss")
  np.testing.assert_allclose(line.get_ydata(), expected)
  np.testing.assert_array_equal(plots.ema([1.0, 3.0], 0), [1.0, 3.0])


def test_png_and_svg_by_extension_or_format(tmp_path):
  rows = _rows()
  fe.plot_curves(rows, tmp_path / "c.svg", x="seconds")
  svg = (tmp_path / "c.svg").read_text()
  assert svg.lstrip().startswith("<?xml") and 'id="global_train_loss"' in svg
  fe.plot_curves(rows, tmp_path / "c.png")
  assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  fe.plot_curves(rows, tmp_path / "plain", fmt="svg")
  assert (tmp_path / "plain.svg").read_text().lstrip().startswith("<?xml")
  with pytest.raises(fe.ConfigError, match="fmt='svg' contradicts the file"):
    fe.plot_curves(rows, tmp_path / "d.png", fmt="svg")
  with pytest.raises(fe.ConfigError, match="cannot tell the image format"):
    fe.plot_curves(rows, tmp_path / "d.pdf")
  assert not (tmp_path / "d.png").exists()


def test_compare_overlays_runs_against_seconds_as_svg(tmp_path):
  a = _rows()
  b = [
    dict(r, wall_time=2 * r["wall_time"], test_loss=r["test_loss"] / 2)
    if "test_loss" in r
    else dict(r, wall_time=2 * r["wall_time"])
    for r in a
  ]
  dirs = []
  for name, rows in (("a", a), ("b", b)):
    d = tmp_path / name
    d.mkdir()
    (d / "metrics.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in rows)
    )
    dirs.append(d)
  table = fe.compare(dirs, tmp_path / "cmp", x="seconds", smooth=0.5, fmt="svg")
  svg = (tmp_path / "cmp" / "compare.svg").read_text()
  assert 'id="a/global_train_loss"' in svg and 'id="b/test_loss"' in svg
  assert not (tmp_path / "cmp" / "compare.png").exists()
  assert "global_train_loss" in table.splitlines()[0]
  assert f"| a | 1 | 6 | {a[-1]['train_loss']:.4f} |" in table
  # Two runs as one group: mean over runs at each round, at the mean x.
  band = plots.band_data([a, b], "test_loss", x="seconds")
  np.testing.assert_allclose(
    band.x, [1.5 * a[i]["wall_time"] for i in (1, 3, 5)]
  )
  np.testing.assert_allclose(
    band.mean, [0.75 * a[i]["test_loss"] for i in (1, 3, 5)]
  )
  np.testing.assert_allclose(
    band.std, [0.25 * a[i]["test_loss"] for i in (1, 3, 5)]
  )
  assert band.num_runs == 2
  fig = fe.plot_runs({"ab": [a, b]}, x="seconds")
  line = next(ln for ln in fig.axes[0].lines if ln.get_gid() == "ab/test_loss")
  np.testing.assert_allclose(line.get_xdata(), band.x)
  assert line.get_label() == "test, global model (n=2)"


# ------------------------------------------------- the README's experiment
def test_readme_runs_plot_the_global_model_and_compare_against_bytes(
  tmp_path, monkeypatch, capsys
):
  """`run experiments/fedavg_synthetic.py` (smoke, plain and with a QSGD
  uplink) then `compare --x bytes` on the command line: curves.png draws the
  global model's train and test loss of metrics.jsonl; compare.png exists
  and its x axis is the cumulative uplink bytes of the compressed run."""
  from fedjax_lite.__main__ import main  # pylint: disable=g-import-not-at-top

  from experiment_files import EXPERIMENTS  # pylint: disable=g-import-not-at-top

  saved = {}
  real_save = plots.save

  def save(fig, path, fmt=None):
    out = real_save(fig, path, fmt)
    saved[out.name] = fig
    return out

  monkeypatch.setattr(plots, "save", save)
  spec = f"{EXPERIMENTS / 'fedavg_synthetic.py'}:smoke"
  dirs = {}
  for uplink in ("none", "qsgd"):
    out = tmp_path / uplink
    code = main(
      [
        "run",
        spec,
        "--set",
        f"uplink={uplink}",
        "num_rounds=4",
        "--out",
        str(out),
        "--no-progress",
      ]
    )
    assert code == 0
    (dirs[uplink],) = out.iterdir()
    rows = fe.read_jsonl(dirs[uplink] / "metrics.jsonl")
    fig = saved.pop("curves.png")
    assert (dirs[uplink] / "curves.png").read_bytes()[:4] == b"\x89PNG"
    lines = {ln.get_gid(): ln for ax in fig.axes for ln in ax.lines}
    evals = [r for r in rows if "test_loss" in r]
    assert [r["round"] for r in evals] == [2, 4]
    for key in ("global_train_loss", "test_loss"):
      np.testing.assert_array_equal(lines[key].get_xdata(), [2, 4])
      np.testing.assert_allclose(
        lines[key].get_ydata(), [r[key] for r in evals], rtol=1e-12
      )
      assert np.all(np.isfinite(lines[key].get_ydata()))
    assert lines["global_train_loss"].get_label() == "train, global model"
  assert "global_train_loss=" in capsys.readouterr().out

  qsgd = fe.read_jsonl(dirs["qsgd"] / "metrics.jsonl")
  assert (
    "train_uplink_bytes" not in fe.read_jsonl(dirs["none"] / "metrics.jsonl")[0]
  )
  cmp = tmp_path / "cmp"
  code = main(["compare", str(dirs["qsgd"]), "--out", str(cmp), "--x", "bytes"])
  assert code == 0
  assert (cmp / "compare.png").read_bytes()[:4] == b"\x89PNG"
  assert (cmp / "compare.md").is_file()
  fig = saved["compare.png"]
  # Compressed: below the 610 float32 coordinates (60 x 10 kernel, 10
  # biases) sent dense.
  assert all(0 < r["train_uplink_bytes"] < 610 * 4 for r in qsgd)
  total = np.cumsum(
    [r["train_uplink_bytes"] * r["train_num_clients"] for r in qsgd]
  )
  assert all(r["train_num_clients"] == 10 for r in qsgd)
  lines = {ln.get_gid(): ln for ax in fig.axes for ln in ax.lines}
  (test_line,) = [ln for gid, ln in lines.items() if gid.endswith("/test_loss")]
  np.testing.assert_allclose(test_line.get_xdata(), total[[1, 3]])
  np.testing.assert_allclose(
    test_line.get_ydata(), [qsgd[1]["test_loss"], qsgd[3]["test_loss"]]
  )
  assert fig.axes[0].get_xlabel() == "cumulative uplink bytes"
  # The uncompressed run reports no uplink bytes: refused, by name.
  code = main(
    [
      "compare",
      str(dirs["none"]),
      "--out",
      str(tmp_path / "c2"),
      "--x",
      "bytes",
    ]
  )
  assert code == 2
  assert "x='bytes' needs the columns train_uplink_bytes" in (
    capsys.readouterr().err
  )
