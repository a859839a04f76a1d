"""Aggregators: how a round reduces its clients' updates (pluggable, composable).

Layer: beside ``algorithms/`` (imports ``algorithms.base`` at most); the
engine imports it. Pass one to an algorithm as ``FederatedAlgorithm.aggregator``
(None is :func:`weighted_mean`).

Streaming (memory one update per device and run): :func:`weighted_mean`,
:func:`unweighted_mean`, :func:`clipped` (around any inner aggregator).
Materialized (keep the round's ``[clients_per_round, ...]`` updates):
:func:`coordinate_median`, :func:`trimmed_mean`, :func:`krum`,
:func:`geometric_median`, :func:`centered_clipping`.
"""

from fedjax_lite.aggregators.base import (
  Aggregator,
  AggregatorOutput,
  clip_by_norm,
  sum_over_devices,
  tree_norm,
  update_bytes,
)
from fedjax_lite.aggregators.clipping import clipped
from fedjax_lite.aggregators.mean import unweighted_mean, weighted_mean
from fedjax_lite.aggregators.robust import (
  centered_clipping,
  coordinate_median,
  geometric_median,
  krum,
  trimmed_mean,
)

__all__ = [
  "Aggregator",
  "AggregatorOutput",
  "centered_clipping",
  "clip_by_norm",
  "clipped",
  "coordinate_median",
  "geometric_median",
  "krum",
  "sum_over_devices",
  "tree_norm",
  "trimmed_mean",
  "unweighted_mean",
  "update_bytes",
  "weighted_mean",
]
