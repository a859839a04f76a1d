"""fedjax_lite.flower: a FederatedAlgorithm as a Flower ClientApp/ServerApp.

The Flower path must give the engine's global weights (``fl.Engine`` on the
same clients, ``sampling="all"``, the same seed, local work and batch
order) to relative 1e-5: in this process through ``flower.local_grid``
(default tier) and with a SuperLink and three SuperNodes as separate
processes on 127.0.0.1 (``slow``). Failures: a node whose ClientApp raises
or never replies, and a SuperNode killed mid-round, end in the strategy's
documented handling within a bounded time.
"""

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no network from flwr
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

import importlib
import json
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

flwr = pytest.importorskip(
  "flwr",
  reason='flwr is not installed (pip install "fedjax_lite[flower]")',
)

import jax
import numpy as np
from flax import serialization

import fedjax_lite as fl
from fedjax_lite import _optional, flower

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "experiments" / "flower_app"
sys.path.insert(0, str(APP))
task = importlib.import_module("fedjax_flower_app.task")
client_module = importlib.import_module("fedjax_flower_app.client_app")
BIN = Path(sys.executable).parent
NUM_NODES = 3
ROUNDS = 3


def app_config(**overrides) -> dict:
  """The app's run config ([tool.flwr.app.config]) with overrides."""
  with open(APP / "pyproject.toml", "rb") as f:
    config = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
  unknown = set(overrides) - set(config)
  assert not unknown, unknown
  config.update(overrides)
  return config


def engine_params(config: dict, rounds: int = ROUNDS):
  """The engine's global params after ``rounds`` rounds on the app's
  partitions (every client sampled each round)."""
  algorithm = task.algorithm(config)
  dataset = fl.FederatedDataset.from_clients(
    [task.partition(config, k) for k in range(NUM_NODES)]
  )
  engine = fl.Engine(
    algorithm,
    fl.RoundConfig(
      NUM_NODES, local_work=task.local_work(config), sampling="all"
    ),
  )
  data = engine.put_data(dataset)
  state = engine.init(
    task.initial_params(config), seed=int(config["seed"]), data=data
  )
  state, _ = engine.run(state, data, rounds)
  return jax.device_get(algorithm.get_params(state.server))


def assert_close(got, want, rtol=1e-5):
  """Every leaf within ``rtol`` of the leaf's largest magnitude."""
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    assert g.shape == w.shape
    scale = np.max(np.abs(w))
    assert scale > 0
    np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * scale)


def node_configs(n: int = NUM_NODES) -> list:
  return [{"partition-id": k, "num-partitions": n} for k in range(n)]


def strategy_for(config, **kw):
  return flower.AlgorithmStrategy(
    task.algorithm(config),
    task.initial_params(config),
    seed=int(config["seed"]),
    min_available_nodes=NUM_NODES,
    min_train_nodes=NUM_NODES,
    **kw,
  )


# ------------------------------------------------------------ in process
@pytest.mark.parametrize(
  "name",
  [
    "fed_avg",
    pytest.param("fed_prox", marks=pytest.mark.slow),  # FedAvg's path
    "fed_adam",
  ],
)
def test_in_process_rounds_equal_engine(name):
  config = app_config(algorithm=name)
  strategy = strategy_for(config, fraction_evaluate=1.0)
  grid = flower.local_grid(
    flower.client_app(client_module.setup), node_configs(), run_config=config
  )
  result = strategy.start(
    grid=grid,
    initial_arrays=strategy.global_arrays(),
    num_rounds=ROUNDS,
    timeout=60,
  )
  want = engine_params(config)
  assert_close(strategy.global_params(), want)
  final = flower.arrays_to_tree(result.arrays, want, "result")
  assert_close(final, want)
  assert [r["round"] for r in strategy.history] == [1, 2, 3]
  last = strategy.history[-1]
  assert last["num_clients"] == NUM_NODES and last["failed_nodes"] == 0
  assert last["total_weight"] == NUM_NODES * config["examples-per-client"]
  # Federated evaluation: the example-weighted loss of the global model.
  model = task.model(config)
  x = np.concatenate([task.partition(config, k)["x"] for k in range(3)])
  y = np.concatenate([task.partition(config, k)["y"] for k in range(3)])
  loss, _ = model.batch_loss(want, {"x": x, "y": y}, np.ones(len(y), bool))
  np.testing.assert_allclose(last["eval_loss"], float(loss), rtol=1e-5)


def test_arrays_roundtrip_through_protobuf():
  import jax.numpy as jnp

  tree = {
    "w": np.arange(6, dtype=np.float32).reshape(2, 3),
    "n": np.int32(4),
    "h": jnp.asarray([1.5, -2.0], jnp.bfloat16),
    "s": (np.zeros(1, np.float64),),
  }
  record = flower.tree_to_arrays(tree)
  assert list(record.keys()) == ["h", "n", "s/0", "w"]  # flatten order
  back = flower.arrays_to_tree(
    flower._roundtrip(flwr.app.RecordDict({"a": record}))["a"], tree
  )
  for name in tree:
    g, w = jax.tree.leaves(back[name])[0], jax.tree.leaves(tree[name])[0]
    assert np.asarray(g).dtype == np.asarray(w).dtype
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
  bad = dict(tree, w=np.zeros((3, 2), np.float32))
  with pytest.raises(ValueError, match=r"array 'w' has shape \(2, 3\), exp"):
    flower.arrays_to_tree(record, bad, "update")
  with pytest.raises(ValueError, match=r"update: .* \(missing \['x'\]"):
    flower.arrays_to_tree(record, dict(tree, x=np.zeros(1)), "update")
  with pytest.raises(ValueError, match=r"array 'n' has dtype int32, expected"):
    flower.arrays_to_tree(record, dict(tree, n=np.float32(0)), "update")


def raising_app(bad_partition: int):
  """The example ClientApp, except that one partition's train raises."""
  app = flwr.clientapp.ClientApp()
  inner = flower.client_app(client_module.setup)

  @app.train()
  def train(msg, context):
    if context.node_config["partition-id"] == bad_partition:
      raise RuntimeError("disk full")
    return inner(msg, context)

  return app


def test_failed_node_raises_without_accept_failures():
  config = app_config()
  strategy = strategy_for(config, accept_failures=False)
  grid = flower.local_grid(raising_app(1), node_configs(), run_config=config)
  with pytest.raises(
    flower.RoundFailedError,
    match=r"round 1: 1 of 3 sampled nodes failed \(node 2: error 2: "
    r"<class 'RuntimeError'>:<'disk full'>\); AlgorithmStrategy\("
    r"accept_failures=True\)",
  ):
    strategy.start(grid, strategy.global_arrays(), num_rounds=1, timeout=60)


def test_failed_and_silent_nodes_leave_the_round_with_accept_failures():
  config = app_config()
  strategy = strategy_for(config)
  grid = flower.local_grid(
    raising_app(1), node_configs(), run_config=config, unreachable=(2,)
  )
  strategy.start(grid, strategy.global_arrays(), num_rounds=1, timeout=60)
  (row,) = strategy.history
  assert row["failed_nodes"] == 2 and row["num_clients"] == 1
  assert row["failures"] == {
    "2": "error 2: <class 'RuntimeError'>:<'disk full'>",
    "3": "no reply within the round's timeout",
  }
  assert row["total_weight"] == config["examples-per-client"]
  # The one reply is the round: the engine's round on partition 0 alone.
  algorithm = task.algorithm(config)
  engine = fl.Engine(
    algorithm, fl.RoundConfig(1, local_work=task.local_work(config))
  )
  dataset = fl.FederatedDataset.from_clients([task.partition(config, 0)])
  data = engine.put_data(dataset)
  state = engine.init(task.initial_params(config), seed=0, data=data)
  state, _ = engine.round(state, data)
  assert_close(
    strategy.global_params(), jax.device_get(algorithm.get_params(state.server))
  )
  strategy_none = strategy_for(config, min_train_replies=2)
  grid = flower.local_grid(
    raising_app(1), node_configs(), run_config=config, unreachable=(2,)
  )
  with pytest.raises(
    flower.RoundFailedError,
    match=r"round 1: 1 usable replies of 3 sampled nodes, expected at least "
    r"min_train_replies=2 \(node 2: error 2: <class 'RuntimeError'>:"
    r"<'disk full'>; "
    r"node 3: no reply within the round's timeout\)",
  ):
    strategy_none.start(grid, strategy_none.global_arrays(), 1, timeout=60)


def test_too_few_nodes_is_an_error_not_a_wait():
  config = app_config()
  strategy = strategy_for(config, wait_for_nodes=0.5)
  grid = flower.local_grid(
    flower.client_app(client_module.setup), node_configs(2), run_config=config
  )
  with pytest.raises(
    flower.RoundFailedError,
    match=r"round 1: 2 nodes connected after 0.5 s, expected at least 3",
  ):
    strategy.start(grid, strategy.global_arrays(), num_rounds=1, timeout=60)


def test_argument_errors():
  config = app_config()
  model = task.model(config)
  context = flwr.app.Context(
    1, 1, {"partition-id": 3}, flwr.app.RecordDict(), {}
  )
  with pytest.raises(ValueError, match=r"lacks \['num-partitions'\]"):
    flower.node_partition(context)
  context.node_config["num-partitions"] = 3
  with pytest.raises(
    ValueError, match=r"partition-id must be an int in \[0, 3"
  ):
    flower.node_partition(context)
  scaffold = fl.algorithms.scaffold(model, 0.1, num_clients=3)
  with pytest.raises(ValueError, match="keeps per-client state across rounds"):
    flower.AlgorithmStrategy(scaffold, task.initial_params(config))
  with pytest.raises(ValueError, match=r"fraction_train must be .*got 1.5"):
    flower.AlgorithmStrategy(
      task.algorithm(config), task.initial_params(config), fraction_train=1.5
    )
  with pytest.raises(TypeError, match="setup must be a function context"):
    flower.client_app(task.algorithm(config))
  with pytest.raises(TypeError, match="build_strategy must be a function"):
    flower.server_app(None)


def test_missing_flwr_names_the_extra(monkeypatch):
  real = importlib.import_module

  def fake(name, *a, **k):
    if name.split(".")[0] == "flwr":
      raise ModuleNotFoundError(f"No module named {name!r}", name="flwr")
    return real(name, *a, **k)

  monkeypatch.setattr(importlib, "import_module", fake)
  with pytest.raises(
    _optional.MissingExtraError,
    match=r'fedjax_lite.flower needs flwr: pip install "fedjax_lite\[flower\]"',
  ):
    flower._flwr("flwr.app")


# ------------------------------------------------- SuperLink + SuperNodes
def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Deployment:
  """A SuperLink and SuperNodes on 127.0.0.1, each its own process group
  (``stop`` kills every one, ClientApp/ServerApp children included)."""

  def __init__(self, tmp: Path, num_nodes: int = NUM_NODES):
    self.home = tmp / "flwr_home"
    self.home.mkdir()
    self.logs = tmp / "logs"
    self.logs.mkdir()
    self.env = dict(
      os.environ,
      FLWR_HOME=str(self.home),
      PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
      FLWR_TELEMETRY_ENABLED="0",
      FLWR_DISABLE_UPDATE_CHECK="1",
    )
    self.port = free_port()
    self.procs: dict = {}
    (self.home / "config.toml").write_text(
      '[superlink]\ndefault = "test"\n\n[superlink.test]\n'
      f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
    )
    try:
      self.start_all(num_nodes)
    except BaseException:
      self.stop()
      raise

  def start_all(self, num_nodes):
    self.start(
      "superlink",
      [
        "flower-superlink",
        "--insecure",
        "--disable-runtime-dependency-installation",  # no uv, no registry
        "--host",
        "127.0.0.1",
        "--port",
        str(self.port),
      ],
    )
    for k in range(num_nodes):
      self.start_node(k, num_nodes)
    self.wait_for_nodes(num_nodes, timeout=90)

  def wait_for_nodes(self, num_nodes, timeout):
    """Until the SuperLink's log shows ``num_nodes`` activated nodes."""
    log = self.logs / "superlink.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      text = log.read_text(errors="replace") if log.exists() else ""
      if text.count("Activated node_id") >= num_nodes:
        return
      dead = [n for n, p in self.procs.items() if p.poll() is not None]
      assert not dead, f"{dead} exited\n{self.log_tail()}"
      time.sleep(0.2)
    raise AssertionError(
      f"{num_nodes} SuperNodes did not connect in {timeout} s\n"
      + self.log_tail()
    )

  def start(self, name, argv):
    log = open(self.logs / f"{name}.log", "wb")
    self.procs[name] = subprocess.Popen(
      [str(BIN / argv[0])] + argv[1:],
      env=self.env,
      stdout=log,
      stderr=subprocess.STDOUT,
      start_new_session=True,
    )
    log.close()

  def start_node(self, k, num_nodes):
    self.start(
      f"node{k}",
      [
        "flower-supernode",
        "--insecure",
        "--superlink",
        f"127.0.0.1:{self.port}",
        "--port",
        str(free_port()),
        "--node-config",
        f"partition-id={k} num-partitions={num_nodes}",
      ],
    )

  def kill(self, name):
    proc = self.procs[name]
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    proc.wait(timeout=10)

  def stop(self):
    for name in list(self.procs)[::-1]:
      self.kill(name)

  def children(self, name, command="flwr-clientapp") -> list[int]:
    """Pids of ``command`` processes in ``name``'s process group."""
    pgid = self.procs[name].pid
    out = []
    for d in Path("/proc").iterdir():
      if d.name.isdigit() and int(d.name) != pgid:
        try:
          if os.getpgid(int(d.name)) == pgid and command in (
            d / "cmdline"
          ).read_bytes().decode(errors="replace"):
            out.append(int(d.name))
        except (ProcessLookupError, FileNotFoundError, PermissionError):
          pass
    return out

  def log_tail(self) -> str:
    return "\n".join(
      f"--- {p.name}\n" + p.read_text(errors="replace")[-3000:]
      for p in sorted(self.logs.iterdir())
    )

  def run(self, out: Path, **config) -> str:
    """``flwr run`` of the example app with ``out-dir`` and overrides;
    the run id."""
    items = dict(config, **{"out-dir": str(out)})
    overrides = " ".join(
      f"{k}={json.dumps(v) if isinstance(v, str) else v}"
      for k, v in items.items()
    )
    overrides = overrides.replace("True", "true").replace("False", "false")
    done = subprocess.run(
      [str(BIN / "flwr"), "run", str(APP), "test", "--run-config", overrides],
      env=self.env,
      capture_output=True,
      text=True,
      timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    found = re.search(r"Successfully started run (\d+)", done.stdout)
    assert found, done.stdout + done.stderr
    return found.group(1)

  def flwr(self, *args) -> str:
    done = subprocess.run(
      [str(BIN / "flwr"), *args],
      env=self.env,
      capture_output=True,
      text=True,
      timeout=60,
    )
    return done.stdout + done.stderr

  def status(self, run_id: str) -> str:
    """The run's status (``"running"``, ``"finished:failed"``, ...)."""
    out = self.flwr("ls", "test", "--run-id", run_id, "--format", "json")
    runs = json.loads(out[out.index("{") :])["runs"]
    return runs[0]["status"] if runs else "unknown"

  def wait(self, run_id: str, out: Path, timeout: float) -> str:
    """``"done"`` (history.json written) or ``"error"`` (error.txt), within
    ``timeout`` seconds; a run that ends otherwise fails with its log."""
    deadline = time.monotonic() + timeout
    next_status = time.monotonic() + 5
    while time.monotonic() < deadline:
      if (out / "history.json").exists():
        return "done"
      if (out / "error.txt").exists():
        return "error"
      if self.procs["superlink"].poll() is not None:
        break
      if time.monotonic() > next_status:
        if self.status(run_id).startswith("finished"):
          time.sleep(1)  # the last file may be on its way
          if not (
            (out / "history.json").exists() or (out / "error.txt").exists()
          ):
            break
        next_status = time.monotonic() + 5
      time.sleep(0.2)
    raise AssertionError(
      f"run {run_id}: no result in {out} after {timeout} s\n"
      + self.flwr("log", run_id, "test", "--show")[-4000:]
      + self.log_tail()
    )


@pytest.fixture
def deployment(tmp_path):
  d = Deployment(tmp_path)
  try:
    yield d
  finally:
    d.stop()


@pytest.mark.slow
def test_supernodes_as_processes_equal_engine(deployment, tmp_path):
  for name in task.ALGORITHMS:
    out = tmp_path / name
    run_id = deployment.run(out, algorithm=name, **{"fraction-evaluate": 0.0})
    assert deployment.wait(run_id, out, timeout=240) == "done", (
      out / "error.txt"
    ).read_text()
    config = app_config(algorithm=name)
    want = engine_params(config)
    got = serialization.msgpack_restore((out / "params.msgpack").read_bytes())
    assert_close(got, want)
    history = json.loads((out / "history.json").read_text())
    assert [r["num_clients"] for r in history] == [NUM_NODES] * ROUNDS
    assert [r["failed_nodes"] for r in history] == [0] * ROUNDS


@pytest.mark.slow
@pytest.mark.skipif(
  not Path("/proc").is_dir(), reason="finds the ClientApp process in /proc"
)
def test_supernode_killed_mid_round(deployment, tmp_path):
  out = tmp_path / "killed"
  timeout = 20
  run_id = deployment.run(
    out, **{"round-timeout": float(timeout), "fraction-evaluate": 0.0}
  )
  # Kill node 2 while its ClientApp process of round 2 runs.
  metrics = out / "metrics.jsonl"
  deadline = time.monotonic() + 180
  while time.monotonic() < deadline:
    rounds = metrics.read_text().splitlines() if metrics.exists() else []
    if len(rounds) >= 1 and deployment.children("node2"):
      break
    time.sleep(0.05)
  else:
    raise AssertionError(f"round 2 never started\n{deployment.log_tail()}")
  killed_at = time.monotonic()
  deployment.kill("node2")
  # The run goes on without it: rounds 2 and 3 each wait at most the round
  # timeout for the missing reply, then aggregate the two that arrived.
  assert deployment.wait(run_id, out, timeout=2 * timeout + 90) == "done", (
    out / "error.txt"
  ).read_text()
  assert time.monotonic() - killed_at < 2 * timeout + 90
  history = json.loads((out / "history.json").read_text())
  assert [r["num_clients"] for r in history] == [3, 2, 2]
  assert [r["failed_nodes"] for r in history] == [0, 1, 1]
  for row in history[1:]:  # the SuperLink's error reply, or none at all
    (reason,) = row["failures"].values()
    assert "no reply within the round's timeout" in reason or (
      "Node Unavailable" in reason
    ), reason
  assert np.all(
    np.isfinite(
      jax.tree.leaves(
        serialization.msgpack_restore((out / "params.msgpack").read_bytes())
      )[0]
    )
  )


@pytest.mark.slow
def test_flower_simulation_engine_equals_engine():
  pytest.importorskip(
    "ray",
    reason="Flower's simulation engine runs on Ray: pip install "
    '"flwr[simulation]"',
  )
  simulation = importlib.import_module("flwr.simulation")
  config = app_config(algorithm="fed_adam")
  strategies = []

  def build(context):
    strategies.append(strategy_for(config))
    return strategies[-1]

  def setup(context):
    k, _ = flower.node_partition(context)
    return flower.ClientSetup(
      task.algorithm(config), task.local_work(config), task.partition(config, k)
    )

  simulation.run_simulation(
    flower.server_app(build, num_rounds=ROUNDS, round_timeout=120.0),
    flower.client_app(setup),
    num_supernodes=NUM_NODES,
    backend_config={
      "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
      "init_args": {"num_cpus": 2, "num_gpus": 0},
    },
  )
  (strategy,) = strategies
  assert [r["num_clients"] for r in strategy.history] == [NUM_NODES] * ROUNDS
  assert_close(strategy.global_params(), engine_params(config))
