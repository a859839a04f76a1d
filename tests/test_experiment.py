"""Experiment files, typed overrides, checkpoints, runs, vmapped sweeps, compare."""

import dataclasses
import json
import textwrap

import chex
import flax.serialization
import jax
import numpy as np
import optax
import pytest

import fedjax_lite as fl
import fedjax_lite.experiment as fe
from fedjax_lite.experiment import config as cfglib
from fedjax_lite.experiment import cli

# A tiny experiment file (8 clients, 4 features, 3 classes): FedAvg with an
# Adam server optimizer (optimizer state) and a per-client participation
# counter (client states), so a checkpoint holds every kind of state.
TINY_EXPERIMENT = textwrap.dedent('''
    """Tiny test experiment: python -m fedjax_lite run tiny.py[:long]"""
    import dataclasses
    import time

    import fedjax_lite as fl
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax


    @dataclasses.dataclass(frozen=True)
    class Config:
      num_rounds: int = 4
      clients_per_round: int = 4
      client_lr: float = 0.1
      seed: int = 0
      eval_every: int = 2
      sleep_s: float = 0.0
      hidden: tuple[int, ...] = ()
      tag: str | None = None
      flag: bool = False


    def get_config(arg: str = ""):
      cfg = Config()
      if arg == "long":  # slow rounds, so a signal lands mid-run
        cfg = dataclasses.replace(cfg, num_rounds=40, eval_every=5,
                                  sleep_s=0.05)
      return cfg


    def build(config):
      rng = np.random.default_rng(0)
      sizes = [3, 6, 4, 6, 3, 5, 6, 4]  # two size buckets
      clients = [{"x": rng.standard_normal((n, 4)).astype(np.float32),
                  "y": rng.integers(0, 3, n).astype(np.int32)} for n in sizes]
      train = fl.FederatedDataset.from_clients(clients)
      model = fl.models.logistic_regression(4, 3)

      def algorithm_fn(h):
        base = fl.fed_avg(model, optax.sgd(h["client_lr"]), optax.adam(0.05))

        def client_update(server_params, client_state, data, rng):
          out = base.client_update(server_params, None, data, rng)
          return out._replace(state=client_state + 1)

        def server_update(state, aggregate):
          if config.sleep_s:
            jax.debug.callback(lambda: time.sleep(config.sleep_s))
          return base.server_update(state, aggregate)

        return base._replace(client_init=lambda p: jnp.zeros((), jnp.int32),
                             client_update=client_update,
                             server_update=server_update, name="tiny_avg")

      return fl.experiment.Experiment(
          model=model, train=train, test=train,
          hparams={"client_lr": config.client_lr}, algorithm_fn=algorithm_fn,
          round_config=fl.RoundConfig(config.clients_per_round,
                                      fl.LocalWork(batch_size=2)),
          num_rounds=config.num_rounds, eval_every=config.eval_every,
          seed=config.seed, name="tiny")
''')


@pytest.fixture
def tiny_file(tmp_path):
  path = tmp_path / "tiny.py"
  path.write_text(TINY_EXPERIMENT)
  return path


@pytest.fixture(scope="module")
def tiny_exp(tmp_path_factory):
  """The tiny experiment of its default config, built once for the module:
  runs of it, and of ``dataclasses.replace(tiny_exp, num_rounds=...,
  eval_every=...)`` (fields that build() does not read), share one engine
  and its compiled rounds (``runs.engine_for`` caches by algorithm)."""
  path = tmp_path_factory.mktemp("tiny_exp") / "tiny.py"
  path.write_text(TINY_EXPERIMENT)
  ef = fe.load_experiment_file(str(path))
  return ef.build(ef.get_config())


@pytest.fixture(scope="module")
def tiny_run(tiny_exp, tmp_path_factory):
  """One uninterrupted run of ``tiny_exp`` (4 rounds) with a run folder."""
  return fe.train(tiny_exp, tmp_path_factory.mktemp("full"), progress=False)


def _write(tmp_path, name, src):
  p = tmp_path / name
  p.write_text(textwrap.dedent(src))
  return p


# ------------------------------------------------------------ config parsing
def test_overrides_are_typed_by_the_dataclass(tiny_file):
  ef = fe.load_experiment_file(f"{tiny_file}:long")
  base = ef.get_config()
  assert ef.arg == "long" and base.num_rounds == 40
  cfg = fe.apply_overrides(
    base,
    ["client_lr=0.5", "num_rounds=7", "hidden=8,16", "tag=none", "flag=true"],
  )
  assert cfg.client_lr == 0.5 and isinstance(cfg.client_lr, float)
  assert cfg.num_rounds == 7 and isinstance(cfg.num_rounds, int)
  assert cfg.hidden == (8, 16) and cfg.tag is None and cfg.flag is True
  assert fe.apply_overrides(base, ["tag=abc"]).tag == "abc"
  # Round trip through config.json.
  back = cfglib.config_from_dict(
    base, json.loads(json.dumps(fe.config_to_dict(cfg)))
  )
  assert back == cfg


@pytest.mark.parametrize(
  "override, message",
  [
    ("num_round=3", "unknown config field 'num_round'.*num_rounds"),
    ("num_rounds=1.5", "expected an int, got '1.5'"),
    ("client_lr=fast", "expected a float, got 'fast'"),
    ("flag=maybe", "expected a bool"),
    ("hidden=a,b", "expected an int"),
    ("client_lr", "not of the form field=value"),
  ],
)
def test_bad_overrides_say_what_is_wrong(tiny_file, override, message):
  cfg = fe.load_experiment_file(str(tiny_file)).get_config()
  with pytest.raises(fe.ConfigError, match=message):
    fe.apply_overrides(cfg, [override])


@pytest.mark.parametrize(
  "source, message",
  [
    ("def build(c): pass\n", "no function get_config"),
    ("def get_config(arg=''): return 1\n", "no function build"),
    (
      """
     def get_config(arg=''): return {'num_rounds': 3}
     def build(c): pass
     """,
      "returned dict; expected an instance of a frozen dataclass",
    ),
    (
      """
     import dataclasses
     @dataclasses.dataclass
     class C:
       n: int = 1
     def get_config(arg=''): return C()
     def build(c): pass
     """,
      "not frozen",
    ),
    (
      """
     import dataclasses
     @dataclasses.dataclass(frozen=True)
     class C:
       opt: object = None
     def get_config(arg=''): return C()
     def build(c): pass
     """,
      "config fields must be int, float, str, bool",
    ),
    (
      """
     import dataclasses
     @dataclasses.dataclass(frozen=True)
     class C:
       n: int = 1.5
     def get_config(arg=''): return C()
     def build(c): pass
     """,
      "field 'n' holds 1.5",
    ),
    ("import not_a_module_anywhere\n", "importing experiment file .* failed"),
  ],
)
def test_malformed_experiment_files_get_clear_errors(tmp_path, source, message):
  path = _write(tmp_path, "bad.py", source)
  with pytest.raises(fe.ConfigError, match=message):
    fe.load_experiment_file(str(path)).get_config()


def test_missing_file_and_wrong_build_result(tmp_path):
  with pytest.raises(fe.ConfigError, match="does not exist.*expected a path"):
    fe.load_experiment_file(str(tmp_path / "nope.py"))
  path = _write(
    tmp_path,
    "wrong.py",
    """
      import dataclasses
      @dataclasses.dataclass(frozen=True)
      class C:
        n: int = 1
      def get_config(arg=''): return C()
      def build(c): return "an experiment"
      """,
  )
  ef = fe.load_experiment_file(str(path))
  with pytest.raises(
    fe.ConfigError,
    match="returned str; expected a fedjax_lite.experiment.Experiment",
  ):
    ef.build(ef.get_config())


def test_experiment_validates_its_fields(tiny_exp):
  exp = tiny_exp
  with pytest.raises(
    TypeError, match="Experiment.model must be a fedjax_lite Model, got str"
  ):
    dataclasses.replace(exp, model="logreg")
  with pytest.raises(ValueError, match="num_rounds must be >= 1, got 0"):
    dataclasses.replace(exp, num_rounds=0)
  with pytest.raises(ValueError, match="clients_per_round=9 exceeds the 8"):
    dataclasses.replace(exp, round_config=fl.RoundConfig(9))
  with pytest.raises(ValueError, match="needs algorithm="):
    dataclasses.replace(exp, algorithm=None, algorithm_fn=None, hparams={})
  with pytest.raises(ValueError, match="unknown hyperparameters"):
    exp.make_algorithm({"server_lr": 1.0})


# ---------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_is_exact_and_atomic(
  tmp_path, tiny_exp, tiny_run
):
  exp = tiny_exp
  engine = fl.Engine(exp.algorithm, exp.round_config)
  state = tiny_run.state  # after 4 rounds of the engine
  path = tmp_path / "ck" / "checkpoint.msgpack"
  fe.save_checkpoint(path, state, {"round": 4})
  fe.save_checkpoint(path, state, {"round": 4})  # overwrite in place
  assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.msgpack"]
  raw = flax.serialization.msgpack_restore(path.read_bytes())  # msgpack
  assert set(raw) == {"format", "state", "meta"}
  assert set(raw["state"]) == {
    "server",
    "clients",
    "round",
    "rng",
    "aggregator",
  }
  template = fe.init_state(exp, engine)
  restored, meta = fe.load_checkpoint(path, template)
  assert meta == {"round": 4}
  chex.assert_trees_all_equal(jax.device_get(state), restored)
  assert int(restored.round) == 4 and restored.clients.shape == (8,)
  # A different structure (another model) is refused with an explanation.
  other = dataclasses.replace(
    exp,
    model=fl.models.logistic_regression(4, 5),
    algorithm=fl.fed_avg(fl.models.logistic_regression(4, 5), optax.sgd(0.1)),
    algorithm_fn=None,
    hparams={},
  )
  other_engine = fl.Engine(other.algorithm, other.round_config)
  with pytest.raises(ValueError, match="holds another state structure"):
    fe.load_checkpoint(path, fe.init_state(other, other_engine))


# ---------------------------------------------------------------------- runs
def test_run_file_writes_the_run_folder(tmp_path, tiny_file, tiny_exp):
  res = fe.run_file(
    str(tiny_file), ["num_rounds=3"], out=tmp_path / "runs", progress=False
  )
  d = res.run_dir
  assert d.parent == tmp_path / "runs" and d.name.startswith("tiny-")
  for name in (
    "config.json",
    "metrics.jsonl",
    "metrics.csv",
    "curves.png",
    "summary.json",
    "checkpoint.msgpack",
  ):
    assert (d / name).is_file(), name
  record = json.loads((d / "config.json").read_text())
  assert record["config"]["num_rounds"] == 3
  assert record["overrides"] == {"num_rounds": "3"}
  rows = fe.read_jsonl(d / "metrics.jsonl")
  assert [r["round"] for r in rows] == [1, 2, 3]
  # eval_every=2: test metrics on round 2 and after the last round.
  assert ["test_accuracy" in r for r in rows] == [False, True, True]
  for key in ("train_loss", "train_accuracy", "rounds_per_s", "wall_time"):
    assert all(key in r for r in rows)
  assert {"test_accuracy_p10", "test_accuracy_p90"} <= set(rows[1])
  header = (d / "metrics.csv").read_text().splitlines()[0].split(",")
  assert "test_accuracy_p50" in header and header[0] == "round"
  # The metrics match an evaluation of the final params (the experiment's
  # model and test data: num_rounds does not change them).
  ev = fl.evaluate(tiny_exp.model, res.params, tiny_exp.test)
  assert rows[-1]["test_accuracy"] == pytest.approx(ev.mean["accuracy"])
  assert json.loads((d / "summary.json").read_text())["status"] == "finished"


def test_resume_in_process_matches_one_run(tmp_path, tiny_exp, tiny_run):
  exp, full = tiny_exp, tiny_run
  part = fe.train(
    dataclasses.replace(exp, num_rounds=2), tmp_path / "part", progress=False
  )
  assert int(part.state.round) == 2
  rest = fe.train(exp, tmp_path / "part", resume=True, progress=False)
  chex.assert_trees_all_equal(
    jax.device_get(full.state), jax.device_get(rest.state)
  )
  strip = lambda rows: [
    {
      k: v
      for k, v in r.items()  # noqa: E731
      if k not in fe.records.TIMING_KEYS
    }
    for r in rows
  ]
  assert strip(rest.rows) == strip(full.rows)
  assert strip(fe.read_jsonl(tmp_path / "part" / "metrics.jsonl")) == strip(
    full.rows
  )


# -------------------------------------------------------------------- sweeps
def test_vmapped_sweep_traces_once_and_matches_separate_runs(
  tiny_file, monkeypatch
):
  ef = fe.load_experiment_file(str(tiny_file))
  traced = []  # the program's one trace traces the round once
  rounds_body = fl.Engine.rounds_body
  monkeypatch.setattr(
    fl.Engine,
    "rounds_body",
    lambda self, *a, **k: traced.append(1) or rounds_body(self, *a, **k),
  )
  # 2 rounds, 2 seeds x 2 learning rates: the layout of the sweeps of
  # test_sweep_resume_matches_one_sweep (one compiled program).
  exp = ef.build(
    fe.apply_overrides(ef.get_config(), ["num_rounds=2", "eval_every=0"])
  )
  grid = {"client_lr": [0.05, 0.2]}
  res = fe.sweep(exp, seeds=[0, 1], grid=grid, progress=False)
  assert res.num_traces == 1 and len(traced) == 1
  assert [(s["seed"], s["client_lr"]) for s in res.settings] == [
    (0, 0.05),
    (1, 0.05),
    (0, 0.2),
    (1, 0.2),
  ]
  for i in (1, 2):  # seed 1 with lr 0.05, seed 0 with lr 0.2
    s = res.settings[i]
    alg = exp.make_algorithm({"client_lr": s["client_lr"]})
    engine = fl.Engine(alg, exp.round_config)
    data = engine.put_data(exp.train)
    state = fe.init_state(exp, engine, s["seed"])
    losses = []
    for _ in range(exp.num_rounds):
      state, m = engine.round(state, data)
      losses.append(float(m["loss"]))
    got = res.state_of(i)
    chex.assert_trees_all_close(
      jax.device_get(got.server.params),
      jax.device_get(state.server.params),
      rtol=1e-5,
      atol=1e-6,
    )
    np.testing.assert_array_equal(
      np.asarray(got.clients), np.asarray(state.clients)
    )
    np.testing.assert_allclose(
      [r["train_loss"] for r in res.setting_rows(i)], losses, rtol=1e-5
    )
  # Different learning rates really gave different models.
  assert not np.allclose(
    res.state_of(0).server.params["Dense_0"]["kernel"],
    res.state_of(2).server.params["Dense_0"]["kernel"],
  )
  assert set(res.groups()) == {"client_lr=0.05", "client_lr=0.2"}


def test_a_run_is_the_sweep_of_one_setting(tiny_exp, tiny_run):
  """train and a one-seed sweep run the same rounds: equal states, equal
  metric rows (the sweep's have its setting's columns in front)."""
  exp, run = tiny_exp, tiny_run
  swept = fe.sweep(exp, seeds=[exp.seed], progress=False)
  chex.assert_trees_all_equal(
    jax.device_get(run.state), jax.device_get(swept.state_of(0))
  )
  strip = lambda rows: [  # noqa: E731
    {
      k: v
      for k, v in r.items()
      if k not in fe.records.TIMING_KEYS and k not in ("setting", "seed")
    }
    for r in rows
  ]
  assert strip(swept.rows) == strip(run.rows)
  assert [r["round"] for r in run.rows] == [1, 2, 3, 4]
  assert all(r["setting"] == 0 and r["seed"] == 0 for r in swept.rows)


def test_sweep_carries_a_stateful_aggregator_like_separate_runs(tiny_exp):
  """An adaptive clip norm (aggregator state) evolves in a sweep exactly as
  in separate runs of each seed."""
  base = dataclasses.replace(tiny_exp, eval_every=0)
  aggregator = fl.aggregators.clipped(
    fl.aggregators.weighted_mean(), 0.05, adaptive=True
  )
  exp = dataclasses.replace(
    base,
    algorithm=base.algorithm._replace(aggregator=aggregator),
    algorithm_fn=None,
    hparams={},
  )
  engine = fl.Engine(exp.algorithm, exp.round_config)
  data = engine.put_data(exp.train)
  vm = fe.VmappedRounds(exp, [3, 4], None, 3)
  got, metrics = vm.run(vm.init(data), data, 3)
  assert vm.num_traces == 1
  assert set(vm.block_sizes) == set(data.bucket_sizes)
  for i, seed in enumerate((3, 4)):
    one = fe.init_state(exp, engine, seed, data)
    for _ in range(3):
      one, m = engine.round(one, data)
    chex.assert_trees_all_close(
      jax.device_get(vm.state_of(got, i).aggregator),
      jax.device_get(one.aggregator),
      rtol=1e-5,
    )
    chex.assert_trees_all_close(
      jax.device_get(vm.state_of(got, i).server.params),
      jax.device_get(one.server.params),
      rtol=1e-5,
      atol=1e-6,
    )
    np.testing.assert_allclose(metrics["loss"][-1, i], m["loss"], rtol=1e-5)
  # The clip norm moved from its start.
  assert not np.allclose(jax.tree.leaves(got.aggregator)[0], 0.05)


def test_grid_points_keep_their_own_aggregation_weights(rng):
  """Grid points whose client weights differ are averaged separately: every
  setting of a sweep equals its separate run, total weights included."""
  sizes = [3, 6, 4, 6, 3, 5]
  train = fl.FederatedDataset.from_clients(
    [
      {
        "x": rng.standard_normal((n, 4)).astype(np.float32),
        "y": rng.integers(0, 3, n).astype(np.int32),
      }
      for n in sizes
    ]
  )
  model = fl.models.logistic_regression(4, 3)

  def algorithm_fn(h):
    base = fl.fed_avg(model, optax.sgd(h["client_lr"]))

    def client_update(b, cs, data, key):
      out = base.client_update(b, cs, data, key)
      # A weight that depends on the grid point and on the client.
      w = out.weight * (1.0 + h["client_lr"] * data.client_id)
      return out._replace(weight=w)

    return base._replace(client_update=client_update)

  exp = fe.Experiment(
    model=model,
    train=train,
    hparams={"client_lr": 0.1},
    algorithm_fn=algorithm_fn,
    round_config=fl.RoundConfig(3, fl.LocalWork(batch_size=2)),
    num_rounds=2,
    eval_every=0,
  )
  grid = {"client_lr": [0.05, 0.5, 2.0]}
  data = fl.Engine(exp.algorithm, exp.round_config).put_data(train)
  vm = fe.VmappedRounds(exp, [0, 1], grid, 2)
  state, metrics = vm.run(vm.init(), data, 2)
  assert len(vm.settings) == 6
  engines = {}  # one per grid point: its seeds' runs share its program
  for i, s in enumerate(vm.settings):
    lr = s["client_lr"]
    if lr not in engines:
      engines[lr] = fl.Engine(
        exp.make_algorithm({"client_lr": lr}), exp.round_config
      )
    engine = engines[lr]
    one = fe.init_state(exp, engine, s["seed"])
    weights, losses = [], []
    for _ in range(2):
      one, m = engine.round(one, data)
      weights.append(float(m["total_weight"]))
      losses.append(float(m["loss"]))
    chex.assert_trees_all_close(
      jax.device_get(vm.state_of(state, i).server),
      jax.device_get(one.server),
      rtol=1e-5,
      atol=1e-6,
    )
    np.testing.assert_allclose(
      metrics["total_weight"][:, i], weights, rtol=1e-6
    )
    np.testing.assert_allclose(metrics["loss"][:, i], losses, rtol=1e-5)
  # The weights really differ between grid points (same seed, same clients).
  assert not np.allclose(
    metrics["total_weight"][:, 0], metrics["total_weight"][:, 2]
  )


def test_sweep_counts_dropped_clients_per_setting(tiny_exp):
  """A grid point whose updates are NaN drops its clients (its own
  ``dropped_nonfinite``) while the others train as in their separate runs;
  the sweep stops as diverged only when every setting diverged."""
  exp = dataclasses.replace(tiny_exp, num_rounds=2, eval_every=0)
  res = fe.sweep(
    exp, seeds=[0], grid={"client_lr": [0.1, float("nan")]}, progress=False
  )
  assert res.diverged is None and int(res.state.round[0]) == 2
  for r in res.rows:
    want = 0.0 if r["setting"] == 0 else 4.0  # clients_per_round = 4
    assert r["train_dropped_nonfinite"] == want, r
  run = fe.train(exp, progress=False)
  chex.assert_trees_all_close(
    jax.device_get(res.state_of(0).server.params),
    jax.device_get(run.state.server.params),
    rtol=1e-6,
    atol=1e-7,
  )
  nan = fe.sweep(
    exp, seeds=[0, 1], grid={"client_lr": [float("nan")]}, progress=False
  )
  assert nan.diverged_round == 1
  assert nan.diverged.startswith("every setting diverged (setting 0: all 4")
  assert int(nan.state.round[0]) == 0  # the last finite state
  assert [r["round"] for r in nan.rows] == [1, 1]


def test_sweep_rejects_undeclared_hyperparameters(tiny_exp):
  exp = tiny_exp
  with pytest.raises(
    fe.ConfigError,
    match="cannot sweep 'num_rounds'.*"
    r"\['client_lr'\]",
  ):
    fe.sweep(exp, grid={"num_rounds": [1.0, 2.0]}, progress=False)
  with pytest.raises(fe.ConfigError, match="NAME=V1,V2"):
    cli.parse_grid(["client_lr"])
  # train and sweep share their run options; a misspelt one is named.
  for run in (fe.train, fe.sweep):
    with pytest.raises(TypeError, match=r"\['progres'\].*'progress'"):
      run(exp, progres=False)
  assert cli.parse_seeds("3") == 3
  assert cli.parse_seeds("0,4") == [0, 4]


def test_sweep_resume_matches_one_sweep(tmp_path, tiny_file):
  """A sweep stopped after 2 rounds and resumed to 4 computes what one
  4-round sweep computes (states and metric rows), like a resumed run."""
  grid = {"client_lr": [0.05, 0.2]}
  out = tmp_path / "runs"
  full = fe.sweep_file(
    str(tiny_file), [], seeds=2, grid=grid, out=out, progress=False
  )
  part = fe.sweep_file(
    str(tiny_file),
    ["num_rounds=2"],
    seeds=2,
    grid=grid,
    out=out,
    progress=False,
  )
  assert part.state.round.tolist() == [2, 2, 2, 2]
  rest = fe.sweep_file(
    None, ["num_rounds=4"], resume=part.run_dir, progress=False
  )
  assert rest.settings == full.settings
  chex.assert_trees_all_equal(
    jax.device_get(rest.state), jax.device_get(full.state)
  )
  strip = lambda rows: [  # noqa: E731
    {k: v for k, v in r.items() if k not in fe.records.TIMING_KEYS}
    for r in rows
  ]
  assert strip(rest.rows) == strip(full.rows)
  assert len(full.rows) == 4 * 4


def test_sweep_file_and_compare_write_figures_and_tables(tmp_path, tiny_file):
  out = tmp_path / "runs"
  res = fe.sweep_file(
    str(tiny_file),
    ["num_rounds=2"],
    seeds=2,
    grid={"client_lr": [0.05, 0.2]},
    out=out,
    progress=False,
  )
  for name in (
    "sweep.json",
    "metrics.jsonl",
    "metrics.csv",
    "curves.png",
    "summary.md",
  ):
    assert (res.run_dir / name).is_file(), name
  assert "| client_lr=0.05 | 2 | 2 |" in res.table()
  run = fe.run_file(str(tiny_file), ["num_rounds=2"], out=out, progress=False)
  table = fe.compare(
    [run.run_dir, res.run_dir], tmp_path / "cmp", labels=["single", "swept"]
  )
  assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0
  md = (tmp_path / "cmp" / "compare.md").read_text()
  assert table in md
  final = json.loads((run.run_dir / "summary.json").read_text())["final"]
  assert f"| single | 1 | 2 | {final['train_loss']:.4f} |" in table
  assert "| swept [client_lr=0.2] | 2 | 2 |" in table
  with pytest.raises(fe.ConfigError, match="no metrics.jsonl"):
    fe.compare([tmp_path], tmp_path / "cmp2")


def test_curves_show_uplink_bytes_and_epsilon_when_reported(tmp_path):
  rows = [
    {"round": t, "train_loss": 1.0 / t, "train_accuracy": 0.5}
    for t in range(1, 4)
  ]
  assert len(fe.plot_curves(rows).axes) == 2
  rows = [
    dict(r, train_uplink_bytes=1326.0, train_dp_epsilon=0.1 * r["round"])
    for r in rows
  ]
  fig = fe.plot_curves(rows, tmp_path / "c.png")
  titles = [ax.get_title() for ax in fig.axes]
  assert titles[-2:] == ["Uplink per client", "Privacy spent"], titles
  np.testing.assert_allclose(fig.axes[-1].lines[0].get_ydata(), [0.1, 0.2, 0.3])
  assert (tmp_path / "c.png").stat().st_size > 0
