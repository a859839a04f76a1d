"""Worked example: writing a new federated algorithm by composing the pieces.

``fed_avg_clipped`` is FedAvg whose clients clip their model update
``Delta_k = w_t - w^k`` to an L2 norm ``C`` before it is averaged (the clipping
step of DP-FedAvg, McMahan et al. 2018, arXiv:1710.06963, without the noise).
Only the client update differs from FedAvg, so the new algorithm wraps
``fed_avg``'s client update and replaces nothing else: 20 lines. A second
variant changes the *local objective* instead (a prox term toward the server
weights that only acts on the kernel, not the bias) to show the other
extension point. Both run against FedAvg for a few rounds on FedProx
Synthetic(1, 1).

Run::

  python experiments/custom_algorithm_example.py           # 30 rounds
  python experiments/custom_algorithm_example.py --smoke   # seconds

See the module docstring of fedjax_lite/algorithms/__init__.py for the guide;
tests/test_custom_algorithm_example.py runs this file and checks the clipping
against a numpy reference.
"""

from __future__ import annotations

import argparse

import fedjax_lite as fl  # first: applies the CPU settings

import jax
import jax.numpy as jnp
import optax


# ---------------------------------------------------------- 1. a new client
def fed_avg_clipped(
  model, client_optimizer, server_optimizer=None, *, clip_norm: float
):
  """FedAvg with ``Delta_k <- Delta_k * min(1, C / ||Delta_k||)``."""
  base = fl.fed_avg(model, client_optimizer, server_optimizer)

  def client_update(server_params, client_state, data, rng):
    out = base.client_update(server_params, client_state, data, rng)
    norm = optax.tree.norm(out.update)
    scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norm, 1e-12))
    clipped = (norm > clip_norm).astype(jnp.float32)
    return out._replace(
      update=jax.tree.map(lambda u: u * scale, out.update),
      metrics=dict(out.metrics, clipped=(clipped, jnp.ones(()))),
    )

  return base._replace(client_update=client_update, name="fed_avg_clipped")


# ----------------------------------------------- 2. a new local objective
def fed_avg_kernel_prox(model, client_optimizer, *, mu: float):
  """FedAvg whose clients minimise ``F_k(w) + mu/2 ||W - W_t||^2`` (kernels
  only): a local objective is ``(params, server_params, batch, mask, rng) ->
  (loss, stats)``."""

  def objective(params, server_params, batch, mask, rng):
    loss, stats = model.batch_loss(params, batch, mask, rng)
    gap = sum(
      jnp.sum(jnp.square(p["kernel"] - s["kernel"]))
      for p, s in zip(params.values(), server_params.values())
    )
    return loss + 0.5 * mu * gap, stats

  return fl.fed_avg(
    model,
    client_optimizer,
    local_objective=objective,
    name="fed_avg_kernel_prox",
  )


def main(argv=None) -> dict:
  """Runs the three algorithms; returns ``{name: {"loss", "accuracy", ...}}``."""
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--rounds", type=int, default=30)
  ap.add_argument("--clip-norm", type=float, default=0.5)
  ap.add_argument("--smoke", action="store_true", help="3 rounds")
  args = ap.parse_args(argv)
  if args.smoke:
    args.rounds = 3
  train, test = fl.datasets.fedprox_synthetic(1.0, 1.0)
  model = fl.models.logistic_regression(60, 10)
  params = model.init(jax.random.PRNGKey(0))
  config = fl.RoundConfig(10, fl.LocalWork(batch_size=10, num_epochs=5))
  algorithms = {
    "fed_avg": fl.fed_avg(model, optax.sgd(0.01)),
    "fed_avg_clipped": fed_avg_clipped(
      model, optax.sgd(0.01), clip_norm=args.clip_norm
    ),
    "fed_avg_kernel_prox": fed_avg_kernel_prox(model, optax.sgd(0.01), mu=1.0),
  }
  results = {}
  for name, algorithm in algorithms.items():
    engine = fl.Engine(algorithm, config)
    data = engine.put_data(train, buckets=1)
    # engine.run: all rounds in one compiled lax.scan; same seed = same
    # clients every round for every algorithm.
    state, history = engine.run(engine.init(params, seed=0), data, args.rounds)
    train_ev = fl.evaluate(model, state.server.params, train)
    test_ev = fl.evaluate(model, state.server.params, test)
    extra = (
      f", share of clipped updates {float(history['clipped'].mean()):.2f}"
      if "clipped" in history
      else ""
    )
    print(
      f"{name:20s} after {args.rounds} rounds: training loss "
      f"{train_ev.mean['loss']:.4f}, test accuracy "
      f"{test_ev.mean['accuracy']:.3f}{extra}"
    )
    results[name] = {
      "loss": float(train_ev.mean["loss"]),
      "accuracy": float(test_ev.mean["accuracy"]),
      "clipped": float(history["clipped"].mean())
      if "clipped" in history
      else None,
    }
  return results


if __name__ == "__main__":
  main()
