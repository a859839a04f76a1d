"""Synchronous FedAvg, over-selection and deadlines, FedBuff and FedAsync on
one simulated clock: accuracy against simulated time and client updates.

The bundled 8x8 digits (scikit-learn's copy of the UCI set), ``num_clients``
clients with a Dirichlet label skew, an MLP; every method trains the same
model from the same start under the same client behaviour model
(:class:`fedjax_lite.systems.ClientBehaviour`): heavy-tailed compute speeds
(Pareto, tail index ``tail``), log-normal download/upload delays, per-task
jitter and dropout. Methods (``m = K = clients_per_round``):

* ``fedavg``: synchronous rounds of ``m`` clients, each lasting until its
  slowest client arrives;
* ``fedavg_over``: sample ``ceil(1.3 m)``, aggregate the first ``m``;
* ``fedavg_deadline``: the same with a deadline (``deadline`` seconds);
* ``fedbuff``: FedBuff, ``K = m``, ``concurrency`` clients in flight,
  staleness weight ``1/sqrt(1+tau)``, ``tau_max``;
* ``fedasync``: FedAsync, one client per step, ``alpha``, polynomial
  staleness ``(1+tau)^-0.5``.

Each runs until ``client_updates`` updates have been aggregated (at most
``4 points`` chunks); the global model's test accuracy is recorded about
``points`` times along the way (simulated time, client updates, client tasks
started). The summary gives each method's
simulated time, updates and tasks to reach ``target`` accuracy; figures:
``accuracy_vs_time.png`` (and ``accuracy_vs_updates``, in one
``curves.png``). Run::

  python -m fedjax_lite run experiments/time_aware_digits.py          # ~3 min
  python -m fedjax_lite run experiments/time_aware_digits.py:smoke    # seconds
"""

import dataclasses
import json
import math
from pathlib import Path

import fedjax_lite as fl  # first: applies the fast CPU settings
import fedjax_lite.experiment  # noqa: F401  (fl.experiment)
import jax
import numpy as np
import optax
from fedjax_lite import systems
from fedjax_lite.engine import time_aware as ta
from fedjax_lite.systems import reference

METHODS = ("fedavg", "fedavg_over", "fedavg_deadline", "fedbuff", "fedasync")


@dataclasses.dataclass(frozen=True)
class Config:
  num_clients: int = 100
  clients_per_round: int = 10
  client_updates: int = 3000
  points: int = 60
  hidden: int = 64
  client_lr: float = 0.1
  batch_size: int = 8
  num_epochs: int = 2
  server_lr: float = 1.0
  # Client behaviour: seconds per local step ~ Pareto(scale, tail).
  step_scale: float = 0.5
  tail: float = 1.2
  jitter: float = 0.3
  dropout: float = 0.05
  over_selection: float = 1.3
  deadline: float = 20.0
  concurrency: int = 30
  tau_max: int = 20
  alpha: float = 0.6
  target: float = 0.85
  seed: int = 0


def get_config(arg: str = "") -> Config:
  """``arg``: "" (the full run) or "smoke" (seconds)."""
  return fl.experiment.preset(
    Config(),
    arg,
    smoke=dict(
      num_clients=20,
      clients_per_round=4,
      client_updates=40,
      points=2,
      concurrency=8,
      tau_max=6,
      target=0.3,
    ),
  )


def behaviour(cfg: Config) -> systems.ClientBehaviour:
  return systems.ClientBehaviour(
    seed=cfg.seed,
    step_seconds=systems.Pareto(cfg.step_scale, cfg.tail),
    jitter=cfg.jitter,
    dropout=cfg.dropout,
  )


def method_rounds(name: str, cfg: Config, model):
  """``(rounds, updates per round)`` of a method on its own engine."""
  work = fl.LocalWork(batch_size=cfg.batch_size, num_epochs=cfg.num_epochs)
  m = cfg.clients_per_round
  server = optax.sgd(cfg.server_lr)
  b = behaviour(cfg)
  if name == "fedasync":
    engine = fl.Engine(
      fl.fed_avg(model, optax.sgd(cfg.client_lr)), fl.RoundConfig(1, work)
    )
    rounds = ta.fed_async(
      engine,
      b,
      concurrency=cfg.concurrency,
      tau_max=cfg.tau_max,
      alpha=cfg.alpha,
      staleness=reference.polynomial(0.5),
    )
    return rounds, 1
  engine = fl.Engine(
    fl.fed_avg(model, optax.sgd(cfg.client_lr), server), fl.RoundConfig(m, work)
  )
  if name == "fedbuff":
    rounds = ta.fedbuff(
      engine, b, concurrency=cfg.concurrency, tau_max=cfg.tau_max
    )
    return rounds, m
  over = 1.0 if name == "fedavg" else cfg.over_selection
  deadline = cfg.deadline if name == "fedavg_deadline" else None
  return ta.DeadlineRounds(engine, b, over_selection=over, deadline=deadline), m


def train_method(name, cfg, model, params, train, test):
  """Rows ``{method, clock, client_updates, client_tasks, test_accuracy}``."""
  rounds, per_round = method_rounds(name, cfg, model)
  data = rounds.engine.put_data(train)
  state = rounds.init(params, seed=cfg.seed, data=data)
  # Equal chunks (one compiled scan) until client_updates updates are in
  # (deadline rounds and dropouts aggregate fewer than m per round).
  chunk = max(1, math.ceil(cfg.client_updates / per_round / cfg.points))
  rows, done = [], 0

  def record(state, metrics):
    ev = fl.evaluate(model, state.engine.server.params, test)
    rows.append(
      {
        "method": name,
        "round": done,
        "clock": float(state.clock),
        "client_updates": int(state.updates),
        "client_tasks": int(state.tasks),
        "test_accuracy": float(ev.mean["accuracy"]),
        "test_loss": float(ev.mean["loss"]),
        **metrics,
      }
    )

  record(state, {})
  for _ in range(4 * cfg.points):
    if int(state.updates) >= cfg.client_updates:
      break
    state, hist = rounds.run(state, data, chunk)
    done += chunk
    last = {
      k: float(np.asarray(v)[-1])
      for k, v in hist.items()
      if k in ("staleness_mean", "round_duration", "step_duration")
    }
    record(state, last)
  return rows


def time_to_target(rows, target):
  for r in rows:
    if r["test_accuracy"] >= target:
      return {
        "seconds": r["clock"],
        "client_updates": r["client_updates"],
        "client_tasks": r["client_tasks"],
      }
  return None


def plot(rows_by_method, path: Path, target: float) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for name, rows in rows_by_method.items():
    timed = [r for r in rows if r["clock"] > 0]  # log axis: after the start
    axes[0].plot(
      [r["clock"] / 60 for r in timed],
      [r["test_accuracy"] for r in timed],
      marker=".",
      label=name,
    )
    axes[1].plot(
      [r["client_updates"] for r in rows],
      [r["test_accuracy"] for r in rows],
      marker=".",
      label=name,
    )
  axes[0].set_xscale("log")
  for ax, xlabel in zip(
    axes, ("simulated time (minutes, log scale)", "client updates aggregated")
  ):
    ax.axhline(target, color="gray", lw=0.8, ls=":")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.suptitle("Digits, heavy-tailed client speeds: same clients, same clock")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run(cfg: Config, run_dir: Path | None = None) -> dict:
  train, test = fl.datasets.digits(
    cfg.num_clients, "dirichlet", alpha=0.5, seed=cfg.seed
  )
  model = fl.models.mlp(64, 10, (cfg.hidden,))
  params = model.init(jax.random.PRNGKey(cfg.seed))
  rows_by_method = {
    name: train_method(name, cfg, model, params, train, test)
    for name in METHODS
  }
  log = fl.experiment.records.MetricsLog(run_dir) if run_dir else None
  if log:
    for rows in rows_by_method.values():
      for r in rows:
        log.append(r)
    log.close()
  table = {
    name: {
      "to_target": time_to_target(rows, cfg.target),
      "final_accuracy": rows[-1]["test_accuracy"],
      "final_seconds": rows[-1]["clock"],
      "client_updates": rows[-1]["client_updates"],
      "client_tasks": rows[-1]["client_tasks"],
    }
    for name, rows in rows_by_method.items()
  }
  summary = {"target": cfg.target, "methods": table}
  summary["config"] = dataclasses.asdict(cfg)
  if run_dir:
    plot(rows_by_method, run_dir / "curves.png", cfg.target)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
  return summary


def main(argv=None) -> dict:
  return fl.experiment.script_main(__file__, get_config, run, argv)


if __name__ == "__main__":
  main()
