r"""Vectorized sweeps: several seeds and hyperparameter settings as ONE computation.

Every setting (a seed and a point of the hyperparameter grid) has its own
server state (initial params from ``k_init(seed)``) and, through its seed, its
own sampling and client rng (``k_engine(seed)``). All settings advance together
in one jitted program built from the engine's pure rounds, in one of two ways:

* pooled (default with several seeds): every seed is a run of ONE engine
  round (:meth:`Engine.rounds_body`). Each run samples its own clients; the
  sampled clients of all runs share the size-bucket blocks, and aggregation
  and the server update stay per run. Blocks are full however differently
  the runs' samples fall into the buckets. A seed's grid points are one
  algorithm (:func:`grid_algorithm`): each client trains every point's
  model on its data gathered once.
* lockstep (default with one seed): ``jax.vmap`` over the settings of
  ``Engine.round_body``. Grid points of one seed share its client sample and
  gathered data (only the parameters carry the grid axis), which makes a
  grid cheaper than independent runs; but a vmapped bucket loop runs as many
  blocks as the busiest setting needs, so with several seeds on data with
  uneven client sizes it wastes most of its work.

Rounds between evaluations run in one device loop (``fori_loop``; one
compiled program for every chunk length). Both ways are traced once and
compute what separate runs compute (tests).

Hyperparameters must be declared by the experiment (``Experiment.hparams`` +
``algorithm_fn``); anything that changes shapes (clients per round, batch size,
model) cannot be vmapped: run it separately and overlay with ``compare``.

Cost: each seed adds its own clients' local training, so S seeds cost about S
times the client compute of one run on hardware that one run already keeps
busy (a CPU, where small per-client GEMMs are compute bound); the gain is
one compile, one data upload, full blocks and no per-run overheads. On
accelerators, where a small run leaves the device mostly idle, settings are
nearly free. See experiments/results/sweeps.md for measurements.
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

from fedjax_lite.algorithms.base import (Aggregate, ClientOutput,
                                         FederatedAlgorithm)
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


_GRID_WEIGHT = "_grid_mean_weight"


def _swap_client_axes(clients):
  # [seeds, grid, clients, ...] <-> [seeds, clients, grid, ...]
  return jax.tree.map(lambda a: jnp.swapaxes(a, 1, 2), clients)


def grid_algorithm(make_algorithm, h: Mapping[str, jax.Array],
                   num_points: int) -> FederatedAlgorithm:
  """``num_points`` grid points of one run as ONE federated algorithm.

  Server and client states carry a leading grid axis. Every client trains
  all grid points' models (``jax.vmap`` over the points) on its data
  gathered once, so the points share sampling and gathering, and matmuls of
  the points share their data operand. Each point is aggregated with its own
  weights: a client reports ``weight_g * update_g`` and ``weight_g`` with an
  engine weight of 1, and the server divides the sums.

  Args:
    make_algorithm: ``{name: scalar} -> FederatedAlgorithm``.
    h: ``{name: [num_points] values}`` (empty: identical points).
    num_points: the number of grid points.
  """
  h = dict(h)

  def over_points(fn, *args, in_axes=0):
    return jax.vmap(fn, in_axes=(0,) + (in_axes,) * len(args),
                    axis_size=num_points)(h, *args)

  def each(method):  # (hg, *args) -> make_algorithm(hg).<method>(*args)
    return lambda hg, *a: getattr(make_algorithm(hg), method)(*a)

  def broadcast(server):
    return over_points(each("broadcast"), server)

  def client_update(bcast, cstate, data, rng):
    def one(hg, b, cs):
      out = make_algorithm(hg).client_update(b, cs, data, rng)
      w = jnp.asarray(out.weight, jnp.float32)
      wu = jax.tree.map(lambda u: u * w.astype(u.dtype), out.update)
      metrics = dict(out.metrics)
      metrics[_GRID_WEIGHT] = (w, jnp.ones((), jnp.float32))
      return wu, w, out.state, metrics
    wu, w, state, metrics = jax.vmap(
        one, in_axes=(0, 0, None if cstate is None else 0),
        axis_size=num_points)(h, bcast, cstate)
    return ClientOutput(update={"wu": wu, "w": w},
                        weight=jnp.ones((), jnp.float32), state=state,
                        metrics=metrics)

  def server_update(server, agg):
    # agg.mean = {"wu": mean_k w_kg u_kg, "w": mean_k w_kg} over clients.
    def one(hg, s, wu, w, metrics):
      safe = jnp.where(w > 0, w, 1.0)
      mean = jax.tree.map(lambda a: jnp.where(w > 0, a / safe.astype(a.dtype),
                                              jnp.zeros((), a.dtype)), wu)
      metrics = {k: v for k, v in metrics.items() if k != _GRID_WEIGHT}
      g = Aggregate(mean=mean, total_weight=w * agg.total_weight,
                    num_clients=agg.num_clients, metrics=metrics)
      return make_algorithm(hg).server_update(s, g)
    return jax.vmap(one, axis_size=num_points)(
        h, server, agg.mean["wu"], agg.mean["w"], agg.metrics)

  probe = make_algorithm({n: v[0] for n, v in h.items()})
  client_init = None if probe.client_init is None else (
      lambda p: over_points(each("client_init"), p, in_axes=None))
  return FederatedAlgorithm(
      server_init=lambda p: over_points(each("server_init"), p, in_axes=None),
      client_update=client_update, server_update=server_update,
      broadcast=broadcast, client_init=client_init,
      get_params=lambda s: over_points(each("get_params"), s),
      name=f"{probe.name} x{num_points}")


class VmappedRounds:
  """Runs the rounds of every (seed, grid point) setting as ONE computation.

  Pooled (see the module docstring): the seeds are runs of one engine round
  whose clients share the blocks, and every client trains all grid points.
  Lockstep: two nested ``jax.vmap``,
  the outer over seeds (each seed has its own rng, hence its own client
  sample and data order), the inner over grid points, which share their
  seed's rng, client sample and gathered data.

  Layout: ``server``/``clients`` leaves ``[num_seeds, num_grid, ...]``,
  ``rng`` ``[num_seeds, ...]``, ``round`` a scalar. :meth:`flat` turns a
  ``[num_seeds, num_grid, ...]`` tree into the settings order of
  :func:`make_settings` (grid outer, seeds inner).

  Args:
    exp: the experiment (data, model, round config and mesh are shared).
    seeds: the seeds.
    grid: ``{hparam name: values}`` (names declared in ``exp.hparams``).
    max_rounds_per_call: the most rounds one :meth:`run` call may run.
    block_size: clients per device per block. Default: the experiment's
      ``round_config.block_size`` if set; else, pooled, the engine's
      automatic choice for all runs' clients together, and lockstep, the
      automatic choice for one run divided by the number of settings
      (vmapping S settings multiplies a block's working memory by S).
    pooled: pool the seeds into one round (default: with two or more
      seeds) or vmap the settings' separate rounds (default with one seed).
      Measured on a 2-core CPU on Synthetic(1, 1) (experiments/results/
      sweeps.md): 8 seeds pooled 5.6-6.7x one run, lockstep 9.8-11.2x,
      sequential runs 8.9-10.9x; 2 seeds x 4 learning rates pooled 5.0-5.1x,
      lockstep 6.8-6.9x; 8 learning rates of one seed (lockstep) 4.2-4.9x.
  """

  def __init__(self, exp: Experiment, seeds: Sequence[int],
               grid: Mapping[str, Sequence[float]] | None = None,
               max_rounds_per_call: int = 1, block_size: int | None = None,
               pooled: bool | None = None):
    grid = dict(grid or {})
    _check_grid(exp, grid)
    self.exp = exp
    self.seeds = [int(s) for s in seeds]
    self.names = tuple(grid)
    self.points = [dict(zip(self.names, v)) for v in
                   itertools.product(*(grid[n] for n in self.names))]
    self.settings = make_settings(self.seeds, grid)
    self.max_rounds = int(max_rounds_per_call)
    self.num_traces = 0
    # Clients per device per block for each size bucket, as last traced.
    self.block_sizes: dict[int, int] = {}
    self.mesh = exp.mesh
    self.h = {n: jnp.asarray([p[n] for p in self.points], jnp.float32)
              for n in self.names}
    self.round_config = exp.round_config
    self.pooled = len(self.seeds) > 1 if pooled is None else bool(pooled)
    if block_size is not None:
      self.round_config = dataclasses.replace(exp.round_config,
                                              block_size=int(block_size))
    self._run = jax.jit(self._run_body)

  def _resolve_block_size(self, state: EngineState, data) -> None:
    """Sets the sweep's block size from one run's automatic choice."""
    if self.round_config.block_size is not None or self.pooled:
      return  # pooled: the engine sizes blocks for all runs' clients
    probe = Engine(self.exp.make_algorithm(self.points[0]),
                   self.round_config, self.mesh)
    first = self.engine_states(state)
    first = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype),
                         first)
    jax.eval_shape(probe.round_body, first, data)
    single = max(probe.block_sizes.values())
    self.round_config = dataclasses.replace(
        self.round_config,
        block_size=max(1, single // len(self.settings)))

  def _one_round(self, h, state, data):
    engine = Engine(self.exp.make_algorithm(h), self.round_config, self.mesh)
    out = engine.round_body(state, data)
    self.block_sizes = dict(engine.block_sizes)
    return out

  def _rounds_of_all(self, h, server, clients, rnd, rng, data):
    if self.pooled:
      return self._pooled_rounds(h, server, clients, rnd, rng, data)

    def inner(h1, server1, clients1, rng1):
      s, m = self._one_round(h1, EngineState(server1, clients1, rnd, rng1),
                             data)
      return (s.server, s.clients), m
    grid_axis = jax.vmap(inner, in_axes=(0, 0, 0, None))
    return jax.vmap(grid_axis, in_axes=(None, 0, 0, 0))(h, server, clients,
                                                         rng)

  def _pooled_rounds(self, h, server, clients, rnd, rng, data):
    # Every seed is a run of ONE pooled engine round; its grid points are
    # one algorithm whose clients train all grid points' models on the data
    # gathered once (grid_algorithm).
    ns, ng = len(self.seeds), len(self.points)
    states = EngineState(server, _swap_client_axes(clients),
                         jnp.full((ns,), rnd, jnp.int32), rng)
    engine = Engine(grid_algorithm(self.exp.make_algorithm, h, ng),
                    self.round_config, self.mesh)
    new, m = engine.rounds_body(states, data)
    self.block_sizes = dict(engine.block_sizes)
    m = dict(m)
    m["num_clients"] = jnp.repeat(m["num_clients"][:, None], ng, axis=1)
    m["total_weight"] = m.pop(_GRID_WEIGHT) * m["num_clients"]
    return (new.server, _swap_client_axes(new.clients)), m

  def _run_body(self, h, state, data, num_rounds):
    # A dynamic trip count (fori_loop) and a [max_rounds] metrics buffer: one
    # compiled program serves every chunk length up to max_rounds.
    self.num_traces += 1
    shape = jax.eval_shape(
        lambda: self._rounds_of_all(h, state.server, state.clients,
                                    state.round, state.rng, data)[1])
    buf = jax.tree.map(lambda d: jnp.zeros((self.max_rounds,) + d.shape,
                                           d.dtype), shape)

    def body(i, carry):
      server, clients, buf = carry
      (server, clients), m = self._rounds_of_all(
          h, server, clients, state.round + i, state.rng, data)
      buf = jax.tree.map(lambda b, v: b.at[i].set(v), buf, m)
      return server, clients, buf
    server, clients, buf = jax.lax.fori_loop(
        0, num_rounds, body, (state.server, state.clients, buf))
    return EngineState(server, clients, state.round + num_rounds,
                       state.rng), buf

  def init(self) -> EngineState:
    """The stacked initial state (see the class docstring for the layout)."""
    per_seed = []
    for seed in self.seeds:
      row = []
      for point in self.points:
        engine = Engine(self.exp.make_algorithm(point), self.round_config,
                        self.mesh)
        row.append(jax.device_get(init_state(self.exp, engine, seed)))
      per_seed.append(row)
    first = per_seed[0][0]
    if any(jax.tree.structure(s) != jax.tree.structure(first)
           for row in per_seed for s in row):
      raise ValueError("settings produce differently structured states; "
                       "hyperparameters must not change the state's shape.")

    def stack2(get):
      return jax.tree.map(
          lambda *xs: jnp.asarray(np.stack(xs).reshape(
              (len(self.seeds), len(self.points)) + np.shape(xs[0]))),
          *[get(s) for row in per_seed for s in row])
    return EngineState(server=stack2(lambda s: s.server),
                       clients=stack2(lambda s: s.clients),
                       round=jnp.asarray(first.round),
                       rng=jnp.asarray(np.stack([row[0].rng for row in
                                                 per_seed])))

  def run(self, state: EngineState, data, num_rounds: int):
    """``num_rounds`` (<= max_rounds_per_call) rounds of every setting.

    Returns:
      ``(state, metrics)``: metric leaves ``[max_rounds_per_call, num_seeds,
      num_grid]``, of which the first ``num_rounds`` rows are filled.
    """
    if not 1 <= num_rounds <= self.max_rounds:
      raise ValueError(f"num_rounds must be in [1, {self.max_rounds}], got "
                       f"{num_rounds}.")
    self._resolve_block_size(state, data)
    return self._run(self.h, state, data, jnp.int32(num_rounds))

  def flat(self, tree, axis: int = 0):
    """``[..., num_seeds, num_grid, ...]`` (at ``axis``) -> ``[..., S, ...]``
    in settings order (grid outer, seeds inner)."""
    def f(a):
      a = jnp.swapaxes(jnp.asarray(a), axis, axis + 1)
      return a.reshape(a.shape[:axis] + (-1,) + a.shape[axis + 2:])
    return jax.tree.map(f, tree)

  def engine_states(self, state: EngineState) -> EngineState:
    """Per-setting EngineStates stacked ``[S, ...]`` in settings order."""
    ng = len(self.points)
    rng = jnp.repeat(jnp.asarray(state.rng)[None], ng, axis=0)  # [grid, seeds]
    rng = rng.reshape((-1,) + rng.shape[2:])
    return EngineState(server=self.flat(state.server),
                       clients=self.flat(state.clients),
                       round=jnp.full((len(self.settings),), state.round),
                       rng=rng)


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
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  grid = dict(grid or {})
  _check_grid(exp, grid)
  if isinstance(seeds, (int, np.integer)):
    if seeds < 1:
      raise ValueError(f"seeds must be >= 1, got {seeds}.")
    seeds = [exp.seed + i for i in range(int(seeds))]
  seeds = [int(s) for s in seeds]
  if not seeds or len(set(seeds)) != len(seeds):
    raise ValueError(f"seeds must be distinct and non-empty, got {seeds}.")
  ends = sorted({t for t in range(1, exp.num_rounds + 1)
                 if exp.eval_every and t % exp.eval_every == 0}
                | {exp.num_rounds})
  chunk = max(b - a for a, b in zip([0] + ends[:-1], ends))
  runner = VmappedRounds(exp, seeds, grid, chunk)
  settings = runner.settings
  state = runner.init()
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
      state, metrics = runner.run(state, data, end - done)
      metrics = jax.device_get(runner.flat(metrics, axis=1))  # [rounds, S]
      dt = time.perf_counter() - tick
      params = runner.flat(exp.algorithm.get_params(state.server))
      evals = [evaluator(jax.tree.map(lambda a, i=i: a[i], params))
               for i in range(len(settings))]
      wall = time.perf_counter() - t0
      for k in range(end - done):
        t = done + k + 1
        for i, s in enumerate(settings):
          m = jax.tree.map(lambda a, i=i, k=k: a[k, i], metrics)
          row = {"setting": i, **s, "round": t, **_train_row(m),
                 "rounds_per_s": (end - done) / max(dt, 1e-9)}
          if t == end:
            row.update(evals[i])
            row["wall_time"] = wall
          (log.append if log else rows.append)(row)
      bar.update(end - done)
      last = rows[-len(settings):]
      bar.set_postfix({
          "loss": f"{np.mean([r.get('train_loss', np.nan) for r in last]):.4f}",
          "test_acc": f"{np.mean([r.get('test_accuracy', np.nan) for r in last]):.3f}",
          "rounds/s": f"{(end - done) / max(dt, 1e-9):.1f}"})
      done = end
  finally:
    bar.close()
    if log:
      log.close()
  res = SweepResult(run_dir, settings, runner.engine_states(state),
                    list(rows), runner.num_traces)
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
