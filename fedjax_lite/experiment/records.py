"""Per-round metrics files of a run folder: ``metrics.jsonl`` and ``metrics.csv``.

``metrics.jsonl`` is appended (and flushed) one JSON object per round as the run
goes; ``metrics.csv`` is rewritten from it at every checkpoint and at the end
(its columns are the union of all keys, empty where a row has no value, e.g.
test metrics on rounds without evaluation).

Non-finite values. JSON has no NaN or infinity, so a metric whose value was
NaN, ``+inf`` or ``-inf`` is written as ``null``: a key present with value
``null`` means "computed, but not a finite number" (a diverged loss, an
infinite privacy budget), while a key absent from a row means "not
computed that round". The rows in memory (:attr:`MetricsLog.rows`) hold
None there too, as :func:`read_jsonl` returns them; ``metrics.csv`` writes
``nan`` for them (and leaves missing values empty). Which of NaN and
``+-inf`` it was is not recorded: the metric writers of
:mod:`fedjax_lite.experiment.writers` get the float itself.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from fedjax_lite.experiment.checkpoint import atomic_write_text, naming

# Columns that depend on the machine, not the computation.
TIMING_KEYS = ("rounds_per_s", "wall_time", "round_time_s")


def _clean(v):
  """A row value as written: non-finite floats (numpy's too) as None."""
  if isinstance(v, (float, np.floating)) and not math.isfinite(v):
    return None  # JSON has no NaN/inf: null (see the module docstring)
  return v


def read_jsonl(path: str | os.PathLike) -> list[dict]:
  """All rows of a JSONL file (a torn last line, from a crash, is skipped).

  A non-finite value is None (``null``; files written before null was used
  hold the strings ``"nan"``, ``"inf"``, ``"-inf"``, which stay as they
  are).
  """
  path = Path(path)
  if not path.exists():
    return []
  rows = []
  for line in path.read_text().splitlines():
    line = line.strip()
    if not line:
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      break
  return rows


def columns(rows: Sequence[dict]) -> list[str]:
  cols: list[str] = []
  for r in rows:
    for k in r:
      if k not in cols:
        cols.append(k)
  return cols


def write_csv(path: str | os.PathLike, rows: Sequence[dict]) -> None:
  buf = io.StringIO()
  w = csv.DictWriter(
    buf, fieldnames=columns(rows), restval="", lineterminator="\n"
  )
  w.writeheader()
  for r in rows:
    w.writerow({k: "nan" if v is None else v for k, v in r.items()})
  atomic_write_text(path, buf.getvalue())


class MetricsLog:
  """Appends rows to ``metrics.jsonl`` and mirrors them to ``metrics.csv``.

  Args:
    run_dir: the run folder; None keeps the rows in memory only.
    keep_until_round: on resume, rows with ``round`` above this are dropped
      (they were computed after the checkpoint and will be recomputed).

  Attributes:
    rows: the rows (non-finite values as None).
    logged_round: the last round the file held when opened, before rows
      were dropped (None: no rows), i.e. how far the session before got.
  """

  def __init__(
    self, run_dir: str | os.PathLike | None, keep_until_round: int | None = None
  ):
    self.rows: list[dict] = []
    self.logged_round: int | None = None
    self._f = None
    if run_dir is None:
      return
    self.jsonl = Path(run_dir) / "metrics.jsonl"
    self.csv = Path(run_dir) / "metrics.csv"
    self.rows = read_jsonl(self.jsonl)
    rounds = [r["round"] for r in self.rows if isinstance(r.get("round"), int)]
    self.logged_round = max(rounds) if rounds else None
    if keep_until_round is not None:
      kept = [r for r in self.rows if r.get("round", 0) <= keep_until_round]
      if len(kept) != len(self.rows) or self.jsonl.exists():
        self.rows = kept
        atomic_write_text(
          self.jsonl, "".join(json.dumps(r) + "\n" for r in kept)
        )
    self._f = open(self.jsonl, "a", encoding="utf-8")

  def append(self, row: dict) -> None:
    """Adds a row (a copy, non-finite values as None) and writes it."""
    row = {k: _clean(v) for k, v in row.items()}
    self.rows.append(row)
    if self._f is not None:
      with naming(self.jsonl):
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

  def sync(self) -> None:
    """fsyncs the JSONL file and rewrites the CSV."""
    if self._f is None:
      return
    with naming(self.jsonl):
      self._f.flush()
      os.fsync(self._f.fileno())
    write_csv(self.csv, self.rows)

  def close(self) -> None:
    if self._f is None or self._f.closed:
      return
    try:
      self.sync()
    finally:
      try:
        self._f.close()
      except OSError:  # e.g. ENOSPC again: sync's error is the one to report
        pass

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def final_values(rows: Iterable[dict], drop: Sequence[str] = ()) -> dict:
  """The last value of every metric over ``rows`` (keys in ``drop`` left out).

  Test metrics come from the last evaluation, since rows without evaluation
  do not carry them. A last value that was non-finite is None (``null``).
  """
  out: dict = {}
  for r in rows:
    out.update({k: v for k, v in r.items() if k not in drop})
  return out


def setting_label(setting: Mapping[str, Any]) -> str:
  """``"client_lr=0.01, mu=0.1"`` for a sweep setting (seed left out)."""
  hp = {k: v for k, v in setting.items() if k != "seed"}
  return ", ".join(f"{k}={v:g}" for k, v in hp.items()) or "seeds"


def final_table(
  groups: Mapping[str, Sequence[Sequence[dict]]], keys: Sequence[str]
) -> str:
  """Markdown table of each group's final metrics (mean +- std over runs)."""
  finals = {
    label: [final_values(rows, TIMING_KEYS) for rows in runs]
    for label, runs in groups.items()
  }
  keys = [
    k for k in keys if any(k in f for runs in finals.values() for f in runs)
  ]
  head = "| run | n | rounds | " + " | ".join(keys) + " |"
  lines = [head, "|" + "---|" * (3 + len(keys))]
  for label, runs in finals.items():
    cells = [label, str(len(runs)), str(max(f.get("round", 0) for f in runs))]
    for k in keys:
      vals = np.asarray(
        [f[k] for f in runs if isinstance(f.get(k), (int, float))]
      )
      if vals.size == 0:
        cells.append("")
      elif vals.size == 1:
        cells.append(f"{vals[0]:.4f}")
      else:
        cells.append(f"{vals.mean():.4f} ± {vals.std():.4f}")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def last_value(rows: Iterable[dict], key: str):
  """The last non-missing value of ``key`` (None if never present)."""
  out = None
  for r in rows:
    if r.get(key) is not None and r.get(key) != "":
      out = r[key]
  return out
