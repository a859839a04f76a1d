r"""Every (seed, grid point) setting of an experiment as ONE computation.

Every setting has its own server state (initial params from
``k_init(seed)``) and, through its seed, its own sampling and client rng
(``k_engine(seed)``). All settings advance together in one jitted program
built from the engine's pure rounds, in one of two ways:

* pooled (default with several seeds): every seed is a run of ONE engine
  round (:meth:`Engine.rounds_body`). Each run samples its own clients; the
  sampled clients of all runs share the size-bucket blocks, and aggregation
  and the server update stay per run. Blocks are full however differently
  the runs' samples fall into the buckets. A seed's grid points are one
  algorithm (:func:`~fedjax_lite.algorithms.grid_algorithm`): each client
  trains every point's model on its data gathered once.
* lockstep (default with one seed): ``jax.vmap`` over the settings of
  ``Engine.round_body``. Grid points of one seed share its client sample and
  gathered data (only the parameters carry the grid axis), which makes a
  grid cheaper than independent runs; but a vmapped bucket loop runs as many
  blocks as the busiest setting needs, so with several seeds on data with
  uneven client sizes it wastes most of its work.

Rounds run in one device loop (``fori_loop`` with a dynamic trip count: one
compiled program for every chunk length). Both ways are traced once and
compute what separate runs compute (tests).

Cost: each seed adds its own clients' local training, so S seeds cost about S
times the client compute of one run on hardware that one run already keeps
busy (a CPU, where small per-client GEMMs are compute bound); the gain is
one compile, one data upload, full blocks and no per-run overheads. On
accelerators, where a small run leaves the device mostly idle, settings are
nearly free. See experiments/results/sweeps.md for measurements.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lite.algorithms.grid import GRID_WEIGHT, grid_algorithm
from fedjax_lite.engine.round import Engine, EngineState
from fedjax_lite.experiment import config as cfglib
from fedjax_lite.experiment.core import Experiment
from fedjax_lite.experiment.runner import init_state


def make_settings(
  seeds: Sequence[int], grid: Mapping[str, Sequence[float]]
) -> list[dict]:
  """The product of ``grid`` (outer, in order) and ``seeds`` (inner)."""
  names = list(grid)
  out = []
  for values in itertools.product(*(grid[n] for n in names)):
    for s in seeds:
      out.append(
        {"seed": int(s), **{n: float(v) for n, v in zip(names, values)}}
      )
  return out


def check_grid(exp: Experiment, grid: Mapping[str, Sequence[float]]) -> None:
  for name, values in grid.items():
    if name not in exp.hparams:
      raise cfglib.ConfigError(
        f"cannot sweep {name!r}: the experiment declares the sweepable "
        f"hyperparameters {sorted(exp.hparams) or '(none)'} in "
        "Experiment.hparams (with algorithm_fn). Declare it there, or run "
        f"the values separately with `run --set {name}=...` and overlay "
        "them with `compare`."
      )
    if len(values) == 0:
      raise cfglib.ConfigError(f"--grid {name}= has no values.")


def _swap_client_axes(clients):
  # [seeds, grid, clients, ...] <-> [seeds, clients, grid, ...]
  return jax.tree.map(lambda a: jnp.swapaxes(a, 1, 2), clients)


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

  def __init__(
    self,
    exp: Experiment,
    seeds: Sequence[int],
    grid: Mapping[str, Sequence[float]] | None = None,
    max_rounds_per_call: int = 1,
    block_size: int | None = None,
    pooled: bool | None = None,
  ):
    grid = dict(grid or {})
    check_grid(exp, grid)
    self.exp = exp
    self.seeds = [int(s) for s in seeds]
    self.names = tuple(grid)
    self.points = [
      dict(zip(self.names, v))
      for v in itertools.product(*(grid[n] for n in self.names))
    ]
    self.settings = make_settings(self.seeds, grid)
    self.max_rounds = int(max_rounds_per_call)
    self.num_traces = 0
    # Clients per device per block for each size bucket, as last traced.
    self.block_sizes: dict[int, int] = {}
    self.mesh = exp.mesh
    self.h = {
      n: jnp.asarray([p[n] for p in self.points], jnp.float32)
      for n in self.names
    }
    self.round_config = exp.round_config
    self.pooled = len(self.seeds) > 1 if pooled is None else bool(pooled)
    if block_size is not None:
      self.round_config = dataclasses.replace(
        exp.round_config, block_size=int(block_size)
      )
    self._run = jax.jit(self._run_body)
    self._checker: Engine | None = None  # host checks of the metrics

  def _resolve_block_size(self, state: EngineState, data) -> None:
    """Sets the sweep's block size from one run's automatic choice."""
    if self.round_config.block_size is not None or self.pooled:
      return  # pooled: the engine sizes blocks for all runs' clients
    probe = Engine(
      self.exp.make_algorithm(self.points[0]), self.round_config, self.mesh
    )
    first = self.engine_states(state)
    first = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), first
    )
    jax.eval_shape(probe.round_body, first, data)
    single = max(probe.block_sizes.values())
    self.round_config = dataclasses.replace(
      self.round_config, block_size=max(1, single // len(self.settings))
    )

  def _one_round(self, h, state, data):
    engine = Engine(self.exp.make_algorithm(h), self.round_config, self.mesh)
    out = engine.round_body(state, data)
    self.block_sizes = dict(engine.block_sizes)
    return out

  def _rounds_of_all(self, h, carry, rnd, rng, data):
    # carry = (server, clients, aggregator), leaves [num_seeds, num_grid, ...]
    if self.pooled:
      return self._pooled_rounds(h, carry, rnd, rng, data)

    def inner(h1, carry1, rng1):
      s, m = self._one_round(
        h1, EngineState(*carry1[:2], rnd, rng1, carry1[2]), data
      )
      return (s.server, s.clients, s.aggregator), m

    grid_axis = jax.vmap(inner, in_axes=(0, 0, None))
    return jax.vmap(grid_axis, in_axes=(None, 0, 0))(h, carry, rng)

  def _pooled_rounds(self, h, carry, rnd, rng, data):
    # Every seed is a run of ONE pooled engine round. One grid point: the
    # experiment's algorithm itself (any aggregator). Several: one algorithm
    # whose clients train all grid points' models on the data gathered once
    # (grid_algorithm; weighted mean only).
    ns, ng = len(self.seeds), len(self.points)
    server, clients, agg = carry
    if ng == 1:
      point = jax.tree.map(lambda a: a[0], h)
      one = lambda t: jax.tree.map(lambda a: a[:, 0], t)
      states = EngineState(
        one(server),
        one(clients),
        jnp.full((ns,), rnd, jnp.int32),
        rng,
        one(agg),
      )
      engine = Engine(
        self.exp.make_algorithm(point), self.round_config, self.mesh
      )
      new, m = engine.rounds_body(states, data)
      self.block_sizes = dict(engine.block_sizes)
      grid = lambda t: jax.tree.map(lambda a: a[:, None], t)
      return (grid(new.server), grid(new.clients), grid(new.aggregator)), grid(
        m
      )
    states = EngineState(
      server, _swap_client_axes(clients), jnp.full((ns,), rnd, jnp.int32), rng
    )
    engine = Engine(
      grid_algorithm(self.exp.make_algorithm, h, ng),
      self.round_config,
      self.mesh,
    )
    new, m = engine.rounds_body(states, data)
    self.block_sizes = dict(engine.block_sizes)
    m = dict(m)
    # Per-seed counts (a client is dropped for every grid point when any of
    # its grid points' updates is non-finite) -> [seeds, grid].
    for k in ("num_clients", "dropped_nonfinite"):
      if k in m:
        m[k] = jnp.repeat(m[k][:, None], ng, axis=1)
    m["total_weight"] = m.pop(GRID_WEIGHT) * m["num_clients"]
    return (new.server, _swap_client_axes(new.clients), None), m

  def _run_body(self, h, state, data, num_rounds):
    # A dynamic trip count (fori_loop) and a [max_rounds] metrics buffer: one
    # compiled program serves every chunk length up to max_rounds.
    self.num_traces += 1
    start = (state.server, state.clients, state.aggregator)
    shape = jax.eval_shape(
      lambda: self._rounds_of_all(h, start, state.round, state.rng, data)[1]
    )
    buf = jax.tree.map(
      lambda d: jnp.zeros((self.max_rounds,) + d.shape, d.dtype), shape
    )

    def body(i, loop_carry):
      carry, buf = loop_carry
      carry, m = self._rounds_of_all(h, carry, state.round + i, state.rng, data)
      buf = jax.tree.map(lambda b, v: b.at[i].set(v), buf, m)
      return carry, buf

    (server, clients, agg), buf = jax.lax.fori_loop(
      0, num_rounds, body, (start, buf)
    )
    return EngineState(
      server, clients, state.round + num_rounds, state.rng, agg
    ), buf

  def init(self, data=None) -> EngineState:
    """The stacked initial state (see the class docstring for the layout).

    ``data`` (the device data) lets stateful aggregators size their state.
    """
    per_seed = []
    for seed in self.seeds:
      row = []
      for point in self.points:
        engine = Engine(
          self.exp.make_algorithm(point), self.round_config, self.mesh
        )
        row.append(jax.device_get(init_state(self.exp, engine, seed, data)))
      per_seed.append(row)
    first = per_seed[0][0]
    if any(
      jax.tree.structure(s) != jax.tree.structure(first)
      for row in per_seed
      for s in row
    ):
      raise ValueError(
        "settings produce differently structured states; "
        "hyperparameters must not change the state's shape."
      )

    def stack2(get):
      return jax.tree.map(
        lambda *xs: jnp.asarray(
          np.stack(xs).reshape(
            (len(self.seeds), len(self.points)) + np.shape(xs[0])
          )
        ),
        *[get(s) for row in per_seed for s in row],
      )

    return EngineState(
      server=stack2(lambda s: s.server),
      clients=stack2(lambda s: s.clients),
      round=jnp.asarray(first.round),
      rng=jnp.asarray(np.stack([row[0].rng for row in per_seed])),
      aggregator=stack2(lambda s: s.aggregator),
    )

  def run(self, state: EngineState, data, num_rounds: int):
    """``num_rounds`` (<= max_rounds_per_call) rounds of every setting.

    Returns:
      ``(state, metrics)``: metric leaves ``[num_rounds, num_seeds,
      num_grid]``, checked on the host as :meth:`Engine.check_metrics` does
      (``RoundConfig(nonfinite="raise")``, the aggregator's own checks).
    """
    if not 1 <= num_rounds <= self.max_rounds:
      raise ValueError(
        f"num_rounds must be in [1, {self.max_rounds}], got {num_rounds}."
      )
    self._resolve_block_size(state, data)
    state, metrics = self._run(self.h, state, data, jnp.int32(num_rounds))
    metrics = jax.tree.map(lambda a: a[:num_rounds], metrics)
    if self._checker is None:
      self._checker = Engine(
        self.exp.make_algorithm(self.points[0]), self.round_config, self.mesh
      )
    return state, self._checker.check_metrics(metrics, data)

  def flat(self, tree, axis: int = 0):
    """``[..., num_seeds, num_grid, ...]`` (at ``axis``) -> ``[..., S, ...]``
    in settings order (grid outer, seeds inner)."""

    def f(a):
      a = jnp.swapaxes(jnp.asarray(a), axis, axis + 1)
      return a.reshape(a.shape[:axis] + (-1,) + a.shape[axis + 2 :])

    return jax.tree.map(f, tree)

  def engine_states(self, state: EngineState) -> EngineState:
    """Per-setting EngineStates stacked ``[S, ...]`` in settings order."""
    ng = len(self.points)
    rng = jnp.repeat(jnp.asarray(state.rng)[None], ng, axis=0)  # [grid, seeds]
    rng = rng.reshape((-1,) + rng.shape[2:])
    return EngineState(
      server=self.flat(state.server),
      clients=self.flat(state.clients),
      round=jnp.full((len(self.settings),), state.round),
      rng=rng,
      aggregator=self.flat(state.aggregator),
    )
