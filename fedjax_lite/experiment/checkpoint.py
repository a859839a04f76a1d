"""Checkpoints: the whole :class:`EngineState` plus runner bookkeeping, as msgpack.

A checkpoint file is ``flax.serialization`` msgpack (no pickle) of::

  {"format": 1, "state": <state dict of the EngineState>, "meta": {...}}

The EngineState holds the server params, optimizer states, client states, the
base rng and the round counter; clients are sampled with
``fold_in(rng, round)`` (the sampler keeps no state), so restoring it makes the
next round exactly the one an uninterrupted run would compute. Files are
written atomically: temp file in the same folder, ``fsync``, ``os.replace``,
with the mode a plain ``open()`` gives (the umask applies: ``0o644`` under
umask ``022``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
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


def _create_temp(path: Path) -> tuple[int, Path]:
  """Creates ``.<name>.<random>.tmp`` next to ``path`` for writing.

  Its mode is what a plain ``open(path, "w")`` would leave: the mode of the
  file it replaces, else ``0o666`` less the process umask (``0o644`` under
  umask ``022``, ``0o600`` under ``077``). ``tempfile.mkstemp`` would make
  it ``0o600`` whatever the umask.
  """
  existing = None
  try:
    existing = stat.S_IMODE(os.stat(path).st_mode)
  except OSError:
    pass
  flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
  for _ in range(100):
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
      fd = os.open(tmp, flags, 0o666)  # the kernel applies the umask
    except FileExistsError:
      continue
    if existing is not None:
      try:
        os.fchmod(fd, existing)
      except OSError:  # pragma: no cover - e.g. a file system without modes
        pass
    return fd, tmp
  raise FileExistsError(  # pragma: no cover - 100 random names taken
    errno.EEXIST, "no free temporary file name", str(path)
  )


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes ``data`` to ``path`` so readers see the old or the new file only.

  The bytes go to a temporary file in the same folder, are ``fsync``-ed and
  renamed over ``path`` (``os.replace``), then the folder is ``fsync``-ed.
  Missing folders are made as ``mkdir`` makes them. The file gets the mode
  a plain ``open(path, "w")`` gives: the replaced file's, or ``0o666`` less
  the umask for a new file (``0o644`` under umask ``022``).
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = _create_temp(path)
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


def _key_paths(tree: Any, prefix: str = "") -> set[str]:
  """The ``a/b/c`` paths of a state dict's leaves (empty dicts count)."""
  if isinstance(tree, dict):
    if not tree:
      return {prefix + "{}"}
    out: set[str] = set()
    for k, v in tree.items():
      out |= _key_paths(v, f"{prefix}{k}/")
    return out
  return {prefix.rstrip("/")}


def state_signature(state: Any) -> list[str]:
  """``"path shape dtype"`` of every leaf of ``state``: what a checkpoint
  records of the model and algorithm it belongs to."""
  flat, _ = jax.tree_util.tree_flatten_with_path(state)
  return [
    f"{jax.tree_util.keystr(p)} {tuple(np.shape(x))} {np.dtype(x.dtype)}"
    for p, x in flat
  ]


def check_identity(path: Path, meta: dict, identity: dict) -> None:
  """Raises ``ValueError`` if a checkpoint's recorded identity (its
  experiment file's hash, its state's leaf paths, shapes and dtypes)
  differs from ``identity``; checkpoints without one are not checked."""
  have = meta.get("identity")
  if not isinstance(have, dict):
    return
  for key in sorted(set(have) & set(identity)):
    a, b = have[key], identity[key]
    if a == b:
      continue
    if isinstance(a, list) and isinstance(b, list):
      diff = sorted(set(a) ^ set(b))
      what = f"{key} differs (e.g. {diff[:2]}; {len(a)} vs {len(b)} entries)"
    else:
      what = f"{key} is {a!r} in the checkpoint but {b!r} here"
    raise ValueError(
      f"checkpoint {path} belongs to another experiment or model: {what}. "
      "Resume a run folder with the experiment that wrote it."
    )


def read_checkpoint(path: str | os.PathLike) -> dict:
  """The decoded payload of a checkpoint file, without a target structure.

  Returns:
    ``{"format": 1, "state": <nested dicts of numpy arrays>, "meta": {...}}``
    as :func:`save_checkpoint` wrote it (the state's containers are the
    ``flax.serialization`` state dicts: dataclass fields and tuple
    positions are dict keys).

  Raises:
    FileNotFoundError: no file at ``path``.
    DamagedCheckpointError: the bytes cannot be decoded.
    ValueError: the file is msgpack but not a fedjax_lite checkpoint.
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
    got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
    raise ValueError(
      f"{path} is not a fedjax_lite checkpoint (format {FORMAT}); got "
      f"keys {got}."
    )
  return raw


def load_checkpoint(
  path: str | os.PathLike, target: Any, identity: dict | None = None
) -> tuple[Any, dict]:
  """Restores a checkpoint into the structure of ``target``.

  Args:
    path: a file written by :func:`save_checkpoint`.
    target: a pytree with the checkpoint's structure (e.g. a freshly
      initialised EngineState); only its structure and dtypes are used.
    identity: compared with the identity the checkpoint recorded (see
      :func:`check_identity`) before anything is restored.

  Returns:
    ``(state, meta)`` with numpy leaves.
  """
  path = Path(path)
  raw = read_checkpoint(path)
  if identity is not None:
    check_identity(path, dict(raw.get("meta") or {}), identity)
  host_target = _to_host(target)
  want_keys = _key_paths(flax.serialization.to_state_dict(host_target))
  got_keys = _key_paths(raw["state"])
  if want_keys != got_keys:  # from_state_dict would ignore extra keys
    extra, missing = sorted(got_keys - want_keys), sorted(want_keys - got_keys)
    raise ValueError(
      f"checkpoint {path} holds another state structure: "
      + (f"entries {extra[:3]} the experiment does not have" if extra else "")
      + ("; " if extra and missing else "")
      + (f"no entries {missing[:3]} the experiment needs" if missing else "")
      + ". It belongs to another model or experiment."
    )
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
