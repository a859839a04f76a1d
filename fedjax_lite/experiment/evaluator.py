"""Evaluation of a run's global model on the experiment's test data.

:class:`Evaluator` uploads the test clients once (replicated over the
engine's mesh) and returns, for given params, the mean of every metric over
the test clients (``test_<metric>``) and the per-client quantiles of the
accuracy (``test_accuracy_p10 ... p90``).
"""

from __future__ import annotations

from jax.sharding import NamedSharding, PartitionSpec as P

from fedjax_lite import checks
from fedjax_lite.data.batching import LocalWork, to_device
from fedjax_lite.engine.evaluation import evaluate
from fedjax_lite.engine.round import Engine
from fedjax_lite.experiment.core import Experiment

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


class Evaluator:
  """Evaluates params on the experiment's test data (uploaded once)."""

  def __init__(self, exp: Experiment, engine: Engine):
    self.exp, self.mesh = exp, engine.mesh
    self.data = None
    if exp.test is not None:
      checks.model_features(
        exp.model, exp.test.features, "test data", labels_required=False
      )
      self.data = to_device(
        exp.test,
        LocalWork(batch_size=exp.eval_batch_size, num_epochs=1),
        "auto",
        sharding=NamedSharding(engine.mesh, P()),
      )

  def __call__(self, params) -> dict:
    """``{test_<metric>: mean, test_<q-metric>_pXX: quantile}``."""
    if self.data is None:
      return {}
    res = evaluate(
      self.exp.model,
      params,
      self.data,
      batch_size=self.exp.eval_batch_size,
      mesh=self.mesh,
    )
    row = {f"test_{k}": float(v) for k, v in res.mean.items()}
    qname = (
      "accuracy"
      if "accuracy" in res.per_client
      else next((k for k in res.per_client if k != "loss"), None)
    )
    if qname is not None:
      for k, v in res.quantiles(qname, QUANTILES).items():
        row[f"test_{qname}_{k}"] = v
    return row
