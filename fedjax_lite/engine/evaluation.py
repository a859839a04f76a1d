"""Federated evaluation: a model's metrics on every (or selected) client, vmapped.

Clients are processed in blocks (vmapped, sharded over the mesh like training);
each client's examples are padded to its size bucket and evaluated in batches.
Returns per-client metrics (for accuracy distributions across clients) and the
example-weighted averages.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedjax_lite import checks
from fedjax_lite.data.batching import (
  DeviceData,
  LocalWork,
  gather_client,
  to_device,
)
from fedjax_lite.data.federated_dataset import FederatedDataset
from fedjax_lite.engine.round import AXIS, auto_block_size, default_mesh
from fedjax_lite.models.core import Model


@dataclasses.dataclass(frozen=True)
class EvalResult:
  """Federated evaluation output.

  Attributes:
    per_client: name -> float64 ``[num_eval_clients]`` per-client means.
    num_examples: int ``[num_eval_clients]``.
    client_indices: int ``[num_eval_clients]`` population indices.
    mean: name -> example-weighted mean over all evaluated examples.
  """

  per_client: dict
  num_examples: np.ndarray
  client_indices: np.ndarray
  mean: dict

  def quantiles(
    self,
    name: str = "accuracy",
    q: Sequence[float] = (0.1, 0.25, 0.5, 0.75, 0.9),
  ) -> dict:
    """Quantiles of a per-client metric across clients."""
    v = self.per_client[name]
    return {f"p{int(round(x * 100))}": float(np.quantile(v, x)) for x in q}


_CACHE: dict = {}


def _eval_fn(
  model: Model, mesh: Mesh, bucket_size: int, batch_size: int, block: int
):
  key = (id(model), id(mesh), bucket_size, batch_size, block)
  if key in _CACHE:
    return _CACHE[key][1]
  nd = mesh.shape[AXIS]
  work = LocalWork(batch_size=batch_size, num_epochs=1, shuffle=False)

  def one(params, data, cid):
    cd = gather_client(data, cid, jax.random.PRNGKey(0), work, bucket_size)

    def step(acc, inp):
      batch, mask = inp
      stats = model.evaluate_batch(params, batch, mask)
      return jax.tree.map(jnp.add, acc, stats), None

    first = jax.tree.map(lambda v: v[0], cd.batches)
    shape = jax.eval_shape(model.evaluate_batch, params, first, cd.mask[0])
    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shape)
    acc, _ = jax.lax.scan(step, zero, (cd.batches, cd.mask))
    return acc

  def run(params, data, ids):
    # ids: [num_blocks, nd * block]
    def body(_, blk_ids):
      if nd > 1:
        blk_ids = jax.lax.with_sharding_constraint(
          blk_ids, NamedSharding(mesh, P(AXIS))
        )
      return None, jax.vmap(one, in_axes=(None, None, 0))(params, data, blk_ids)

    _, out = jax.lax.scan(body, None, ids)
    return out

  # Replicated per-client sums: every process of a multi-process run can
  # read them (a small all-gather at the end).
  fn = jax.jit(run, out_shardings=NamedSharding(mesh, P()))
  _CACHE[key] = (model, fn)  # keep model alive so id() stays unique
  return fn


def evaluate(
  model: Model,
  params: Any,
  data: FederatedDataset | DeviceData,
  *,
  clients: Sequence[int] | None = None,
  batch_size: int | None = 256,
  mesh: Mesh | None = None,
  block_size: int | None = None,
) -> EvalResult:
  """Evaluates ``params`` on every client (or ``clients``) of ``data``.

  Args:
    model: the model.
    params: global parameters.
    data: a dataset (uploaded here) or :class:`DeviceData`.
    clients: population indices to evaluate (default all).
    batch_size: evaluation batch size (None: a client's data in one batch).
    mesh: device mesh (default all devices).
    block_size: clients per device per block (default automatic).
  """
  mesh = mesh if mesh is not None else default_mesh()
  nd = mesh.shape[AXIS]
  if isinstance(data, DeviceData) and data.sharded:
    raise ValueError(
      "evaluate needs replicated data; this DeviceData is client-sharded. "
      "Pass the FederatedDataset (it is uploaded replicated) or a "
      "replicated upload (engine.put_data(dataset))."
    )
  if isinstance(data, FederatedDataset):
    checks.model_features(
      model, data.features, "evaluate data", labels_required=False
    )
    data = to_device(
      data,
      LocalWork(batch_size=batch_size, num_epochs=1),
      "auto",
      sharding=NamedSharding(mesh, P()),
    )
  counts = np.asarray(data.counts)
  bucket = np.asarray(data.bucket)
  c = counts.size
  idx = np.arange(c) if clients is None else np.asarray(clients, np.int64)
  if idx.size == 0:
    raise ValueError("clients is empty; expected at least one client index.")
  if idx.min() < 0 or idx.max() >= c:
    raise IndexError(f"clients must index the {c} clients of data.")
  params = jax.device_put(params, NamedSharding(mesh, P()))
  per_example = sum(
    math.prod(v.shape[1:]) * v.dtype.itemsize for v in data.features.values()
  )
  sums: dict = {}
  cnts: dict = {}
  for j, L in enumerate(data.bucket_sizes):
    where = np.nonzero(bucket[idx] == j)[0]
    if where.size == 0:
      continue
    sel = idx[where]
    bs = L if batch_size is None else min(batch_size, L)
    steps = math.ceil(L / bs)
    platform = mesh.devices.reshape(-1)[0].platform
    blk = block_size or auto_block_size(
      steps * bs * per_example * 2, math.ceil(sel.size / nd), platform
    )
    width = nd * blk
    nblk = math.ceil(sel.size / width)
    padded = np.zeros(nblk * width, np.int32)
    padded[: sel.size] = sel
    fn = _eval_fn(model, mesh, L, bs, blk)
    ids = jax.device_put(padded.reshape(nblk, width), NamedSharding(mesh, P()))
    out = fn(params, data, ids)
    for name, (s, n) in out.items():
      sums.setdefault(name, np.zeros(idx.size))[where] = np.asarray(s).reshape(
        -1
      )[: sel.size]
      cnts.setdefault(name, np.zeros(idx.size))[where] = np.asarray(n).reshape(
        -1
      )[: sel.size]
  per_client = {k: sums[k] / np.maximum(cnts[k], 1e-12) for k in sums}
  mean = {k: float(sums[k].sum() / max(cnts[k].sum(), 1e-12)) for k in sums}
  return EvalResult(
    per_client=per_client,
    num_examples=counts[idx],
    client_indices=idx,
    mean=mean,
  )
