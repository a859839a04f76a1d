"""What a round is configured by and what it reads and writes.

:class:`RoundConfig` (static: changing it recompiles) and
:class:`EngineState` (a pytree: checkpoint it whole). Every other engine
module imports these; this one imports no other engine module.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax

from fedjax_lite import checks
from fedjax_lite.data.batching import LocalWork

PyTree = Any
AXIS = "clients"
SAMPLING = ("uniform", "weighted", "all")
NONFINITE = ("drop", "raise")


@dataclasses.dataclass(frozen=True)
class RoundConfig:
  """Static configuration of a round (changing it recompiles).

  Attributes:
    clients_per_round: clients sampled each round.
    local_work: local training per client (batch size, epochs or steps).
    sampling: ``"uniform"`` (without replacement unless ``replace``),
      ``"weighted"`` (proportional to client size), or ``"all"`` (every client
      of the dataset, in order; ``clients_per_round`` must equal the
      population).
    replace: sample with replacement.
    block_size: clients per device per block; None chooses automatically from
      the model and data sizes (see :func:`auto_block_size`).
    nonfinite: what a round does with a client whose update (or weight)
      holds a NaN or an infinity, before any aggregator sees it.
      ``"drop"`` (default): the client does not take part (it is left out of
      the aggregate, of ``num_clients`` and of the client metrics) and the
      round reports how many were dropped as ``dropped_nonfinite``; the
      aggregator, DP and secure aggregation run on the finite ones.
      ``"raise"``: :meth:`Engine.round` and :meth:`Engine.run` raise
      :class:`NonFiniteUpdateError` naming the clients' ids. For DP, a
      dropped client was still sampled: the accounting (which counts every
      sampled user) stays valid, and its fixed denominator is unchanged.
  """

  clients_per_round: int
  local_work: LocalWork = dataclasses.field(default_factory=LocalWork)
  sampling: str = "uniform"
  replace: bool = False
  block_size: int | None = None
  nonfinite: str = "drop"

  def __post_init__(self):
    checks.positive_int("clients_per_round", self.clients_per_round)
    if self.sampling not in SAMPLING:
      raise ValueError(
        f"sampling must be one of {SAMPLING}, got {self.sampling!r}."
      )
    checks.positive_int(
      "block_size", self.block_size, allow_none=True, hint=" (None: automatic)"
    )
    checks.instance_of("local_work", self.local_work, LocalWork)
    if self.nonfinite not in NONFINITE:
      raise ValueError(
        f"nonfinite must be one of {NONFINITE}, got {self.nonfinite!r}."
      )


class NonFiniteUpdateError(FloatingPointError):
  """A round with ``RoundConfig(nonfinite="raise")`` met a client whose
  update held a NaN or an infinity (the message names the client ids)."""


@flax.struct.dataclass
class EngineState:
  """Everything a round reads and writes (a pytree: checkpoint it whole).

  :meth:`Engine.init` returns it complete: every round returns a state of
  the same structure.

  Attributes:
    server: the algorithm's server state.
    clients: per-client persistent states, leading axis ``num_clients`` (only
      for stateful algorithms), else None.
    round: int32 round counter.
    rng: the experiment's base PRNG key; round ``t`` uses
      ``fold_in(rng, t)``, so resuming from a checkpoint is exact.
    aggregator: the aggregator's state kept across rounds (e.g. an adaptive
      clip norm, the centered-clipping center), made by :meth:`Engine.init`
      from ``aggregator.init_state``; None for stateless aggregators. (A
      state whose ``aggregator`` is set to None starts a stateful
      aggregator afresh.)
  """

  server: PyTree
  clients: PyTree
  round: jax.Array
  rng: jax.Array
  aggregator: PyTree = None
