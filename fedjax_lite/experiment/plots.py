"""Convergence curves (matplotlib, no pyplot state: safe in scripts and notebooks).

``plot_curves`` draws one run; ``plot_runs`` overlays several runs or groups of
runs (a group, e.g. the seeds of one sweep setting, is drawn as its mean with a
shaded ``mean +- std`` band). Both return the ``matplotlib.figure.Figure`` and
save it when given a path.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np

from fedjax_lite._optional import optional_import

# Imported when a plot is drawn: running an experiment needs no matplotlib
# until it writes curves.png.
mpl_figure = optional_import("matplotlib.figure", "experiment")

Rows = Sequence[dict]

# (panel title, y label, [(metric key, line style)])
PANELS = (
  ("Loss", "loss", (("train_loss", "-"), ("test_loss", "--"))),
  ("Accuracy", "accuracy", (("train_accuracy", "-"), ("test_accuracy", "--"))),
)
# Panels shown when a run reports the metric: (title, y label, key).
EXTRA_PANELS = (
  ("Uplink per client", "bytes / round", "train_uplink_bytes"),
  ("Privacy spent", "epsilon", "train_dp_epsilon"),
)


def series(rows: Rows, key: str) -> tuple[np.ndarray, np.ndarray]:
  """``(rounds, values)`` of the rows that have a numeric ``key``."""
  xs, ys = [], []
  for r in rows:
    v = r.get(key)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
      xs.append(r["round"])
      ys.append(float(v))
  return np.asarray(xs, np.int64), np.asarray(ys, np.float64)


def _band(group: Sequence[Rows], key: str):
  """Mean and std over runs at the rounds every run has."""
  curves = [dict(zip(*series(rows, key))) for rows in group]
  common = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
  if not common:
    return None
  ys = np.asarray([[c[t] for t in common] for c in curves])
  return np.asarray(common), ys.mean(0), ys.std(0)


def plot_runs(
  groups: Mapping[str, Sequence[Rows]],
  path: str | os.PathLike | None = None,
  title: str | None = None,
  panels=PANELS,
) -> mpl_figure.Figure:
  """Overlays runs: ``{label: [rows of run 1, rows of run 2, ...]}``.

  A label with several runs is drawn as the mean and a ``mean +- std`` band.
  Train curves are solid, test curves dashed; one color per label.
  """
  fig = mpl_figure.Figure(
    figsize=(5.2 * len(panels), 4.0), layout="constrained"
  )
  axes = fig.subplots(1, len(panels), squeeze=False)[0]
  colors = [f"C{i % 10}" for i in range(len(groups))]
  for ax, (ptitle, ylabel, keys) in zip(axes, panels):
    for color, (label, group) in zip(colors, groups.items()):
      for key, style in keys:
        band = _band(group, key)
        if band is None:
          continue
        x, mean, std = band
        split = key.split("_", 1)[0]
        name = label if len(groups) > 1 else split
        if len(groups) > 1 and any(k2 != key for k2, _ in keys):
          name = f"{label} ({split})"
        marker = "o" if split == "test" and x.size <= 30 else None
        ax.plot(
          x,
          mean,
          style,
          color=color if len(groups) > 1 else None,
          label=name + (f" (n={len(group)})" if len(group) > 1 else ""),
          marker=marker,
          markersize=3,
        )
        if len(group) > 1:
          ax.fill_between(
            x, mean - std, mean + std, alpha=0.2, color=color, linewidth=0
          )
    _decorate(ax, ptitle, ylabel)
  return _finish(fig, title, path)


def plot_curves(
  rows: Rows, path: str | os.PathLike | None = None, title: str | None = None
) -> mpl_figure.Figure:
  """One run: train/test loss and accuracy vs round, plus the spread of the
  per-client test accuracy (median, p25-p75 and p10-p90 bands) if evaluated,
  and the uplink bytes per client (compressed updates) and the privacy spent
  (DP's epsilon) when the run reports them."""
  has_q = any("test_accuracy_p50" in r for r in rows)
  extra = [p for p in EXTRA_PANELS if any(p[2] in r for r in rows)]
  n = 2 + has_q + len(extra)
  fig = mpl_figure.Figure(figsize=(5.2 * n, 4.0), layout="constrained")
  axes = fig.subplots(1, n)
  for ax, (ptitle, ylabel, keys) in zip(axes, PANELS):
    for key, style in keys:
      x, y = series(rows, key)
      if x.size:
        ax.plot(
          x,
          y,
          style,
          label=key.replace("_", " "),
          markersize=3,
          marker="o" if key.startswith("test") and x.size <= 30 else None,
        )
    _decorate(ax, ptitle, ylabel)
  if has_q:
    ax = axes[2]
    for lo, hi, alpha in (("p10", "p90", 0.15), ("p25", "p75", 0.3)):
      xl, ylo = series(rows, f"test_accuracy_{lo}")
      xh, yhi = series(rows, f"test_accuracy_{hi}")
      if xl.size and xl.size == xh.size:
        ax.fill_between(
          xl,
          ylo,
          yhi,
          alpha=alpha,
          color="C2",
          linewidth=0,
          label=f"clients {lo}-{hi}",
        )
    x, p50 = series(rows, "test_accuracy_p50")
    ax.plot(
      x,
      p50,
      color="C2",
      label="median client",
      markersize=3,
      marker="o" if x.size <= 30 else None,
    )
    _decorate(ax, "Per-client test accuracy", "accuracy")
  for ax, (ptitle, ylabel, key) in zip(axes[2 + has_q :], extra):
    x, y = series(rows, key)
    ax.plot(x, y, "-", label=key.replace("_", " "))
    _decorate(ax, ptitle, ylabel)
  return _finish(fig, title, path)


def _finish(
  fig: mpl_figure.Figure, title: str | None, path
) -> mpl_figure.Figure:
  if title:
    fig.suptitle(title)
  if path is not None:
    fig.savefig(path, dpi=110)
  return fig


def _decorate(ax, title: str, ylabel: str) -> None:
  ax.set_title(title)
  ax.set_xlabel("round")
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  if ax.lines:
    ax.legend(fontsize=8)
