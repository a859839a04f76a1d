r"""What the ClientApp and the ServerApp share: the model, the algorithm, the
local work and each node's data, all read from the run config.

The data is synthetic multinomial logistic data, one partition per node: a
model ``W ~ N(0, 1)^{d x C}`` drawn from ``default_rng(data-seed)`` is shared;
partition ``k`` draws ``mu_k ~ N(0, 1)^d`` and ``n`` inputs ``x ~ N(mu_k, I)``
from ``default_rng((data-seed, k))`` and labels ``y = argmax_c (x W)_c``, so
a node makes only its own examples (a deployment reads them from the
device instead: replace :func:`partition`).
"""

from __future__ import annotations

from typing import Any, Mapping

import fedjax_lite as fl  # first: applies the fast CPU settings
import jax
import numpy as np
import optax

ALGORITHMS = ("fed_avg", "fed_prox", "fed_adam")


def partition(config: Mapping[str, Any], k: int) -> dict:
  """Partition ``k``'s examples: ``x`` float32 ``[n, d]``, ``y`` int32
  ``[n]`` (see the module docstring)."""
  n, d = int(config["examples-per-client"]), int(config["num-features"])
  c, seed = int(config["num-classes"]), int(config["data-seed"])
  w = np.random.default_rng(seed).normal(size=(d, c))
  rng = np.random.default_rng((seed, k))
  x = rng.normal(size=(n, d)) + rng.normal(size=(1, d))
  return {"x": x.astype(np.float32), "y": np.argmax(x @ w, -1).astype(np.int32)}


def model(config: Mapping[str, Any]) -> fl.models.Model:
  return fl.models.logistic_regression(
    int(config["num-features"]), int(config["num-classes"])
  )


def algorithm(config: Mapping[str, Any]) -> fl.FederatedAlgorithm:
  """FedAvg, FedProx or FedAdam (``config["algorithm"]``) with client SGD."""
  name = config["algorithm"]
  m = model(config)
  client_opt = optax.sgd(float(config["client-lr"]))
  if name == "fed_avg":
    return fl.fed_avg(m, client_opt)
  if name == "fed_prox":
    return fl.algorithms.fed_prox(m, client_opt, mu=float(config["mu"]))
  if name == "fed_adam":
    return fl.algorithms.fed_adam(
      m, client_opt, float(config["server-lr"]), tau=float(config["tau"])
    )
  raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {name!r}.")


def local_work(config: Mapping[str, Any]) -> fl.LocalWork:
  return fl.LocalWork(
    batch_size=int(config["batch-size"]), num_epochs=int(config["num-epochs"])
  )


def initial_params(config: Mapping[str, Any]):
  return model(config).init(jax.random.PRNGKey(int(config["seed"])))
