"""Input checks shared by the whole package (the bottom layer: imports nothing
of fedjax_lite).

Every check raises ``ValueError`` (``TypeError`` for a wrong kind of object)
whose message names the argument, what arrived and what was expected, so a
user meets the same wording for the same mistake everywhere. ``bool`` is
never accepted where a count is expected (``True`` is an ``int`` in Python,
but ``num_epochs=True`` is a mistake).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np


class DataError(ValueError):
  """Data that does not fit the model (features, shapes, labels); the
  command line reports it as one ``error:`` line with exit status 2."""


def is_int(value: Any) -> bool:
  """A Python or numpy integer, not a bool."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def int_at_least(
  name: str,
  value: Any,
  minimum: int,
  *,
  allow_none: bool = False,
  hint: str = "",
) -> Any:
  """Checks that ``value`` is an int ``>= minimum`` (or None if allowed).

  Args:
    name: the argument's name, as the user wrote it.
    value: what arrived.
    minimum: the smallest valid value.
    allow_none: accept None (e.g. "automatic").
    hint: appended to the message (e.g. what None means).

  Returns:
    ``value`` unchanged (a Python int for numpy integers).
  """
  if value is None and allow_none:
    return None
  if not is_int(value) or value < minimum:
    what = {1: "a positive int", 0: "an int >= 0"}.get(
      minimum, f"an int >= {minimum}"
    )
    if allow_none:
      what += " or None"
    raise ValueError(f"{name} must be {what}{hint}, got {value!r}.")
  return int(value)


def positive_int(
  name: str, value: Any, *, allow_none: bool = False, hint: str = ""
) -> Any:
  """``int_at_least(name, value, 1, ...)``."""
  return int_at_least(name, value, 1, allow_none=allow_none, hint=hint)


def positive_ints(**values) -> None:
  """Checks several named positive ints at once."""
  for name, value in values.items():
    positive_int(name, value)


def as_real(value: Any) -> float | None:
  """``value`` as a float if it is one real number (a Python or numpy int or
  float, or a 0-d integer/float array; never a bool), else None."""
  if isinstance(value, (bool, np.bool_)):
    return None
  if isinstance(value, numbers.Real):
    return float(value)
  dtype = getattr(value, "dtype", None)
  if (
    dtype is not None
    and np.ndim(value) == 0
    and (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating))
  ):
    return float(value)
  return None


def real(name: str, value: Any) -> float:
  """Checks that ``value`` is one real number, not NaN; returns a float.

  Raises:
    TypeError: for anything else than a real number (a str, a list, a bool).
    ValueError: for NaN.
  """
  v = as_real(value)
  if v is None:
    raise _not_real(name, value)
  if math.isnan(v):
    raise ValueError(f"{name} must be a number, got nan.")
  return v


def _not_real(name: str, value: Any) -> TypeError:
  return TypeError(
    f"{name} must be a real number, got {type(value).__name__} ({value!r:.60})."
  )


def _interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
  """``"a number in [0, 1)"``, or ``"a finite number > 0"`` for ``high=inf``."""
  if high == math.inf:
    return f"a finite number {'>' if low_open else '>='} {low:g}"
  left, right = "(" if low_open else "[", ")" if high_open else "]"
  return f"a number in {left}{low:g}, {high:g}{right}"


def in_range(
  name: str,
  value: Any,
  low: float,
  high: float,
  *,
  low_open: bool = False,
  high_open: bool = True,
  expected: str | None = None,
  hint: str = "",
) -> float:
  """Checks ``low <(=) value <(=) high`` for a real number; returns a float.

  ``high=math.inf`` asks for a finite number (inf is never inside). The
  message reads ``"{name} must be {expected}{hint}, got {value!r}."``.

  Args:
    name: the argument's name, as the user wrote it.
    value: what arrived.
    low, high: the interval's ends.
    low_open, high_open: exclude that end.
    expected: what the message says is expected; default the interval
      (``"a number in (0, 1]"``, ``"a finite number >= 0"``).
    hint: appended to ``expected`` (what the value means, how to fix it).

  Raises:
    TypeError: for a value that is not a real number (see :func:`real`).
    ValueError: for NaN or a value outside the interval.
  """
  v = as_real(value)
  if v is None:
    raise _not_real(name, value)
  ok = (v > low if low_open else v >= low) and (
    v < high if high_open or high == math.inf else v <= high
  )
  if not ok:
    what = expected or _interval(low, high, low_open, high_open)
    raise ValueError(f"{name} must be {what}{hint}, got {value!r}.")
  return v


def positive_float(
  name: str, value: Any, *, allow_zero: bool = False, hint: str = ""
) -> float:
  """A finite real number ``> 0`` (``>= 0`` with ``allow_zero``)."""
  return in_range(
    name,
    value,
    0.0,
    math.inf,
    low_open=not allow_zero,
    expected=(
      "a non-negative finite number"
      if allow_zero
      else "a positive finite number"
    ),
    hint=hint,
  )


def model_features(
  model: Any, features: Any, where: str = "data", labels_required: bool = True
) -> None:
  """The model's input (and label) features are present and labels valid.

  Args:
    model: a :class:`fedjax_lite.models.Model`.
    features: feature name -> array (e.g. ``FederatedDataset.features``).
    where: names the data in messages ("dataset", "test data", ...).
    labels_required: also require the label feature (training data).
  """
  needed = [model.input_key] + ([model.label_key] if labels_required else [])
  missing = [k for k in needed if k not in features]
  if missing:
    raise DataError(
      f"{where} has features {sorted(features)}; the model "
      f"needs inputs {model.input_key!r} and labels "
      f"{model.label_key!r} (missing {missing})."
    )
  if model.label_key in features and model.num_classes is not None:
    model.validate_labels(features[model.label_key], where)
  model.check_inputs(features, where)


def instance_of(
  name: str, value: Any, kind: type | tuple[type, ...], hint: str = ""
) -> Any:
  """Checks ``isinstance(value, kind)`` (one type or a tuple of types);
  ``TypeError`` naming what arrived."""
  if not isinstance(value, kind):
    kinds = kind if isinstance(kind, tuple) else (kind,)
    article = "an" if kinds[0].__name__[:1] in "AEIOU" else "a"
    names = " or ".join(k.__name__ for k in kinds)
    raise TypeError(
      f"{name} must be {article} {names}{hint}, got {type(value).__name__}."
    )
  return value


def optimizer_factories(**fns) -> None:
  """Checks that each ``name=fn`` is callable (a no-argument function returning
  an optax optimizer, as TFF-style builders take); ``TypeError`` otherwise."""
  for name, fn in fns.items():
    if not callable(fn):
      raise TypeError(
        f"{name} must be a no-argument function returning an "
        f"optax optimizer, got {type(fn).__name__}."
      )


def per_client(
  name: str, length: int, num_clients: int | None, hint: str = ""
) -> None:
  """Checks that an array indexed by client id has one entry per client.

  A jitted gather clamps an out-of-range index to the last entry, so an array
  shorter than the population silently gives the remaining clients the last
  entry's value. Call it where the population is known, e.g. at trace time
  with ``ClientData.num_clients`` (set by the engine's gather; None, and
  nothing is checked, for hand-made client data).

  Args:
    name: the argument's name, as the user wrote it.
    length: its number of entries (leading axis).
    num_clients: the population size, or None if unknown.
    hint: appended to the message (how to build the array).
  """
  if num_clients is not None and length != num_clients:
    raise ValueError(
      f"{name} has {length} entries for a population of {num_clients} "
      f"clients (it is indexed by client id); expected {num_clients}, one "
      f"per client{hint}."
    )


def index_array(
  name: str,
  values: Any,
  size: int,
  *,
  what: str = "index",
  of: str = "",
  unique: bool = False,
) -> np.ndarray:
  """Checks user-given indices into an axis of ``size`` entries, on the host.

  A jitted gather clamps an index outside ``[0, size)`` and numpy wraps a
  negative one, so a wrong index would silently read another entry: check
  before any gather.

  Args:
    name: the argument's name, as the user wrote it.
    values: the indices (any 1-D integer array-like; bools are refused).
    size: the length of the indexed axis.
    what: what one index names in messages ("row", "client", ...).
    of: what is indexed, for messages (e.g. ``"x_source"``).
    unique: also require distinct indices.

  Returns:
    The indices as an int64 numpy array.
  """
  arr = np.asarray(values)
  if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(
      f"{name} must be 1-D integer {what} indices, got dtype {arr.dtype} "
      f"shape {arr.shape}."
    )
  arr = arr.astype(np.int64)
  bad = np.flatnonzero((arr < 0) | (arr >= size))
  if bad.size:
    i = int(bad[0])
    where = f" (the {size} {what}s of {of})" if of else ""
    raise ValueError(
      f"{name} has {what} {int(arr[i])} at position {i}; expected {what}s "
      f"in [0, {size}){where}."
    )
  if unique and arr.size:
    uniq, counts = np.unique(arr, return_counts=True)
    if np.any(counts > 1):
      v = int(uniq[np.argmax(counts > 1)])
      pos = np.flatnonzero(arr == v)[:2].tolist()
      raise ValueError(
        f"{name} repeats {what} {v} (positions {pos[0]} and {pos[1]}); "
        f"expected distinct {what}s."
      )
  return arr
