"""The worked example of writing an algorithm runs, and clips as it says."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fedjax_lite as fl

EXAMPLE = (
  Path(__file__).resolve().parent.parent
  / "experiments"
  / "custom_algorithm_example.py"
)


def _load():
  spec = importlib.util.spec_from_file_location(
    "custom_algorithm_example", EXAMPLE
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _one_client(model, n=23, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 60)).astype(np.float32)
  y = rng.integers(0, 10, size=n).astype(np.int32)
  ds = fl.FederatedDataset.from_clients([{"x": x, "y": y}])
  engine = fl.Engine(
    fl.fed_avg(model, optax.sgd(0.1)),
    fl.RoundConfig(1, fl.LocalWork(batch_size=5)),
  )
  data = engine.put_data(ds, buckets=1)
  return fl.data.batching.gather_client(
    data,
    jnp.int32(0),
    jax.random.PRNGKey(1),
    engine.config.local_work,
    data.bucket_sizes[0],
  )


def test_clipped_update_matches_numpy_reference():
  example = _load()
  model = fl.models.logistic_regression(60, 10)
  params = model.init(jax.random.PRNGKey(0))
  cdata = _one_client(model)
  rng = jax.random.PRNGKey(2)
  plain = fl.fed_avg(model, optax.sgd(0.1)).client_update(
    params, None, cdata, rng
  )
  u = np.concatenate(
    [np.ravel(np.asarray(a, np.float64)) for a in jax.tree.leaves(plain.update)]
  )
  norm = np.linalg.norm(u)
  for clip_norm in (0.5 * norm, 2.0 * norm):
    alg = example.fed_avg_clipped(model, optax.sgd(0.1), clip_norm=clip_norm)
    out = jax.jit(alg.client_update)(params, None, cdata, rng)
    got = np.concatenate(
      [np.ravel(np.asarray(a, np.float64)) for a in jax.tree.leaves(out.update)]
    )
    np.testing.assert_allclose(
      got, u * min(1.0, clip_norm / norm), rtol=1e-5, atol=1e-7
    )
    assert float(out.metrics["clipped"][0]) == float(norm > clip_norm)


def test_example_main_runs_in_smoke_mode(capsys):
  results = _load().main(["--smoke"])
  assert set(results) == {"fed_avg", "fed_avg_clipped", "fed_avg_kernel_prox"}
  for name, r in results.items():
    assert np.isfinite(r["loss"]) and 0.0 <= r["accuracy"] <= 1.0, name
  assert 0.0 <= results["fed_avg_clipped"]["clipped"] <= 1.0
  assert "fed_avg_clipped" in capsys.readouterr().out
