"""Evaluation of a run's global model on the test data and on training clients.

:class:`Evaluator` uploads, once (replicated over the engine's mesh), the test
clients and a fixed sample of the training clients
(:meth:`~fedjax_lite.experiment.Experiment.train_eval_sample`), and returns,
for given params:

* ``test_<metric>``: the metric over the test clients' examples, and the
  per-client quantiles of the accuracy (``test_accuracy_p10 ... p90``);
* ``global_train_<metric>``: the same metric of the same params over the
  sampled training clients' examples.

Both means weight every example equally (:func:`~fedjax_lite.engine.evaluation.
evaluate`'s ``mean``: ``sum_k s_k / sum_k n_k`` with ``s_k`` client ``k``'s
sum of the metric over its ``n_k`` examples). ``global_train_loss`` is thus
the loss of the global model on training data; the round metric
``train_loss`` is something else, the mean loss of the clients' local
training steps during the round, which falls below the global model's as
the clients drift towards their own data.
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
  """Evaluates params on the experiment's test data and on its sample of
  training clients (both uploaded once).

  Attributes:
    train_clients: the population indices of the training clients evaluated
      (``exp.train_eval_sample()``; empty when ``train_eval_clients=0``).
  """

  def __init__(self, exp: Experiment, engine: Engine):
    self.exp, self.mesh = exp, engine.mesh
    replicated = NamedSharding(engine.mesh, P())
    work = LocalWork(batch_size=exp.eval_batch_size, num_epochs=1)
    self.data = None
    if exp.test is not None:
      checks.model_features(
        exp.model, exp.test.features, "test data", labels_required=False
      )
      self.data = to_device(exp.test, work, "auto", sharding=replicated)
    self.train_clients = exp.train_eval_sample()
    self.train_data = None
    if self.train_clients.size:
      every = self.train_clients.size == exp.train.num_clients
      sample = exp.train if every else exp.train.subset(self.train_clients)
      self.train_data = to_device(sample, work, "auto", sharding=replicated)

  def _evaluate(self, params, data):
    return evaluate(
      self.exp.model,
      params,
      data,
      batch_size=self.exp.eval_batch_size,
      mesh=self.mesh,
    )

  def __call__(self, params) -> dict:
    """``{test_<metric>: mean, test_<q-metric>_pXX: quantile,
    global_train_<metric>: mean}`` (only the parts with data)."""
    row = {}
    if self.data is not None:
      res = self._evaluate(params, self.data)
      row.update({f"test_{k}": float(v) for k, v in res.mean.items()})
      qname = (
        "accuracy"
        if "accuracy" in res.per_client
        else next((k for k in res.per_client if k != "loss"), None)
      )
      if qname is not None:
        for k, v in res.quantiles(qname, QUANTILES).items():
          row[f"test_{qname}_{k}"] = v
    if self.train_data is not None:
      res = self._evaluate(params, self.train_data)
      row.update({f"global_train_{k}": float(v) for k, v in res.mean.items()})
    return row
