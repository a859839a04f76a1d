"""``python -m fedjax_lite compare``: overlay runs and tabulate their final metrics.

Accepts run folders (``run``) and sweep folders (``sweep``: each grid point is
drawn as a mean +- std band over its seeds). Writes ``compare.png`` (or
``compare.svg``: the loss/accuracy of the global model on training and test
clients, and the local-training means, against rounds, wall-clock seconds
or cumulative uplink bytes, one color per run; see
:mod:`fedjax_lite.experiment.plots`) and ``compare.md`` (a markdown table of
final metrics, mean +- std where a label has several seeds).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from fedjax_lite.experiment import plots
from fedjax_lite.experiment.checkpoint import atomic_write_text
from fedjax_lite.experiment.config import ConfigError
from fedjax_lite.experiment.records import (
  final_table,
  read_jsonl,
  setting_label,
)

KEYS = (
  "train_loss",
  "train_accuracy",
  "global_train_loss",
  "global_train_accuracy",
  "test_loss",
  "test_accuracy",
  "test_accuracy_p10",
  "test_accuracy_p50",
)
_STAMP = re.compile(r"-\d{8}-\d{6}(-\d+)?$")


def load_groups(
  run_dir: str | os.PathLike, label: str | None = None
) -> dict[str, list[list[dict]]]:
  """``{label: [rows per seed]}`` of a run or sweep folder."""
  d = Path(run_dir)
  metrics = d / "metrics.jsonl"
  if not d.is_dir():
    raise ConfigError(
      f"{d} is not a folder; expected a run folder written by "
      "`python -m fedjax_lite run` or `sweep`."
    )
  if not metrics.is_file():
    raise ConfigError(
      f"{d} has no metrics.jsonl; expected a run folder "
      "written by `python -m fedjax_lite run` or `sweep`."
    )
  rows = read_jsonl(metrics)
  if not rows:
    raise ConfigError(f"{metrics} is empty (the run has not finished a round).")
  label = label or _STAMP.sub("", d.name)
  if (d / "sweep.json").is_file():
    settings = json.loads((d / "sweep.json").read_text())["settings"]
    groups: dict = {}
    for i, s in enumerate(settings):
      sub = setting_label(s)
      name = label if sub == "seeds" else f"{label} [{sub}]"
      groups.setdefault(name, []).append(
        [r for r in rows if r.get("setting") == i]
      )
    return groups
  return {label: [rows]}


def compare(
  run_dirs: Sequence[str | os.PathLike],
  out: str | os.PathLike,
  labels: Sequence[str] | None = None,
  title: str | None = None,
  keys: Sequence[str] = KEYS,
  *,
  x: str = "rounds",
  smooth: float | None = None,
  fmt: str = "png",
) -> str:
  """Writes ``out/compare.<fmt>`` and ``out/compare.md``; returns the table.

  Args:
    run_dirs: run or sweep folders.
    out: output folder (created).
    labels: one legend label per folder (default: folder names without the
      timestamp; full names if those collide).
    title: figure title.
    keys: metrics to tabulate.
    x: the curves' x axis: ``"rounds"``, ``"seconds"`` (the ``wall_time``
      column) or ``"bytes"`` (cumulative uplink bytes, ``sum_t
      train_uplink_bytes_t * train_num_clients_t``; refused for runs that do
      not report both).
    smooth: exponential-moving-average weight in [0, 1) for the curves
      (:func:`~fedjax_lite.experiment.plots.ema`; None: raw).
    fmt: ``"png"`` or ``"svg"``.

  Raises:
    ConfigError: a folder is not a run, the labels do not match the folders,
      or a bad ``x``/``smooth``/``fmt`` (or runs without what ``x`` needs).
  """
  if fmt is None:
    raise ConfigError("fmt must be 'png' or 'svg', got None.")
  plots.check_args(x, smooth, fmt)
  if labels is not None and len(labels) != len(run_dirs):
    raise ConfigError(
      f"--labels has {len(labels)} entries for "
      f"{len(run_dirs)} run folders; give one per folder."
    )
  if labels is None:
    short = [_STAMP.sub("", Path(d).name) for d in run_dirs]
    labels = (
      short
      if len(set(short)) == len(short)
      else [Path(d).name for d in run_dirs]
    )
  groups: dict = {}
  rates = {}
  for d, lab in zip(run_dirs, labels):
    for name, runs in load_groups(d, lab).items():
      if name in groups:
        raise ConfigError(f"two runs are labelled {name!r}; pass --labels.")
      groups[name] = runs
      r = [
        row["rounds_per_s"]
        for rows in runs
        for row in rows[1:]
        if isinstance(row.get("rounds_per_s"), (int, float))
      ]
      rates[name] = float(np.median(r)) if r else None
  fig = plots.plot_runs(groups, None, title, x=x, smooth=smooth)
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  plots.save(fig, out / f"compare.{fmt}", fmt)
  table = final_table(groups, keys)
  lines = table.splitlines()
  lines[0] += " rounds/s |"
  lines[1] += "---|"
  for i, name in enumerate(groups):
    rate = rates[name]
    lines[2 + i] += f" {rate:.1f} |" if rate else " |"
  table = "\n".join(lines)
  sources = "\n".join(f"- {lab}: `{d}`" for d, lab in zip(run_dirs, labels))
  atomic_write_text(
    out / "compare.md",
    f"# {title or 'Comparison'}\n\n{table}\n\n"
    f"Final values (test metrics from each run's last "
    f"evaluation); ± is the std over seeds.\n\nRuns:\n"
    f"{sources}\n",
  )
  return table
