"""Parameter files: reading a model's parameters back, checked against a model.

Two formats hold a parameter pytree:

* a flax msgpack file (``flax.serialization.msgpack_serialize`` of the
  params' state dict, as :func:`fedjax_lite.experiment.export_params`
  writes it): nested dicts whose leaves are arrays, readable with
  ``flax.serialization.from_bytes(model.init(key), data)`` too;
* an orbax folder (``orbax.checkpoint.StandardCheckpointer``), needs
  orbax-checkpoint.

:func:`read_params` reads either; given a ``target`` (e.g. a model's init) it
checks every leaf's path, shape and dtype (:func:`fit_params`) and returns
the tree in the target's structure. :meth:`fedjax_lite.models.Model.
load_params` is :func:`read_params` with the model's own init as target.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import flax.serialization
import jax
import numpy as np

from fedjax_lite import _optional

PyTree = Any


def orbax_checkpoint():
  """``orbax.checkpoint``, imported now; a missing library raises
  :class:`~fedjax_lite._optional.MissingExtraError` with the ``export``
  extra's one-line install hint."""
  return _optional.require("orbax.checkpoint", "export")


def leaf_name(path: tuple[str, ...]) -> str:
  """``("Dense_0", "kernel")`` -> ``"['Dense_0']['kernel']"``."""
  return "".join(f"[{k!r}]" for k in path) or "(the root)"


def flat_state(tree: Any, prefix: tuple[str, ...] = ()) -> dict:
  """``{key path: leaf}`` of a state dict (nested dicts), in order."""
  if isinstance(tree, dict):
    out: dict = {}
    for k, v in tree.items():
      out.update(flat_state(v, prefix + (str(k),)))
    return out
  return {prefix: tree}


def _shape_dtype(x) -> tuple[tuple[int, ...], np.dtype]:
  if hasattr(x, "shape") and hasattr(x, "dtype"):  # arrays, ShapeDtypeStruct
    return tuple(x.shape), np.dtype(x.dtype)
  a = np.asarray(x)
  return a.shape, a.dtype


def fit_params(
  target: PyTree, tree: Any, where: str = "params", what: str = "the model"
) -> PyTree:
  """``tree`` (a state dict: nested dicts of arrays) in the structure of
  ``target``, after checking that both have the same leaves.

  Args:
    target: the expected pytree (e.g. ``model.init(key)``; arrays or
      ``jax.ShapeDtypeStruct`` leaves: only paths, shapes and dtypes are
      used).
    tree: what was read (e.g. ``flax.serialization.msgpack_restore``'s
      output).
    where: names ``tree``'s source in errors.
    what: names ``target``'s owner in errors (e.g. ``"model 'mlp'"``).

  Raises:
    ValueError: naming the first leaf (in ``target``'s order) that ``tree``
      lacks or holds with another shape or dtype, else the first leaf of
      ``tree`` that ``target`` lacks.
  """
  want = flat_state(flax.serialization.to_state_dict(target))
  got = flat_state(tree)
  for path, leaf in want.items():
    name = leaf_name(path)
    if path not in got:
      raise ValueError(
        f"{where} has no leaf {name}, which {what} has (shape "
        f"{_shape_dtype(leaf)[0]}); expected the parameters of the same "
        f"model (its leaves: {[leaf_name(p) for p in got][:4]})."
      )
    (ws, wd), (gs, gd) = _shape_dtype(leaf), _shape_dtype(got[path])
    if ws != gs or wd != gd:
      raise ValueError(
        f"{where}: leaf {name} has shape {gs} {gd} but {what} expects "
        f"{ws} {wd}; was the model built with other sizes?"
      )
  extra = [p for p in got if p not in want]
  if extra:
    raise ValueError(
      f"{where} has leaf {leaf_name(extra[0])} (shape "
      f"{_shape_dtype(got[extra[0]])[0]}) that {what} does not have; "
      "expected the parameters of the same model."
    )
  return flax.serialization.from_state_dict(target, tree)


def read_params(
  path: str | os.PathLike, target: PyTree = None, *, what: str = "the model"
) -> PyTree:
  """Reads a parameter file (msgpack) or folder (orbax).

  Args:
    path: a file written by :func:`fedjax_lite.experiment.export_params`
      (or any flax msgpack of a params tree), or an orbax folder.
    target: None, or the pytree the params should fit (see
      :func:`fit_params`): they come back in its structure.
    what: names ``target``'s owner in errors.

  Returns:
    The params with numpy leaves: nested dicts as written (flax models'
    params are nested dicts; other containers come back as dicts keyed
    ``"0"``, ``"1"``, ... unless ``target`` gives the structure).

  Raises:
    FileNotFoundError: nothing at ``path``.
    ValueError: the file is not a params file, or does not fit ``target``.
  """
  path = Path(path)
  if path.is_dir():
    ocp = orbax_checkpoint()
    try:
      with ocp.StandardCheckpointer() as ckptr:
        tree = ckptr.restore(path.resolve())
    except Exception as e:  # orbax raises several types for other folders
      raise ValueError(
        f"{path} is a folder but not an orbax checkpoint of params "
        f"({type(e).__name__}: {' '.join(str(e).split())[:300]}); expected "
        "a folder written by export_params(..., format='orbax')."
      ) from e
    tree = jax.tree.map(np.asarray, tree)
  elif path.is_file():
    try:
      tree = flax.serialization.msgpack_restore(path.read_bytes())
    except Exception as e:  # msgpack raises several types for bad bytes
      raise ValueError(
        f"{path} is not a msgpack params file ({type(e).__name__}: {e}); "
        "expected a file written by export_params (or flax "
        "msgpack_serialize)."
      ) from e
  else:
    raise FileNotFoundError(
      f"no params file or folder at {path}; expected a file written by "
      "`python -m fedjax_lite export RUN_DIR --out FILE`."
    )
  if isinstance(tree, dict) and {"format", "state", "meta"} <= set(tree):
    raise ValueError(
      f"{path} is a run's checkpoint (the whole engine state), not a params "
      "file; export the global model's params with `python -m fedjax_lite "
      "export RUN_DIR --out params.msgpack`."
    )
  if not isinstance(tree, dict) or not jax.tree.leaves(tree):
    raise ValueError(
      f"{path} holds {type(tree).__name__} with no arrays; expected a "
      "params tree (nested dicts of arrays)."
    )
  if target is not None:
    return fit_params(target, tree, str(path), what)
  return tree
