r"""Vectorized sweeps: several seeds and hyperparameter settings as ONE computation.

Every setting ``i`` (a seed and a point of the hyperparameter grid) has its own
:class:`EngineState` (initial params from ``k_init(seed_i)``, sampling and
client rng from ``k_engine(seed_i)``). The states are stacked on a leading axis
``[S, ...]`` and a round runs for all of them at once::

  def one(h, state, data):                 # h: {name: scalar} of one setting
    alg = experiment.make_algorithm(h)     # e.g. fed_avg(model, sgd(h["client_lr"]))
    return Engine(alg, round_config, mesh).round_body(state, data)

  step = jax.jit(jax.vmap(one, in_axes=(0, 0, None)))   # traced once

so the S settings share one compiled program and the data is read once; on
hardware a single run under-uses (small models, short local GEMMs) S settings
cost much less than S runs. Rounds between evaluations run in one device
loop (``fori_loop``, one compiled program for every chunk length). Hyperparameters must be declared by the experiment
(``Experiment.hparams`` + ``algorithm_fn``); anything that changes shapes
(clients per round, batch size, model) cannot be vmapped: run it separately
and overlay with ``compare``.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lite.engine.round import Engine, EngineState
from fedjax_lite.experiment import checkpoint as ckpt
from fedjax_lite.experiment import config as cfglib
from fedjax_lite.experiment import plots
from fedjax_lite.experiment.core import Experiment
from fedjax_lite.experiment.records import TIMING_KEYS, MetricsLog
from fedjax_lite.experiment.runner import (Evaluator, _train_row, describe,
                                           engine_for, environment,
                                           init_state,
                                           new_run_dir, run_name)


@dataclasses.dataclass
class SweepResult:
  """What :func:`sweep` returns.

  Attributes:
    run_dir: the sweep folder (None for in-memory sweeps).
    settings: per setting ``{"seed": int, <hparam>: float, ...}``.
    state: the final EngineStates stacked on a leading ``[S]`` axis.
    rows: metric rows of all settings (column ``setting`` = index).
    num_traces: how often the vmapped round was traced (1 per scan length).
  """
  run_dir: Path | None
  settings: list
  state: EngineState
  rows: list
  num_traces: int = 0

  def setting_rows(self, i: int) -> list:
    return [r for r in self.rows if r["setting"] == i]

  def groups(self) -> dict:
    """``{hyperparameter label: [rows of each seed]}`` (for band plots)."""
    out: dict = {}
    for i, s in enumerate(self.settings):
      out.setdefault(_label(s), []).append(self.setting_rows(i))
    return out

  def state_of(self, i: int) -> EngineState:
    return jax.tree.map(lambda a: a[i], self.state)

  def table(self, keys: Sequence[str] = ("train_loss", "train_accuracy",
                                         "test_loss", "test_accuracy",
                                         "test_accuracy_p10")) -> str:
    """Markdown table: final metrics per grid point, mean +- std over seeds."""
    return final_table(self.groups(), keys)


def _label(setting: Mapping[str, Any]) -> str:
  hp = {k: v for k, v in setting.items() if k != "seed"}
  return ", ".join(f"{k}={v:g}" for k, v in hp.items()) or "seeds"


def final_table(groups: Mapping[str, Sequence[Sequence[dict]]],
                keys: Sequence[str]) -> str:
  """Markdown table of each group's final metrics (mean +- std over runs)."""
  finals = {}
  for label, runs in groups.items():
    per_run = []
    for rows in runs:
      last: dict = {}
      for r in rows:
        last.update({k: v for k, v in r.items() if k not in TIMING_KEYS})
      per_run.append(last)
    finals[label] = per_run
  keys = [k for k in keys if any(k in f for runs in finals.values()
                                 for f in runs)]
  head = "| run | n | rounds | " + " | ".join(keys) + " |"
  lines = [head, "|" + "---|" * (3 + len(keys))]
  for label, runs in finals.items():
    cells = [label, str(len(runs)), str(max(f.get("round", 0) for f in runs))]
    for k in keys:
      vals = np.asarray([f[k] for f in runs if isinstance(f.get(k), (int,
                                                                     float))])
      if vals.size == 0:
        cells.append("")
      elif vals.size == 1:
        cells.append(f"{vals[0]:.4f}")
      else:
        cells.append(f"{vals.mean():.4f} ± {vals.std():.4f}")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def make_settings(seeds: Sequence[int], grid: Mapping[str, Sequence[float]]
                  ) -> list[dict]:
  """The product of ``grid`` (outer, in order) and ``seeds`` (inner)."""
  names = list(grid)
  out = []
  for values in itertools.product(*(grid[n] for n in names)):
    for s in seeds:
      out.append({"seed": int(s), **{n: float(v) for n, v in
                                     zip(names, values)}})
  return out


def _check_grid(exp: Experiment, grid: Mapping[str, Sequence[float]]) -> None:
  for name, values in grid.items():
    if name not in exp.hparams:
      raise cfglib.ConfigError(
          f"cannot sweep {name!r}: the experiment declares the sweepable "
          f"hyperparameters {sorted(exp.hparams) or '(none)'} in "
          "Experiment.hparams (with algorithm_fn). Declare it there, or run "
          f"the values separately with `run --set {name}=...` and overlay "
          "them with `compare`.")
    if len(values) == 0:
      raise cfglib.ConfigError(f"--grid {name}= has no values.")


class VmappedRounds:
  """Runs the rounds of S settings as one vmapped, jitted computation.

  Args:
    exp: the experiment (its data, model, round config and mesh are shared).
    hparam_names: names of ``exp.hparams`` that vary across settings.
  """

  def __init__(self, exp: Experiment, hparam_names: Sequence[str] = (),
               max_rounds_per_call: int = 1):
    self.exp = exp
    self.names = tuple(hparam_names)
    self.max_rounds = int(max_rounds_per_call)
    self.num_traces = 0
    self.mesh = exp.mesh
    self._run = jax.jit(self._run_body)

  def _one_round(self, h, state, data):
    alg = self.exp.make_algorithm(h)
    return Engine(alg, self.exp.round_config, self.mesh).round_body(
        state, data)

  def _run_body(self, h, states, data, num_rounds):
    # A dynamic trip count (fori_loop) and a [max_rounds] metrics buffer: one
    # compiled program serves every chunk length up to max_rounds.
    self.num_traces += 1

    def one(h1, s1):
      shape = jax.eval_shape(lambda s: self._one_round(h1, s, data)[1], s1)
      buf = jax.tree.map(lambda d: jnp.zeros((self.max_rounds,) + d.shape,
                                             d.dtype), shape)

      def body(i, carry):
        s, buf = carry
        s, m = self._one_round(h1, s, data)
        buf = jax.tree.map(lambda b, v: b.at[i].set(v), buf, m)
        return s, buf
      return jax.lax.fori_loop(0, num_rounds, body, (s1, buf))
    return jax.vmap(one)(h, states)

  def init(self, settings: Sequence[Mapping[str, float]]) -> tuple:
    """Stacked initial states and hyperparameters for ``settings``.

    Returns:
      ``(h, states)``: ``h[name]`` float32 ``[S]``, states with leading ``[S]``.
    """
    states = []
    for s in settings:
      hp = {n: s[n] for n in self.names}
      engine = Engine(self.exp.make_algorithm(hp), self.exp.round_config,
                      self.mesh)
      states.append(jax.device_get(init_state(self.exp, engine, s["seed"])))
    struct = [jax.tree.structure(x) for x in states]
    if any(t != struct[0] for t in struct):
      raise ValueError("settings produce differently structured states; "
                       "hyperparameters must not change the state's shape.")
    stacked = jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *states)
    h = {n: jnp.asarray([s[n] for s in settings], jnp.float32)
         for n in self.names}
    return h, stacked

  def run(self, h, states, data, num_rounds: int):
    """``num_rounds`` (<= max_rounds_per_call) rounds of every setting.

    Returns:
      ``(states, metrics)``: metrics stacked ``[S, max_rounds_per_call]``, of
      which the first ``num_rounds`` entries are filled.
    """
    if not 1 <= num_rounds <= self.max_rounds:
      raise ValueError(f"num_rounds must be in [1, {self.max_rounds}], got "
                       f"{num_rounds}.")
    return self._run(h, states, data, jnp.int32(num_rounds))


def sweep(exp: Experiment, seeds: Sequence[int] | int = 1,
          grid: Mapping[str, Sequence[float]] | None = None,
          run_dir: str | os.PathLike | None = None, *,
          progress: bool = True, desc: str | None = None) -> SweepResult:
  """Runs every (grid point, seed) setting of ``exp`` in one vmapped computation.

  Args:
    exp: the experiment; ``exp.seed`` is the first seed when ``seeds`` is an
      int.
    seeds: a count (``exp.seed + 0 .. n-1``) or explicit seeds.
    grid: ``{hparam name: values}`` over names declared in ``exp.hparams``.
    run_dir: folder for sweep.json, metrics, curves.png, summary.md (None:
      in memory only).
    progress: show a progress bar.
    desc: progress bar label.

  Returns:
    A :class:`SweepResult`.
  """
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  grid = dict(grid or {})
  _check_grid(exp, grid)
  if isinstance(seeds, (int, np.integer)):
    if seeds < 1:
      raise ValueError(f"seeds must be >= 1, got {seeds}.")
    seeds = [exp.seed + i for i in range(int(seeds))]
  seeds = [int(s) for s in seeds]
  if not seeds or len(set(seeds)) != len(seeds):
    raise ValueError(f"seeds must be distinct and non-empty, got {seeds}.")
  settings = make_settings(seeds, grid)
  ends = sorted({t for t in range(1, exp.num_rounds + 1)
                 if exp.eval_every and t % exp.eval_every == 0}
                | {exp.num_rounds})
  chunk = max(b - a for a, b in zip([0] + ends[:-1], ends))
  runner = VmappedRounds(exp, tuple(grid), chunk)
  h, states = runner.init(settings)
  engine = engine_for(exp)
  data = engine.put_data(exp.train)
  evaluator = Evaluator(exp, engine)
  run_dir = None if run_dir is None else Path(run_dir)
  log = MetricsLog(run_dir) if run_dir is not None else None
  rows = log.rows if log else []
  bar = tqdm(total=exp.num_rounds, unit="round", disable=not progress,
             desc=desc or f"sweep x{len(settings)}", dynamic_ncols=True)
  t0 = time.perf_counter()
  done = 0
  try:
    for end in ends:
      tick = time.perf_counter()
      states, metrics = runner.run(h, states, data, end - done)
      metrics = jax.device_get(metrics)
      dt = time.perf_counter() - tick
      params = exp.algorithm.get_params(states.server)
      evals = [evaluator(jax.tree.map(lambda a, i=i: a[i], params))
               for i in range(len(settings))]
      wall = time.perf_counter() - t0
      for k in range(end - done):
        t = done + k + 1
        for i, s in enumerate(settings):
          m = jax.tree.map(lambda a, i=i, k=k: a[i, k], metrics)
          row = {"setting": i, **s, "round": t, **_train_row(m),
                 "rounds_per_s": (end - done) / max(dt, 1e-9)}
          if t == end:
            row.update(evals[i])
            row["wall_time"] = wall
          (log.append if log else rows.append)(row)
      bar.update(end - done)
      last = [r for r in rows[-len(settings):]]
      bar.set_postfix({
          "loss": f"{np.mean([r.get('train_loss', np.nan) for r in last]):.4f}",
          "test_acc": f"{np.mean([r.get('test_accuracy', np.nan) for r in last]):.3f}",
          "rounds/s": f"{(end - done) / max(dt, 1e-9):.1f}"})
      done = end
  finally:
    bar.close()
    if log:
      log.close()
  res = SweepResult(run_dir, settings, states, list(rows), runner.num_traces)
  if run_dir is not None:
    title = f"{exp.name or run_dir.name}: {exp.algorithm.name}, " \
            f"{len(seeds)} seed(s) per setting (mean ± std)"
    plots.plot_runs(res.groups(), run_dir / "curves.png", title)
    ckpt.atomic_write_text(run_dir / "summary.md", res.table() + "\n")
  return res


def parse_seeds(text: str, base: int) -> list[int]:
  """``"8"`` -> ``base .. base+7``; ``"0,3,5"`` -> ``[0, 3, 5]``."""
  try:
    if "," in text:
      return [int(x) for x in text.split(",") if x.strip()]
    n = int(text)
  except ValueError:
    raise cfglib.ConfigError(f"--seeds expects a count (e.g. 8) or a list "
                             f"(e.g. 0,1,2), got {text!r}.") from None
  if n < 1:
    raise cfglib.ConfigError(f"--seeds must be >= 1, got {n}.")
  return [base + i for i in range(n)]


def parse_grid(items: Sequence[str]) -> dict[str, list[float]]:
  """``["client_lr=0.01,0.1"]`` -> ``{"client_lr": [0.01, 0.1]}``."""
  grid: dict = {}
  for item in items:
    name, sep, values = item.partition("=")
    name = name.strip()
    if not sep or not name:
      raise cfglib.ConfigError(f"--grid {item!r} is not NAME=V1,V2,... "
                               "(e.g. --grid client_lr=0.01,0.03,0.1).")
    if name in grid:
      raise cfglib.ConfigError(f"--grid names {name!r} twice.")
    try:
      grid[name] = [float(v) for v in values.split(",") if v.strip()]
    except ValueError:
      raise cfglib.ConfigError(f"--grid {name}: expected comma-separated "
                               f"numbers, got {values!r}.") from None
    if not grid[name]:
      raise cfglib.ConfigError(f"--grid {name}= has no values.")
  return grid


def sweep_file(spec: str, overrides: Sequence[str] = (), *,
               seeds: str | int = 1, grid: Sequence[str] | Mapping = (),
               out: str | os.PathLike = "runs",
               progress: bool = True) -> SweepResult:
  """``python -m fedjax_lite sweep``: a vmapped sweep of an experiment file."""
  ef = cfglib.load_experiment_file(spec)
  cfg = cfglib.apply_overrides(ef.get_config(), overrides)
  exp = ef.build(cfg)
  seed_list = parse_seeds(str(seeds), exp.seed)
  grid = dict(grid) if isinstance(grid, Mapping) else parse_grid(grid)
  _check_grid(exp, grid)
  run_dir = new_run_dir(out, run_name(ef, exp) + "-sweep")
  settings = make_settings(seed_list, grid)
  record = {"experiment": {"spec": ef.spec, "file": str(ef.path),
                           "arg": ef.arg, "sha256": ef.sha256()},
            "config": cfglib.config_to_dict(cfg),
            "overrides": cfglib.parse_overrides(overrides),
            "seeds": seed_list, "grid": grid, "settings": settings,
            "experiment_summary": describe(exp),
            "environment": environment(),
            "created": datetime.datetime.now().isoformat(timespec="seconds")}
  ckpt.atomic_write_text(run_dir / "sweep.json", cfglib.dumps(record))
  return sweep(exp, seed_list, grid, run_dir, progress=progress,
               desc=run_dir.name)
