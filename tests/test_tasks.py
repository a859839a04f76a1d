"""The benchmark task files (experiments/tasks/) and docs/benchmarks.md.

* every settings row of the docs table equals the task file's config for
  that optimizer (so the docs and the files cannot drift);
* every task's ``:smoke`` preset runs offline with finite metrics;
* ``data="generated"`` has the shapes, dtypes and token layouts that the
  dataset loaders document.
"""

import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import pytest

import fedjax_lite as fl
from fedjax_lite.experiment import config as config_lib

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "experiments" / "tasks"
DOCS = ROOT / "docs" / "benchmarks.md"
FILES = (
  "emnist_cr.py",
  "cifar100.py",
  "shakespeare.py",
  "stackoverflow_nwp.py",
  "stackoverflow_lr.py",
  "cifar10_pfl.py",
)
# The metric each task's source reports (docs/benchmarks.md).
REPORTED = {
  "emnist_cr.py": "accuracy",
  "cifar100.py": "accuracy",
  "shakespeare.py": "accuracy_no_oov_no_eos",
  "stackoverflow_nwp.py": "accuracy_no_oov_no_eos",
  "stackoverflow_lr.py": "recall_at_5",
  "cifar10_pfl.py": "accuracy",
}


def load(name, arg=""):
  spec = str(TASKS / name) + (f":{arg}" if arg else "")
  return config_lib.load_experiment_file(spec)


def docs_rows():
  """The settings table of docs/benchmarks.md as dicts (header -> cell)."""
  lines = DOCS.read_text().splitlines()
  start = next(i for i, l in enumerate(lines) if l.startswith("| file | opt"))
  header = [c.strip() for c in lines[start].strip("|").split("|")]
  rows = []
  for line in lines[start + 2 :]:
    if not line.startswith("|"):
      break
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert len(cells) == len(header), line
    rows.append(dict(zip(header, cells)))
  return rows


def power_of_ten(cell):
  """``"10^-1.5"`` -> 0.0316...; ``"-"`` -> None."""
  if cell == "-":
    return None
  m = re.fullmatch(r"10\^(-?\d+(?:\.\d+)?)", cell)
  assert m, f"expected 10^<exponent> or -, got {cell!r}"
  return 10.0 ** float(m.group(1))


def test_docs_table_matches_every_task_file():
  rows = docs_rows()
  seen = set()
  for row in rows:
    name, opt = row["file"], row["optimizer"]
    f = load(name)
    tc = f.module.task_common
    cfg = config_lib.apply_overrides(f.get_config(), {"optimizer": opt})
    s = tc.settings(cfg, f.module.TUNED)
    where = f"{name} {opt}"
    assert int(row["clients per round"]) == cfg.clients_per_round, where
    assert int(row["batch size"]) == cfg.batch_size, where
    assert int(row["local epochs"]) == cfg.num_epochs, where
    assert int(row["rounds"]) == cfg.num_rounds, where
    assert math.isclose(power_of_ten(row["client lr"]), s.client_lr), where
    assert math.isclose(power_of_ten(row["server lr"]), s.server_lr), where
    eps = power_of_ten(row["epsilon"])
    assert (eps is None) == (s.epsilon is None), where
    if eps is not None:
      assert math.isclose(eps, s.epsilon), where
    model, count = re.fullmatch(
      r"(\w+) \(([\d,]+)\)", row["model (parameters)"]
    ).groups()
    assert int(count.replace(",", "")) == fl.models.STANDARD_MODELS[model][1]
    assert row["command"] == (
      f"`python -m fedjax_lite run experiments/tasks/{name} "
      f"--set optimizer={opt}`"
    )
    assert row["measured here"] == "not yet run", where
    # the built experiment trains with these learning rates
    smoke = config_lib.apply_overrides(
      load(name, "smoke").get_config(), {"optimizer": opt}
    )
    exp = f.build(smoke)
    assert math.isclose(exp.hparams["client_lr"], s.client_lr), where
    assert math.isclose(exp.hparams["server_lr"], s.server_lr), where
    seen.add((name, opt))
  expected = {(n, o) for n in FILES for o in load(n).module.TUNED}
  assert seen == expected
  assert len(rows) == len(expected)  # no row twice


def test_tuned_values_follow_the_optimizer_and_yield_to_overrides():
  f = load("emnist_cr.py")
  tc = f.module.task_common
  base = f.get_config()
  adam = tc.settings(
    dataclasses.replace(base, optimizer="fedadam"), f.module.TUNED
  )
  assert math.isclose(adam.client_lr, 10**-1.5)
  assert math.isclose(adam.server_lr, 10**-2.5)
  assert math.isclose(adam.epsilon, 1e-4)
  own = tc.settings(
    dataclasses.replace(base, optimizer="fedadam", client_lr=0.05, epsilon=0.1),
    f.module.TUNED,
  )
  assert (own.client_lr, own.server_lr, own.epsilon) == (
    0.05,
    adam.server_lr,
    0.1,
  )


@pytest.mark.parametrize(
  "name, overrides, message",
  [
    (
      "emnist_cr.py",
      {"optimizer": "fedprox"},
      "optimizer must be one of fedavg, fedadam, fedyogi, got 'fedprox'.",
    ),
    (
      "cifar10_pfl.py",
      {"optimizer": "fedadam"},
      "optimizer must be one of fedavg, got 'fedadam'.",
    ),
    (
      "shakespeare.py",
      {"optimizer": "fedavg", "epsilon": "0.001"},
      "epsilon=0.001 applies to fedadam and fedyogi only",
    ),
    (
      "stackoverflow_lr.py",
      {"data": "fake"},
      "data must be one of real, generated, got 'fake'.",
    ),
  ],
)
def test_bad_choices_are_refused(name, overrides, message):
  f = load(name, "smoke")
  cfg = config_lib.apply_overrides(f.get_config(), overrides)
  with pytest.raises(fl.experiment.ConfigError, match=re.escape(message)):
    f.build(cfg)


@pytest.mark.parametrize("name", FILES)
def test_smoke_preset_runs_offline_with_finite_metrics(name, tmp_path):
  f = load(name, "smoke")
  cfg = f.get_config()
  assert cfg.data == "generated"
  assert cfg.num_rounds <= 2
  exp = f.build(cfg)
  result = fl.experiment.train(exp, tmp_path / "run", progress=False)
  assert result.diverged is None
  last = result.rows[-1]
  assert last["round"] == cfg.num_rounds
  metric = f"test_{REPORTED[name]}"
  assert metric in last and 0.0 <= last[metric] <= 1.0
  values = {
    k: v for k, v in last.items() if isinstance(v, float) and k != "seconds"
  }
  assert "test_loss" in values and "train_loss" in values
  bad = {k: v for k, v in values.items() if not math.isfinite(v)}
  assert not bad
  assert (tmp_path / "run" / "metrics.jsonl").is_file()


# ------------------------------------------------- generated data shapes
def generated(name, **overrides):
  """``(train, test)`` of ``name``'s generated data, its full-size config
  with a few clients."""
  f = load(name)
  cfg = dataclasses.replace(
    f.get_config(), data="generated", num_clients=3, **overrides
  )
  train, test = f.module.generated_data(cfg)
  return cfg, train, test


def check(ds, feature, shape, dtype, low, high):
  """Every example of ``feature`` is ``shape``/``dtype`` with values in
  ``[low, high]``."""
  a = ds.features[feature]
  assert a.shape[1:] == shape, (feature, a.shape)
  assert a.dtype == dtype, (feature, a.dtype)
  assert a.min() >= low and a.max() <= high, (feature, a.min(), a.max())


def test_generated_emnist_has_the_loader_shapes():
  # fedjax_lite/datasets/emnist.py: x float32 [n, 28, 28, 1] = 1 - pixels
  # in [0, 1]; y int32 in [0, 62)
  _, train, test = generated("emnist_cr.py", examples_per_client=5)
  for ds in (train, test):
    check(ds, "x", (28, 28, 1), np.float32, 0.0, 1.0)
    check(ds, "y", (), np.int32, 0, 61)
  assert train.counts.tolist() == [5, 5, 5]


@pytest.mark.parametrize("distort", [True, False])
def test_generated_cifar100_has_the_loader_shapes(distort):
  # fedjax_lite/datasets/cifar.py cifar100: distort -> x float32
  # [n, 32, 32, 3] pixels in [0, 255]; else [n, crop, crop, 3]
  # standardised; y int32 fine labels in [0, 100)
  _, train, _ = generated("cifar100.py", distort=distort, examples_per_client=4)
  if distort:
    check(train, "x", (32, 32, 3), np.float32, 0.0, 255.0)
    x = train.features["x"]
    assert np.array_equal(x, np.round(x))  # integer pixel values
  else:
    check(train, "x", (24, 24, 3), np.float32, -np.inf, np.inf)
  check(train, "y", (), np.int32, 0, 99)


def test_generated_cifar10_has_the_loader_shapes():
  # fedjax_lite/datasets/cifar.py cifar10: x float32 [n, 32, 32, 3]
  # normalised per channel, y int32 in [0, 10); one central test client
  _, train, test = generated("cifar10_pfl.py", examples_per_client=6)
  for ds in (train, test):
    check(ds, "x", (32, 32, 3), np.float32, -np.inf, np.inf)
    check(ds, "y", (), np.int32, 0, 9)
  assert test.num_clients == 1


def test_generated_shakespeare_has_the_fedjax_layout():
  # fedjax_lite/datasets/shakespeare.py source="tff": x, y int32
  # [m, seq_len] in [0, 90) (PAD 0, BOS 1, EOS 2, OOV 89); y is x shifted
  # by one along the joined sequence
  from fedjax_lite.datasets.shakespeare import FEDJAX_VOCAB_SIZE

  cfg, train, _ = generated("shakespeare.py", examples_per_client=3)
  for k in ("x", "y"):
    check(train, k, (80,), np.int32, 0, FEDJAX_VOCAB_SIZE - 1)
  client = train.client(0)
  x, y = client["x"].reshape(-1), client["y"].reshape(-1)
  assert x[0] == 1  # BOS
  assert np.array_equal(x[1:], y[:-1])
  assert (y == 2).any()  # EOS ends a snippet


def test_generated_stackoverflow_nwp_has_the_fedjax_layout():
  # fedjax_lite/datasets/stackoverflow.py task="nwp", FedJAX ids: x, y
  # int32 [20] in [0, V + 4); x = BOS, words, PAD; y = x shifted, EOS
  # after the last word
  _, train, _ = generated("stackoverflow_nwp.py", examples_per_client=50)
  for k in ("x", "y"):
    check(train, k, (20,), np.int32, 0, 10003)
  x, y = train.features["x"], train.features["y"]
  assert (x[:, 0] == 1).all()
  assert not (x == 2).any()  # FedJAX's layout: EOS never an input
  inside = x[:, 1:] != 0
  assert np.array_equal(x[:, 1:][inside], y[:, :-1][inside])
  assert (y == 2).any() and (y == 0).any()


def test_generated_stackoverflow_lr_has_the_loader_shapes():
  # fedjax_lite/datasets/stackoverflow.py task="tag": x float32 [V] word
  # frequencies (a row sums to at most 1), y float32 [num_tags] 0/1
  _, train, _ = generated("stackoverflow_lr.py", examples_per_client=4)
  check(train, "x", (10000,), np.float32, 0.0, 1.0)
  check(train, "y", (500,), np.float32, 0.0, 1.0)
  assert (train.features["x"].sum(axis=1) <= 1.0 + 1e-6).all()
  assert set(np.unique(train.features["y"])) == {0.0, 1.0}


@pytest.mark.parametrize("name", ["emnist_cr.py", "stackoverflow_nwp.py"])
def test_generated_data_is_deterministic_from_the_seed(name):
  _, a, test = generated(name, examples_per_client=4)
  _, b, _ = generated(name, examples_per_client=4)
  _, c, _ = generated(name, examples_per_client=4, seed=1)
  for k in a.features:
    assert np.array_equal(a.features[k], b.features[k])
    assert not np.array_equal(a.features[k], c.features[k])
  assert not np.array_equal(a.features["x"][:4], test.features["x"][:4])


# ------------------------------------------------------ the real-data path
@pytest.mark.parametrize("task", ["nwp", "tag"])
def test_real_stackoverflow_caps_users_and_samples_validation(
  task, monkeypatch
):
  """``data="real"`` asks the loader for the task's vocabularies, cuts every
  user to ``max_elements_per_user`` and validates on
  ``num_validation_examples`` test examples drawn from the whole test
  split (the loader itself is replaced: no network)."""
  name = "stackoverflow_nwp.py" if task == "nwp" else "stackoverflow_lr.py"
  f = load(name, "smoke")
  cfg = dataclasses.replace(
    f.get_config(), examples_per_client=7, num_clients=4
  )
  train, test = f.module.generated_data(cfg)
  calls = []

  def fake(**kw):
    calls.append(kw)
    return train, test

  monkeypatch.setattr(fl.datasets, "stackoverflow", fake)
  real = dataclasses.replace(
    cfg,
    data="real",
    max_elements_per_user=5,
    num_validation_examples=6,
    max_clients=4,
    search=("/nowhere",),
  )
  exp = f.build(real)
  (kw,) = calls
  assert kw["task"] == task and kw["vocab_size"] == 10000
  assert kw["max_clients"] == 4 and kw["search"] == ("/nowhere",)
  assert exp.train.counts.tolist() == [5, 5, 5, 5]
  for i in range(4):
    assert np.array_equal(exp.train.client(i)["x"], train.client(i)["x"][:5])
  assert exp.test.client_ids == ("validation",)
  assert exp.test.counts.tolist() == [6]
  rows = {r.tobytes() for r in test.features["x"]}
  assert all(r.tobytes() in rows for r in exp.test.features["x"])


def test_real_emnist_and_cifar_ask_the_loaders_for_the_paper_data(
  monkeypatch,
):
  calls = {}

  def fake(name, data):
    def loader(*args, **kw):
      calls[name] = (args, kw)
      return data

    return loader

  for name, module_name in (
    ("emnist", "emnist_cr.py"),
    ("cifar100", "cifar100.py"),
    ("cifar10", "cifar10_pfl.py"),
    ("shakespeare", "shakespeare.py"),
  ):
    f = load(module_name, "smoke")
    cfg = f.get_config()
    monkeypatch.setattr(
      fl.datasets, name, fake(name, f.module.generated_data(cfg))
    )
    f.build(dataclasses.replace(cfg, data="real", data_dir="/cache"))
  assert calls["emnist"][1]["only_digits"] is False
  assert calls["cifar100"][1]["crop"] == 24
  assert calls["cifar100"][1]["distort"] is True
  assert calls["shakespeare"][1]["source"] == "tff"
  assert calls["shakespeare"][1]["seq_len"] == 80
  kw = calls["cifar10"][1]
  assert (kw["partition"], kw["alpha"]) == ("iid", 0.1)
  assert all(c[1]["data_dir"] == "/cache" for c in calls.values())
