r"""The runs of a session: every (grid point, seed) setting as a run of ONE engine round.

A setting is a seed and a value for each swept hyperparameter. Each has its
own server state (initial params from ``k_init(seed)``), its own sampling and
client rng (``k_engine(seed)``), its own algorithm (``algorithm_fn`` of its
hyperparameters, which may be traced scalars) and its own aggregator state.
All settings advance together as the runs of one engine round
(:meth:`~fedjax_lite.Engine.rounds_body`): every run samples its own
clients, the sampled clients of all runs share the size-bucket blocks (full
blocks however the runs' samples fall into the buckets), and aggregation
and the server update stay per run, so each setting computes what its
separate run computes, up to float summation order (tests).

A single run (:func:`~fedjax_lite.experiment.session.train`) is the sweep of
one setting (``stacked=False``: its state carries no run axis, as
:meth:`Engine.round`'s does).

Rounds run in one device loop (``fori_loop`` with a dynamic trip count: one
compiled program for every chunk length up to ``max_rounds_per_call``).

Cost: each setting adds its own clients' local training, so S settings cost
about S times the client compute of one run on hardware that one run already
keeps busy (a CPU, where small per-client GEMMs are compute bound); the gain
is one compile, one data upload, full blocks and no per-run overheads. On
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

from fedjax_lite.engine.round import Engine, EngineState, tree_finite
from fedjax_lite.experiment import config as cfglib
from fedjax_lite.experiment.core import Experiment

# Private metric of every round: bool, the new global model is finite
# (popped by the session's advance, see loop.divergence).
PARAMS_FINITE = "_params_finite"

_ENGINES: dict = {}
_PROGRAMS: dict = {}
_MAX_CACHED = 8


def _remember(cache: dict, key, make):
  """``cache[key]`` (made by ``make()`` when missing), most recent last; at
  most ``_MAX_CACHED`` entries. Entries hold the objects their key names by
  id, so a hit is checked against them."""
  hit = cache.pop(key, None)
  if hit is None:
    hit = make()
  cache[key] = hit
  while len(cache) > _MAX_CACHED:
    cache.pop(next(iter(cache)))
  return hit


def engine_for(exp: Experiment) -> Engine:
  """The Engine of ``exp``'s algorithm and round config.

  Engines are cached (a few, most recent) by algorithm object, round config
  and mesh, so running the same experiment again (a resume, a notebook cell
  run twice, ``dataclasses.replace(exp, num_rounds=...)``) reuses the compiled
  rounds instead of compiling them again.
  """
  key = (id(exp.algorithm), exp.round_config, id(exp.mesh))
  hit = _ENGINES.get(key)
  if hit is not None and (
    hit[0] is not exp.algorithm or hit[1] is not exp.mesh
  ):
    _ENGINES.pop(key)
  return _remember(
    _ENGINES,
    key,
    lambda: (
      exp.algorithm,
      exp.mesh,
      Engine(exp.algorithm, exp.round_config, exp.mesh),
    ),
  )[2]


def init_state(
  exp: Experiment, engine: Engine, seed: int | None = None, data=None
) -> EngineState:
  """The experiment's initial EngineState for ``seed`` (default its own);
  ``data`` (device data) lets a stateful aggregator size its state."""
  return engine.init(
    exp.initial_params(seed),
    seed=exp.engine_rng(seed),
    num_clients=exp.train.num_clients,
    data=data,
  )


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
  """Refuses a grid over names ``exp.hparams`` does not declare, or with no
  values (:class:`~fedjax_lite.experiment.config.ConfigError`)."""
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


def _stack1(tree):
  return jax.tree.map(lambda a: jnp.asarray(a)[None], tree)


class _Program:
  """The jitted chunk of rounds of one engine and algorithm family, shared
  by every :class:`VmappedRounds` over them (compiled once per layout)."""

  def __init__(self, engine: Engine, exp: Experiment):
    self.engine = engine
    self.make_algorithm = exp.make_algorithm
    self.get_params = exp.algorithm.get_params
    self.num_traces = 0
    self.jitted = jax.jit(
      self._rounds, static_argnames=("max_rounds", "stacked")
    )

  def _step(self, states, data, hparams):
    """One round of every setting, and whether each new model is finite."""
    algorithm_fn = None if hparams is None else self.make_algorithm
    new, m = self.engine.rounds_body(states, data, algorithm_fn, hparams)
    m = dict(m)
    m[PARAMS_FINITE] = jax.vmap(lambda v: tree_finite(self.get_params(v)))(
      new.server
    )
    return new, m

  def _rounds(self, state, data, hparams, num_rounds, *, max_rounds, stacked):
    # A dynamic trip count (fori_loop) and a [max_rounds] metrics buffer: one
    # compiled program serves every chunk length up to max_rounds.
    self.num_traces += 1
    states = state if stacked else _stack1(state)
    # One trace of the round: the metrics buffer's shapes come from tracing
    # the jitted step, and the loop body's call of it reuses that trace
    # (same function and argument types: jit's trace cache).
    step = jax.jit(self._step)
    shape = jax.eval_shape(step, states, data, hparams)[1]
    buf = jax.tree.map(
      lambda d: jnp.zeros((max_rounds,) + d.shape, d.dtype), shape
    )

    def body(i, carry):
      s, buf = carry
      s, m = step(s, data, hparams)
      return s, jax.tree.map(lambda b, v: b.at[i].set(v), buf, m)

    states, buf = jax.lax.fori_loop(0, num_rounds, body, (states, buf))
    if stacked:
      return states, buf
    return jax.tree.map(lambda a: a[0], states), jax.tree.map(
      lambda a: a[:, 0], buf
    )


class VmappedRounds:
  """Runs the rounds of every (grid point, seed) setting as ONE computation.

  The settings are the runs of one engine round (see the module docstring);
  the state's leaves carry a leading setting axis ``[S, ...]`` (``round``
  ``[S]``) in the order of :func:`make_settings` (grid outer, seeds inner),
  or, with ``stacked=False`` (one setting), none.

  Args:
    exp: the experiment (data, model, round config and mesh are shared).
    seeds: the seeds.
    grid: ``{hparam name: values}`` (names declared in ``exp.hparams``);
      empty: every setting runs ``exp.algorithm``.
    max_rounds_per_call: the most rounds one :meth:`run` call may run.
    block_size: clients per device per block (default: the experiment's
      ``round_config.block_size``, or the engine's automatic choice for all
      settings' clients together).
    stacked: False keeps the state of a single setting without the setting
      axis.
  """

  def __init__(
    self,
    exp: Experiment,
    seeds: Sequence[int],
    grid: Mapping[str, Sequence[float]] | None = None,
    max_rounds_per_call: int = 1,
    block_size: int | None = None,
    *,
    stacked: bool = True,
  ):
    grid = dict(grid or {})
    check_grid(exp, grid)
    self.exp = exp
    self.seeds = [int(s) for s in seeds]
    self.settings = make_settings(self.seeds, grid)
    self.points = [{n: s[n] for n in grid} for s in self.settings]
    self.stacked = bool(stacked)
    if not self.stacked and len(self.settings) != 1:
      raise ValueError(
        f"stacked=False keeps one setting's state, got {len(self.settings)} "
        "settings."
      )
    self.max_rounds = int(max_rounds_per_call)
    self.hparams = (
      {n: jnp.asarray([p[n] for p in self.points], jnp.float32) for n in grid}
      if grid
      else None
    )
    if block_size is None:
      self.engine = engine_for(exp)
    else:
      config = dataclasses.replace(exp.round_config, block_size=int(block_size))
      self.engine = Engine(exp.algorithm, config, exp.mesh)
    key = (id(self.engine), id(exp.algorithm_fn), tuple(exp.hparams.items()))
    hit = _PROGRAMS.get(key)
    if hit is not None and (
      hit[0] is not self.engine or hit[1] is not exp.algorithm_fn
    ):
      _PROGRAMS.pop(key)
    self._program = _remember(
      _PROGRAMS,
      key,
      lambda: (self.engine, exp.algorithm_fn, _Program(self.engine, exp)),
    )[2]
    self._traces0 = self._program.num_traces

  @property
  def num_traces(self) -> int:
    """How often the rounds were traced since this object was made."""
    return self._program.num_traces - self._traces0

  @property
  def round_config(self):
    return self.engine.config

  @property
  def block_sizes(self) -> dict:
    """``{bucket size: clients per device per block}`` as last traced."""
    return self.engine.block_sizes

  def init(self, data=None) -> EngineState:
    """The initial state of every setting (see the class docstring for the
    layout). ``data`` (the device data) lets stateful aggregators size
    their state."""
    if not self.stacked:
      return init_state(self.exp, self.engine, self.seeds[0], data)
    states = []
    for s, point in zip(self.settings, self.points):
      engine = (
        self.engine
        if not point
        else Engine(
          self.exp.make_algorithm(point), self.engine.config, self.exp.mesh
        )
      )
      states.append(
        jax.device_get(init_state(self.exp, engine, s["seed"], data))
      )
    first = states[0]
    if any(jax.tree.structure(s) != jax.tree.structure(first) for s in states):
      raise ValueError(
        "settings produce differently structured states; "
        "hyperparameters must not change the state's shape."
      )
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *states)
    return jax.device_put(stacked, self.engine.replicated)

  def run(self, state: EngineState, data, num_rounds: int):
    """``num_rounds`` (<= max_rounds_per_call) rounds of every setting.

    Returns:
      ``(state, metrics)``: metric leaves ``[num_rounds, S, ...]``
      (``[num_rounds, ...]`` unstacked), checked on the host as
      :meth:`Engine.check_metrics` does (``RoundConfig(nonfinite="raise")``,
      the aggregator's own checks), and ``metrics[PARAMS_FINITE]``: whether
      each new global model is finite.
    """
    if not 1 <= num_rounds <= self.max_rounds:
      raise ValueError(
        f"num_rounds must be in [1, {self.max_rounds}], got {num_rounds}."
      )
    one = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(
        a.shape[1:] if self.stacked else a.shape, a.dtype
      ),
      state,
    )
    self.engine.check_inputs(one, data)
    state, metrics = self._program.jitted(
      state,
      data,
      self.hparams,
      jnp.int32(num_rounds),
      max_rounds=self.max_rounds,
      stacked=self.stacked,
    )
    metrics = dict(jax.tree.map(lambda a: a[:num_rounds], metrics))
    finite = metrics.pop(PARAMS_FINITE)
    metrics = self.engine.check_metrics(metrics, data)
    return state, {**metrics, PARAMS_FINITE: finite}

  def params(self, state: EngineState):
    """Every setting's global model parameters (``algorithm.get_params``)."""
    get = self.exp.algorithm.get_params
    return jax.vmap(get)(state.server) if self.stacked else get(state.server)

  def state_of(self, tree, i: int):
    """Setting ``i``'s part of ``tree`` (a state, its server's params, ...):
    its slice of the setting axis, or the tree itself when unstacked."""
    if not self.stacked:
      return tree
    return jax.tree.map(lambda a: a[i], tree)
