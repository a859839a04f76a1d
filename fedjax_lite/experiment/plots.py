"""Convergence curves (matplotlib, no pyplot state: safe in scripts and notebooks).

``plot_curves`` draws one run; ``plot_runs`` overlays several runs or groups of
runs (a group, e.g. the seeds of one sweep setting, is drawn as its mean with a
shaded ``mean +- std`` band). Both return the ``matplotlib.figure.Figure`` and
save it when given a path (PNG or SVG: the file name's extension or ``fmt``).
What they draw is computed by :func:`curve_data` and :func:`band_data`, which
tests and notebooks can call to read the numbers behind a figure; each drawn
line's ``gid`` is its metric key (``line.get_gid()``, an ``id`` in SVG).

The loss and accuracy panels show the global model on the training clients
(``global_train_<metric>``, solid; see
:mod:`fedjax_lite.experiment.evaluator`), the global model on the test
clients (``test_<metric>``, dashed) and, dotted, the mean of the clients'
local training during each round (``train_<metric>``), which is not the
global model's loss (it is typically lower: clients fit their own data).

The x axis (``x=``) is one of

* ``"rounds"``: the ``round`` column;
* ``"seconds"``: wall-clock seconds of the run, the ``wall_time`` column (a
  chunk of rounds run in one call shares its end time);
* ``"bytes"``: cumulative uplink bytes, at round ``t``
  ``sum_{s <= t} train_uplink_bytes_s * train_num_clients_s`` (the mean bytes
  a client sent in round ``s`` times the clients aggregated in it), over
  the rows in order; runs that do not report both columns in every row
  (e.g. runs without a compressor) are refused.

Smoothing (``smooth=w``, ``0 <= w < 1``) is an exponential moving average of
each loss/accuracy curve over its points in order: ``s_0 = y_0``, ``s_i = w
s_{i-1} + (1 - w) y_i`` (:func:`ema`); the per-client quantiles and the
uplink/privacy panels are drawn as they are. A metric value of None (a
non-finite value in metrics.jsonl) is drawn as NaN, a gap.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import numpy as np

from fedjax_lite import checks
from fedjax_lite._optional import optional_import
from fedjax_lite.experiment.config import ConfigError

# Imported when a plot is drawn: running an experiment needs no matplotlib
# until it writes curves.png.
mpl_figure = optional_import("matplotlib.figure", "experiment")

Rows = Sequence[dict]

# x-axis name -> axis label.
X_AXES = {
  "rounds": "round",
  "seconds": "wall-clock time (s)",
  "bytes": "cumulative uplink bytes",
}
FORMATS = ("png", "svg")

# (panel title, y label, [(metric key, line style)])
PANELS = (
  (
    "Loss",
    "loss",
    (("global_train_loss", "-"), ("test_loss", "--"), ("train_loss", ":")),
  ),
  (
    "Accuracy",
    "accuracy",
    (
      ("global_train_accuracy", "-"),
      ("test_accuracy", "--"),
      ("train_accuracy", ":"),
    ),
  ),
)
# Legend text of a panel key (others: the key with spaces).
LABELS = {
  "global_train_loss": "train, global model",
  "test_loss": "test, global model",
  "train_loss": "mean local-training loss",
  "global_train_accuracy": "train, global model",
  "test_accuracy": "test, global model",
  "train_accuracy": "mean local-training accuracy",
}
# Short legend text beside a run's label when runs are overlaid.
SHORT = {
  "global_train": "train",
  "test": "test",
  "train": "local-training mean",
}
# Line color of a metric's source in one run's panels.
COLORS = {"global_train": "C0", "test": "C1", "train": "0.45"}
# Panels shown when a run reports the metric: (title, y label, key).
EXTRA_PANELS = (
  ("Uplink per client", "bytes / round", "train_uplink_bytes"),
  ("Privacy spent", "epsilon", "train_dp_epsilon"),
)
QUANTILE_KEYS = tuple(f"test_accuracy_p{q}" for q in (10, 25, 50, 75, 90))
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class Curve(NamedTuple):
  """One drawn line: x and y (float64; NaN where the value was non-finite)."""

  key: str
  label: str
  x: np.ndarray
  y: np.ndarray


class Band(NamedTuple):
  """A group's curve: the mean over its runs at the rounds they all have, the
  std over runs (the shaded band) and the number of runs."""

  x: np.ndarray
  mean: np.ndarray
  std: np.ndarray
  num_runs: int


def label(key: str) -> str:
  """Legend text of a metric key (see :data:`LABELS`)."""
  return LABELS.get(key, key.replace("_", " "))


def _source(key: str) -> str:
  """What a metric key measures: ``"global_train"``, ``"test"`` or
  ``"train"`` (the key's prefix), else its first word."""
  for prefix in ("global_train", "test", "train"):
    if key.startswith(prefix + "_"):
      return prefix
  return key.split("_")[0]


def number(value) -> float | None:
  """A row value as a float: numbers as they are; None and the strings
  ``"nan"``, ``"inf"``, ``"-inf"`` (non-finite values as metrics files store
  them) as NaN/inf; anything else (a bool, other text) None: no value."""
  if value is None:
    return math.nan
  if isinstance(value, str):
    return _NONFINITE.get(value.strip().lower())
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return float(value)
  return None


def check_args(
  x: str = "rounds", smooth: float | None = None, fmt: str | None = None
) -> None:
  """Raises :class:`ConfigError` (a ValueError) naming a bad ``x``,
  ``smooth`` or ``fmt``."""
  if x not in X_AXES:
    raise ConfigError(
      f"x must be one of {', '.join(map(repr, X_AXES))}, got {x!r}."
    )
  if smooth is not None:
    w = checks.as_real(smooth)
    if w is None or not 0 <= w < 1:
      raise ConfigError(
        f"smooth must be a weight in [0, 1) (0 or None: no smoothing), got "
        f"{smooth!r}."
      )
  if fmt is not None and fmt not in FORMATS:
    raise ConfigError(f"fmt must be 'png' or 'svg' (or None), got {fmt!r}.")


def x_values(rows: Rows, x: str = "rounds") -> np.ndarray:
  """The x coordinate of every row (float64 ``[len(rows)]``; see the module
  docstring for ``"rounds"``, ``"seconds"`` and ``"bytes"``).

  Raises:
    ConfigError: ``x`` is unknown, or a row lacks the column(s) it needs.
  """
  check_args(x)
  need = {
    "rounds": ("round",),
    "seconds": ("wall_time",),
    "bytes": ("train_uplink_bytes", "train_num_clients"),
  }[x]
  cols = []
  for key in need:
    col = []
    for r in rows:
      v = number(r.get(key, ""))
      if v is None or not math.isfinite(v):
        got = f"{key}={r[key]!r}" if key in r else f"no {key}"
        if x == "bytes":
          raise ConfigError(
            "x='bytes' needs the columns train_uplink_bytes (the bytes a "
            "client sent that round, reported by compressed algorithms) and "
            "train_num_clients (the clients aggregated) in every row; the "
            f"row of round {r.get('round')} has {got}. Plot "
            "against x='rounds' or x='seconds'."
          )
        raise ConfigError(
          f"x={x!r} needs a number in the column {key!r} of every row; the "
          f"row of round {r.get('round')} has {got}."
        )
      col.append(v)
    cols.append(np.asarray(col, np.float64))
  if x == "bytes":
    return np.cumsum(cols[0] * cols[1])
  return cols[0]


def ema(y: np.ndarray, weight: float | None) -> np.ndarray:
  r"""Exponential moving average of ``y`` in order, skipping NaN.

  .. math:: s_0 = y_0, \qquad s_i = w\, s_{i-1} + (1 - w)\, y_i

  over the finite ``y`` (the state starts at the first finite value); a
  non-finite ``y_i`` gives NaN there and leaves the state as it was.
  ``weight`` None or 0 returns ``y`` unchanged.
  """
  y = np.asarray(y, np.float64)
  if not weight:
    return y
  check_args(smooth=weight)
  out = np.full_like(y, np.nan)
  s = None
  for i, v in enumerate(y):
    if not math.isfinite(v):
      continue
    s = v if s is None else weight * s + (1.0 - weight) * v
    out[i] = s
  return out


def _points(rows: Rows, key: str, x: str, smooth: float | None):
  """``(rounds, xs, ys)`` of the rows that have ``key`` (None: NaN)."""
  pick = [
    i for i, r in enumerate(rows) if key in r and number(r[key]) is not None
  ]
  if not pick:
    empty = np.zeros(0)
    return empty.astype(np.int64), empty, empty
  xs = x_values(rows, x)[pick]
  ys = np.asarray([number(rows[i][key]) for i in pick], np.float64)
  rounds = np.asarray([rows[i].get("round", i + 1) for i in pick], np.int64)
  return rounds, xs, ema(ys, smooth)


def series(
  rows: Rows, key: str, x: str = "rounds", smooth: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """``(x, values)`` of the rows that have ``key``: x as :func:`x_values`
  (int64 rounds for ``x="rounds"``), values float64 (None: NaN), smoothed by
  :func:`ema` with weight ``smooth``."""
  rounds, xs, ys = _points(rows, key, x, smooth)
  return (rounds if x == "rounds" else xs), ys


def curve_data(
  rows: Rows, x: str = "rounds", smooth: float | None = None
) -> dict[str, Curve]:
  """What :func:`plot_curves` draws, by metric key: the loss and accuracy
  curves of :data:`PANELS` (smoothed), the per-client test accuracy
  quantiles and the :data:`EXTRA_PANELS` metrics, each present in the rows.
  """
  check_args(x, smooth)
  out = {}
  for _, _, keys in PANELS:
    for key, _ in keys:
      out[key] = Curve(key, label(key), *series(rows, key, x, smooth))
  for key in QUANTILE_KEYS + tuple(p[2] for p in EXTRA_PANELS):
    out[key] = Curve(key, label(key), *series(rows, key, x))
  return {k: c for k, c in out.items() if c.x.size}


def band_data(
  runs: Sequence[Rows], key: str, x: str = "rounds", smooth: float | None = None
) -> Band | None:
  """A group's curve of ``key`` (None if some run lacks it): each run's
  points, smoothed by :func:`ema`, at the rounds every run has; the band is
  their mean and std over runs, drawn at the mean of the runs' x there
  (rounds, or their seconds or bytes)."""
  pts = [_points(rows, key, x, smooth) for rows in runs]
  if not pts:
    return None
  common = sorted(set.intersection(*(set(p[0].tolist()) for p in pts)))
  if not common:
    return None
  xs, ys = [], []
  for rounds, px, py in pts:
    at = {t: i for i, t in enumerate(rounds.tolist())}  # last row of a round
    idx = [at[t] for t in common]
    xs.append(px[idx])
    ys.append(py[idx])
  ys = np.asarray(ys)
  return Band(np.asarray(xs).mean(0), ys.mean(0), ys.std(0), len(runs))


def plot_runs(
  groups: Mapping[str, Sequence[Rows]],
  path: str | os.PathLike | None = None,
  title: str | None = None,
  panels=PANELS,
  *,
  x: str = "rounds",
  smooth: float | None = None,
  fmt: str | None = None,
) -> mpl_figure.Figure:
  """Overlays runs: ``{label: [rows of run 1, rows of run 2, ...]}``.

  A label with several runs is drawn as the mean and a ``mean +- std`` band
  (:func:`band_data`). Global-model train curves are solid, test curves
  dashed, local-training means dotted; one color per label.

  Args:
    groups: label -> the rows of each of its runs.
    path: where to save the figure (None: not saved).
    title: figure title.
    panels: ``(title, y label, [(key, line style)])`` per panel.
    x: ``"rounds"``, ``"seconds"`` or ``"bytes"`` (module docstring).
    smooth: EMA weight in [0, 1) (:func:`ema`), None: raw.
    fmt: ``"png"`` or ``"svg"``; None: from ``path``'s extension.

  Raises:
    ConfigError: bad ``x``/``smooth``/``fmt``, or a run without the columns
      ``x`` needs (the message names its label).
  """
  check_args(x, smooth, fmt)
  bands = {}
  for name, group in groups.items():
    for _, _, keys in panels:
      for key, _ in keys:
        try:
          bands[name, key] = band_data(group, key, x, smooth)
        except ConfigError as e:
          raise ConfigError(f"run {name!r}: {e}") from None
  fig = mpl_figure.Figure(
    figsize=(5.2 * len(panels), 4.0), layout="constrained"
  )
  axes = fig.subplots(1, len(panels), squeeze=False)[0]
  colors = [f"C{i % 10}" for i in range(len(groups))]
  many = len(groups) > 1
  for ax, (ptitle, ylabel, keys) in zip(axes, panels):
    for color, (name, group) in zip(colors, groups.items()):
      for key, style in keys:
        band = bands[name, key]
        if band is None:
          continue
        source = _source(key)
        text = name if many else label(key)
        if many and len(keys) > 1:
          text += f" ({SHORT.get(source, source)})"
        line = ax.plot(
          band.x,
          band.mean,
          style,
          color=color if many else COLORS.get(source),
          label=text + (f" (n={band.num_runs})" if band.num_runs > 1 else ""),
          marker="o" if key.startswith("test") and band.x.size <= 30 else None,
          markersize=3,
          linewidth=1.0 if style == ":" else 1.5,
        )[0]
        line.set_gid(f"{name}/{key}")
        if band.num_runs > 1:
          ax.fill_between(
            band.x,
            band.mean - band.std,
            band.mean + band.std,
            alpha=0.2,
            color=line.get_color(),
            linewidth=0,
          )
    _decorate(ax, ptitle, ylabel, x)
  return _finish(fig, title, path, fmt)


def plot_curves(
  rows: Rows,
  path: str | os.PathLike | None = None,
  title: str | None = None,
  *,
  x: str = "rounds",
  smooth: float | None = None,
  fmt: str | None = None,
) -> mpl_figure.Figure:
  """One run: the loss and accuracy of the global model on the training and
  test clients and the local-training means (module docstring), plus the
  spread of the per-client test accuracy (median, p25-p75 and p10-p90
  bands) if evaluated, and the uplink bytes per client (compressed updates)
  and the privacy spent (DP's epsilon) when the run reports them.

  The numbers drawn are :func:`curve_data`'s; each line's gid is its key.

  Args:
    rows: the run's metric rows (``metrics.jsonl``).
    path: where to save the figure (None: not saved).
    title: figure title.
    x: ``"rounds"``, ``"seconds"`` or ``"bytes"`` (module docstring).
    smooth: EMA weight in [0, 1) for the loss/accuracy curves, None: raw.
    fmt: ``"png"`` or ``"svg"``; None: from ``path``'s extension.
  """
  check_args(x, smooth, fmt)
  data = curve_data(rows, x, smooth)
  has_q = "test_accuracy_p50" in data
  extra = [p for p in EXTRA_PANELS if p[2] in data]
  n = 2 + has_q + len(extra)
  fig = mpl_figure.Figure(figsize=(5.2 * n, 4.0), layout="constrained")
  axes = fig.subplots(1, n)
  for ax, (ptitle, ylabel, keys) in zip(axes, PANELS):
    for key, style in keys:
      if key not in data:
        continue
      c = data[key]
      line = ax.plot(
        c.x,
        c.y,
        style,
        color=COLORS.get(_source(key)),
        label=c.label,
        markersize=3,
        marker="o" if key.startswith("test") and c.x.size <= 30 else None,
        linewidth=1.0 if style == ":" else 1.5,
      )[0]
      line.set_gid(key)
    _decorate(ax, ptitle, ylabel, x)
  if has_q:
    ax = axes[2]
    for lo, hi, alpha in (("p10", "p90", 0.15), ("p25", "p75", 0.3)):
      low = data.get(f"test_accuracy_{lo}")
      high = data.get(f"test_accuracy_{hi}")
      if low is not None and high is not None and low.x.size == high.x.size:
        ax.fill_between(
          low.x,
          low.y,
          high.y,
          alpha=alpha,
          color="C2",
          linewidth=0,
          label=f"clients {lo}-{hi}",
        )
    c = data["test_accuracy_p50"]
    line = ax.plot(
      c.x,
      c.y,
      color="C2",
      label="median client",
      markersize=3,
      marker="o" if c.x.size <= 30 else None,
    )[0]
    line.set_gid(c.key)
    _decorate(ax, "Per-client test accuracy", "accuracy", x)
  for ax, (ptitle, ylabel, key) in zip(axes[2 + has_q :], extra):
    c = data[key]
    ax.plot(c.x, c.y, "-", label=c.label)[0].set_gid(key)
    _decorate(ax, ptitle, ylabel, x)
  return _finish(fig, title, path, fmt)


def save(
  fig: mpl_figure.Figure, path: str | os.PathLike, fmt: str | None = None
) -> Path:
  """Saves ``fig`` as PNG or SVG; returns the file written.

  ``fmt`` None takes the format from ``path``'s extension (``.png`` or
  ``.svg``, else an error); a given ``fmt`` must agree with a ``.png``/
  ``.svg`` extension, and a name with neither gains ``.<fmt>``. SVGs carry
  no date, so the same figure gives the same file.
  """
  check_args(fmt=fmt)
  path = Path(path)
  suffix = path.suffix.lower().lstrip(".")
  if fmt is None:
    if suffix not in FORMATS:
      raise ConfigError(
        f"cannot tell the image format of {str(path)!r}: expected a file "
        "name ending in .png or .svg, or fmt='png' or 'svg'."
      )
    fmt = suffix
  elif suffix in FORMATS and suffix != fmt:
    raise ConfigError(
      f"fmt={fmt!r} contradicts the file name {path.name!r}; name it "
      f"{path.stem}.{fmt} or drop fmt."
    )
  elif suffix != fmt:
    path = path.with_name(f"{path.name}.{fmt}")
  fig.savefig(
    path,
    dpi=110,
    format=fmt,
    metadata={"Date": None} if fmt == "svg" else None,
  )
  return path


def _finish(
  fig: mpl_figure.Figure, title: str | None, path, fmt: str | None
) -> mpl_figure.Figure:
  if title:
    fig.suptitle(title)
  if path is not None:
    save(fig, path, fmt)
  return fig


def _decorate(ax, title: str, ylabel: str, x: str = "rounds") -> None:
  ax.set_title(title)
  ax.set_xlabel(X_AXES[x])
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  if ax.lines:
    ax.legend(fontsize=8)
