"""Checkpoints: the whole :class:`EngineState` plus runner bookkeeping, as msgpack.

A checkpoint file is ``flax.serialization`` msgpack (no pickle) of::

  {"format": 1, "state": <state dict of the EngineState>, "meta": {...}}

The EngineState holds the server params, optimizer states, client states, the
base rng and the round counter; clients are sampled with
``fold_in(rng, round)`` (the sampler keeps no state), so restoring it makes the
next round exactly the one an uninterrupted run would compute. Files are
written atomically: temp file in the same folder, ``fsync``, ``os.replace``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import flax.serialization
import jax
import numpy as np

FORMAT = 1


class DamagedCheckpointError(ValueError):
  """A checkpoint file whose bytes cannot be decoded."""


@contextlib.contextmanager
def naming(path: str | os.PathLike):
  """Re-raises an ``OSError`` without a file name (a failed ``write`` or
  ``fsync``, e.g. ``ENOSPC``) as the same error naming ``path``."""
  try:
    yield
  except OSError as e:
    if e.filename is not None or e.errno is None:
      raise
    raise type(e)(e.errno, e.strerror, str(path)) from None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes ``data`` to ``path`` so readers see the old or the new file only."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(
    prefix=f".{path.name}.", suffix=".tmp", dir=path.parent
  )
  try:
    with naming(path), os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    try:
      os.unlink(tmp)
    except FileNotFoundError:
      pass
    raise
  try:  # make the rename itself durable
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
      os.fsync(dfd)
    finally:
      os.close(dfd)
  except OSError:  # pragma: no cover - e.g. file systems without dir fsync
    pass


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  atomic_write_bytes(path, text.encode("utf-8"))


def _to_host(tree: Any) -> Any:
  return jax.tree.map(np.asarray, jax.device_get(tree))


def save_checkpoint(
  path: str | os.PathLike, state: Any, meta: dict | None = None
) -> None:
  """Atomically writes ``state`` (any flax-serializable pytree) and ``meta``.

  Args:
    path: the checkpoint file (e.g. ``runs/x/checkpoint.msgpack``).
    state: e.g. an EngineState; device arrays are copied to host.
    meta: JSON-like runner bookkeeping (next round, elapsed time, ...).
  """
  payload = {
    "format": FORMAT,
    "state": flax.serialization.to_state_dict(_to_host(state)),
    "meta": meta or {},
  }
  atomic_write_bytes(path, flax.serialization.msgpack_serialize(payload))


def load_checkpoint(path: str | os.PathLike, target: Any) -> tuple[Any, dict]:
  """Restores a checkpoint into the structure of ``target``.

  Args:
    path: a file written by :func:`save_checkpoint`.
    target: a pytree with the checkpoint's structure (e.g. a freshly
      initialised EngineState); only its structure and dtypes are used.

  Returns:
    ``(state, meta)`` with numpy leaves.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(
      f"no checkpoint at {path}; a run folder holds "
      "checkpoint.msgpack once a round has finished."
    )
  try:
    raw = flax.serialization.msgpack_restore(path.read_bytes())
  except Exception as e:  # msgpack raises several types for bad bytes
    raise DamagedCheckpointError(
      f"checkpoint {path} is damaged ({type(e).__name__}: {e}); it was "
      "truncated or overwritten outside fedjax_lite (its own writes are "
      "atomic). Restore it from a backup, or delete the run folder and "
      "start the run again."
    ) from e
  if not isinstance(raw, dict) or raw.get("format") != FORMAT:
    raise ValueError(
      f"{path} is not a fedjax_lite checkpoint (format "
      f"{FORMAT}); got keys {sorted(raw) if isinstance(raw, dict) else type(raw).__name__}."
    )
  host_target = _to_host(target)
  try:
    state = flax.serialization.from_state_dict(host_target, raw["state"])
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(
      f"checkpoint {path} does not match the experiment's state "
      f"structure ({e}); was the experiment or its config "
      "changed since the checkpoint was written?"
    ) from e
  for want, got in zip(jax.tree.leaves(host_target), jax.tree.leaves(state)):
    if (
      np.shape(want) != np.shape(got)
      or np.asarray(want).dtype != np.asarray(got).dtype
    ):
      raise ValueError(
        f"checkpoint {path} holds an array of shape "
        f"{np.shape(got)} {np.asarray(got).dtype} where the "
        f"experiment expects {np.shape(want)} "
        f"{np.asarray(want).dtype}; was the config changed?"
      )
  return state, dict(raw.get("meta") or {})
