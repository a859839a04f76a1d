"""The core imports lazily; extras name their install command; no cycles.

* ``import fedjax_lite`` and the README quick tour (FedAvg on the engine,
  ``fl.evaluate``, the TFF-style process) import none of the extras'
  libraries, and neither does importing any module of the package: an extra
  is imported when a function first uses it (``fedjax_lite/_optional.py``).
* Without its library, an extra's function raises one line naming the
  ``pip install "fedjax_lite[...]"`` to run; pyproject.toml's extras match.
* The lazy namespaces (PEP 562, ``fedjax_lite/_lazy.py``) resolve every name.
* The module-level imports inside ``fedjax_lite/`` form no cycle.
"""

import ast
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

import fedjax_lite
from fedjax_lite import _optional

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fedjax_lite"
HEAVY = (
  "cryptography",
  "phe",
  "dp_accounting",
  "h5py",
  "sklearn",
  "scipy",
  "matplotlib",
  "tensorboardX",
  "wandb",
  "mlflow",
  "orbax",
  "flwr",
)
LAZY_PACKAGES = (
  "fedjax_lite",
  "fedjax_lite.experiment",
  "fedjax_lite.privacy",
  "fedjax_lite.vertical",
)


def run_python(code: str) -> str:
  """Runs ``code`` in a fresh interpreter on this tree; its stdout."""
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  out = subprocess.run(
    [sys.executable, "-c", textwrap.dedent(code)],
    capture_output=True,
    text=True,
    env=env,
    cwd=ROOT,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-4000:]
  return out.stdout


# A meta-path finder that records who first asks for a heavy library (it
# finds nothing itself, so the import goes on as usual).
RECORDER = """
import json, sys, traceback
HEAVY = set(%r)
WHO = {}

class Recorder:
  def find_spec(self, name, path=None, target=None):
    top = name.split(".")[0]
    if top in HEAVY and top not in WHO:
      frames = [f"{f.filename}:{f.lineno}" for f in traceback.extract_stack()
                if "fedjax_lite" in f.filename or "<string>" in f.filename]
      WHO[top] = frames[-3:]
    return None

sys.meta_path.insert(0, Recorder())

def loaded():
  return sorted({m.split(".")[0] for m in sys.modules
                 if m.split(".")[0] in HEAVY and sys.modules[m] is not None})
""" % (HEAVY,)


def test_core_and_quick_tour_import_no_extra():
  out = run_python(
    RECORDER
    + """
import fedjax_lite as fl
after_import = loaded()

import jax, optax
import numpy as np
train, test = fl.datasets.fedprox_synthetic(alpha=1.0, beta=1.0)
model = fl.models.logistic_regression(60, 10)
engine = fl.Engine(
  fl.fed_avg(model, optax.sgd(0.01), optax.sgd(1.0)),
  fl.RoundConfig(
    clients_per_round=4, local_work=fl.LocalWork(batch_size=10, num_epochs=1)
  ),
)
data = engine.put_data(train)
state = engine.init(model.init(jax.random.PRNGKey(0)), seed=0)
state, metrics = engine.round(state, data)
state, history = engine.run(state, data, 2)
assert np.isfinite(fl.evaluate(model, state.server.params, test).mean["loss"])
process = fl.learning.build_federated_averaging_process(
  model,
  client_optimizer_fn=lambda: optax.sgd(0.1),
  server_optimizer_fn=lambda: optax.sgd(1.0),
  local_epochs=1,
  batch_size=None,
)
pstate = process.initialize(seed=0)
x = np.zeros((3, 60), np.float32)
y = np.zeros(3, np.int32)
pstate, _ = process.next(pstate, [{"x": x, "y": y}, {"x": x, "y": y}])
after_tour = loaded()

import importlib, pkgutil
for m in pkgutil.walk_packages(fl.__path__, "fedjax_lite."):
  importlib.import_module(m.name)
after_all_modules = loaded()
print(json.dumps(dict(import_=after_import, tour=after_tour,
                      all_modules=after_all_modules, who=WHO)))
"""
  )
  got = json.loads(out.splitlines()[-1])
  who = got.pop("who")
  assert got == dict(import_=[], tour=[], all_modules=[]), who


def test_missing_extra_raises_one_line_install_hint():
  out = run_python(
    """
import json, sys
for name in ("dp_accounting", "phe", "matplotlib"):
  sys.modules[name] = None  # as if not installed

import fedjax_lite as fl

def hint(call):
  try:
    call()
  except ImportError as e:
    return [type(e).__name__, str(e)]
  return None

mech = fl.privacy.DpMechanism(
  noise_multiplier=1.0, sampling="poisson", population=100,
  clients_per_round=10,
)
print(json.dumps(dict(
  epsilon=hint(lambda: fl.privacy.epsilon(mech, 10, 1e-5)),
  dp_aggregator=hint(lambda: fl.privacy.dp_aggregator(
    1.0, 10, sampling="poisson", population=100, delta=1e-5)),
  no_accounting=hint(lambda: fl.privacy.dp_aggregator(1.0, 10)),
  keypair=hint(lambda: fl.vertical.paillier.keypair(256, insecure_ok=True)),
  plot=hint(lambda: fl.experiment.plot_curves(
    [{"round": 1, "train_loss": 1.0}])),
)))
"""
  )
  got = json.loads(out.splitlines()[-1])
  error = "MissingExtraError"
  privacy = 'fedjax_lite.privacy needs dp-accounting: pip install "fedjax_lite[privacy]"'
  assert got == dict(
    epsilon=[error, privacy],
    dp_aggregator=[error, privacy],
    no_accounting=None,  # DP noise without accounting needs no extra
    keypair=[
      error,
      'fedjax_lite.vertical needs phe: pip install "fedjax_lite[vertical]"',
    ],
    plot=[
      error,
      'fedjax_lite.experiment needs matplotlib: pip install '
      '"fedjax_lite[experiment]"',
    ],
  )


def test_cli_without_the_experiment_extra_is_one_error_line(tmp_path):
  """The command line refuses before any round when matplotlib is missing."""
  out = run_python(
    f"""
import sys
sys.modules["matplotlib"] = None  # as if not installed
sys.stderr = sys.stdout
from fedjax_lite.experiment.cli import main
code = main(["run", "experiments/fedavg_synthetic.py:smoke", "--out",
             {str(tmp_path / "runs")!r}, "--no-progress"])
print("exit", code)
"""
  )
  assert out.strip().splitlines()[-2:] == [
    "error: fedjax_lite.experiment needs matplotlib: pip install "
    '"fedjax_lite[experiment]"',
    "exit 2",
  ], out
  assert not (tmp_path / "runs").exists()


def test_require_names_a_broken_library_and_rejects_unknown_pairs():
  with pytest.raises(ValueError, match="not a dependency of the 'data'"):
    _optional.optional_import("phe", "data")
  assert isinstance(_optional.MissingExtraError("x"), ImportError)
  # Introspection of a deferred module imports nothing.
  lazy = _optional.optional_import("scipy.stats", "privacy")
  assert not hasattr(lazy, "__wrapped__")
  assert "not imported yet" in repr(lazy)


def _requirement_names(requirements):
  return {
    r.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0]
    for r in requirements
  }


def test_pyproject_extras_match_the_install_hints():
  tomllib = pytest.importorskip("tomllib")
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  extras = {
    k: _requirement_names(v)
    for k, v in project["optional-dependencies"].items()
  }
  core = _requirement_names(project["dependencies"])
  for extra, (_, dists) in _optional.EXTRAS.items():
    assert set(dists.values()) <= extras[extra], extra
  everything = set().union(*(extras[k] for k in _optional.EXTRAS))
  assert extras["all"] == everything
  assert extras["test"] >= extras["all"] | {"chex", "pytest"}
  optional = everything | {"chex", "scikit-learn", "dp-accounting"}
  assert not core & optional, core & optional


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_lazy_namespaces_resolve_every_name(package):
  module = __import__(package, fromlist=["_"])
  folder = PACKAGE.joinpath(*package.split(".")[1:])
  submodules = {p.stem for p in folder.glob("*.py")} | {
    p.parent.name for p in folder.glob("*/__init__.py")
  }
  owner = module.__getattr__.owner
  # A name exported from a submodule must not be a submodule's name too:
  # importing that submodule would bind the module over the name.
  assert not {n for n, sub in owner.items() if sub and n in submodules}
  assert {n for n, sub in owner.items() if sub is None} <= submodules
  for name in module.__all__:
    getattr(module, name)
  assert set(module.__all__) <= set(dir(module))
  with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
    getattr(module, "not_a_name")


def test_top_level_names():
  assert fedjax_lite.Engine is fedjax_lite.engine.Engine
  assert fedjax_lite.fed_avg is fedjax_lite.algorithms.fed_avg
  from fedjax_lite import LocalWork, configure_cpu  # noqa: F401


# ------------------------------------------------------------ import cycles
def _module_level_imports(body):
  """The import statements run when the module is imported: those at top
  level, in ``if``/``try``/``with`` blocks and class bodies, not in
  functions or ``if TYPE_CHECKING:``."""
  for node in body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      continue
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      yield node
      continue
    if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
      yield from _module_level_imports(node.orelse)
      continue
    for field in ("body", "orelse", "finalbody", "handlers"):
      inner = getattr(node, field, None)
      if isinstance(inner, list):
        yield from _module_level_imports(inner)


def import_graph() -> dict[str, set[str]]:
  """``{module: the fedjax_lite modules its module-level imports name}``.

  ``from a.b import c`` depends on ``a.b.c`` when that is a module, else on
  ``a.b`` (its ``__init__``); parent packages run first but are not edges.
  """
  modules = {}
  for path in PACKAGE.rglob("*.py"):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
  graph = {}
  for name, (path, is_package) in modules.items():
    deps = set()
    for node in _module_level_imports(ast.parse(path.read_text()).body):
      if isinstance(node, ast.Import):
        deps |= {a.name for a in node.names if a.name in modules}
        continue
      target = node.module or ""
      if node.level:
        base = name.split(".") if is_package else name.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
      if target not in modules:
        continue
      for alias in node.names:
        sub = f"{target}.{alias.name}"
        deps.add(sub if sub in modules else target)
    deps.discard(name)
    graph[name] = deps
  return graph


def find_cycle(graph) -> list[str] | None:
  """One cycle ``[a, b, ..., a]`` of ``graph``, or None."""
  state = dict.fromkeys(graph, 0)  # 0 new, 1 on the path, 2 done
  path = []

  def visit(v):
    state[v] = 1
    path.append(v)
    for w in sorted(graph[v]):
      if state[w] == 1:
        return path[path.index(w) :] + [w]
      if state[w] == 0 and (cycle := visit(w)):
        return cycle
    state[v] = 2
    path.pop()
    return None

  for v in sorted(graph):
    if state[v] == 0 and (cycle := visit(v)):
      return cycle
  return None


def test_import_graph_checker_finds_a_cycle():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert find_cycle(graph) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_inside_the_package():
  graph = import_graph()
  assert "fedjax_lite.privacy.accounting" in graph["fedjax_lite.privacy.dp"]
  assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
