"""The engine's host-side block plan, and FedAvg bit for bit against the
release before pluggable aggregation."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_lite as fl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The last commit whose engine reduced with its built-in weighted mean.
BASELINE = "205ea6d"


def small_setup(block_size=None, clients_per_round=5):
  r = np.random.default_rng(0)
  sizes = (3, 9, 5, 12, 4, 7, 6, 11)
  clients = [
    {
      "x": r.standard_normal((n, 3)).astype(np.float32),
      "y": r.integers(0, 3, n).astype(np.int32),
    }
    for n in sizes
  ]
  model = fl.models.logistic_regression(3, 3)
  engine = fl.Engine(
    fl.fed_avg(model, optax.sgd(0.1)),
    fl.RoundConfig(
      clients_per_round, fl.LocalWork(batch_size=2), block_size=block_size
    ),
  )
  data = engine.put_data(fl.FederatedDataset.from_clients(clients), buckets=3)
  return engine, data, engine.init(model.init(jax.random.PRNGKey(0)))


def test_block_plan_is_host_side_and_matches_the_round():
  engine, data, state = small_setup()
  assert engine.block_sizes == {}
  plan = engine.block_plan(data, state)
  assert plan.bucket_sizes == data.bucket_sizes
  assert len(plan.block_sizes) == len(data.bucket_sizes)
  assert plan.pad == engine.num_devices * max(plan.block_sizes)
  engine.round(state, data)
  assert engine.block_sizes == plan.as_dict
  # Tracing again (a scanned run) leaves the same plan.
  engine.run(state, data, 2)
  assert engine.block_sizes == plan.as_dict
  assert engine.block_plan(data, state) is plan  # cached per layout
  # Pooled runs plan blocks for all runs' clients.
  pooled = engine.block_plan(data, state, num_runs=8)
  assert pooled.num_runs == 8 and pooled.bucket_sizes == plan.bucket_sizes
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), state, state)
  jax.jit(lambda s: engine.rounds_body(s, data))(stacked)
  assert (
    engine.block_sizes == engine.block_plan(data, state, num_runs=2).as_dict
  )
  fixed, data2, state2 = small_setup(block_size=2)
  assert set(fixed.block_plan(data2, state2).block_sizes) == {2}


_SCRIPT = textwrap.dedent("""
    import json, os
    os.environ["FEDJAX_LITE_CPU_TUNING"] = "1"
    import fedjax_lite as fl
    fl.configure_cpu(num_devices=4)
    import jax, numpy as np, optax
    r = np.random.default_rng(0)
    sizes = (3, 9, 5, 12, 4, 7, 6, 11, 2, 8)
    clients = [{"x": r.standard_normal((n, 5)).astype(np.float32),
                "y": r.integers(0, 4, n).astype(np.int32)} for n in sizes]
    ds = fl.FederatedDataset.from_clients(clients)
    out = {"package": os.path.dirname(fl.__file__)}
    for name, model, buckets, bs, so in [
        ("mlp", fl.models.mlp(5, 4, hidden=(8,)), 3, None, optax.adam(0.01)),
        ("logreg", fl.models.logistic_regression(5, 4), 1, 2,
         optax.sgd(1.0))]:
      eng = fl.Engine(fl.fed_avg(model, optax.sgd(0.1), so),
                      fl.RoundConfig(6, fl.LocalWork(batch_size=3),
                                     block_size=bs))
      data = eng.put_data(ds, buckets=buckets)
      st = eng.init(model.init(jax.random.PRNGKey(1)), seed=2)
      for _ in range(3):
        st, m = eng.round(st, data)
      out[name] = [np.asarray(x).tolist() for x in
                   jax.tree.leaves(st.server.params)]
      out[name + "_loss"] = float(m["loss"])
    print("RESULT", json.dumps(out))
""")


def _run(pythonpath, cwd):
  env = dict(os.environ, PYTHONPATH=pythonpath)
  proc = subprocess.run(
    [sys.executable, "-c", _SCRIPT],
    capture_output=True,
    text=True,
    env=env,
    cwd=cwd,
    check=False,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT ") :])


def test_fedavg_bit_for_bit_with_previous_release(tmp_path):
  """3 FedAvg/FedAdam rounds (4 devices, 1 and 3 size buckets) give exactly
  the params of the engine before pluggable aggregators (commit BASELINE,
  extracted with git archive and run in its own process)."""
  if (
    shutil.which("git") is None
    or subprocess.run(
      ["git", "cat-file", "-e", BASELINE + "^{commit}"],
      cwd=ROOT,
      capture_output=True,
      check=False,
    ).returncode
    != 0
  ):
    pytest.skip(f"git history with commit {BASELINE} not available")
  archive = subprocess.run(
    ["git", "archive", BASELINE, "fedjax_lite"],
    cwd=ROOT,
    capture_output=True,
    check=True,
  ).stdout
  subprocess.run(["tar", "-x", "-C", str(tmp_path)], input=archive, check=True)
  old = _run(str(tmp_path), str(tmp_path))
  new = _run(ROOT, ROOT)
  assert old["package"].startswith(str(tmp_path))
  assert new["package"] == os.path.join(ROOT, "fedjax_lite")
  for name in ("mlp", "logreg"):
    for a, b in zip(new[name], old[name]):
      np.testing.assert_array_equal(
        np.asarray(a, np.float32), np.asarray(b, np.float32)
      )
    assert new[name + "_loss"] == old[name + "_loss"]
