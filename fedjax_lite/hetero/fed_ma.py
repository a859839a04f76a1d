r"""FedMA: federated matched averaging, layer by layer, with growing layers.

Wang, Yurochkin, Sun, Papailiopoulos and Khazaeni, ICLR 2020, "Federated
Learning with Matched Averaging" (arXiv:2002.06440), Algorithm 1 with
communication rounds, for the MLP and the FedAvg CNN
(:mod:`fedjax_lite.hetero.layers`).

Hidden units are permutation invariant, so averaging the ``i``-th unit of
every client (FedAvg) averages unrelated units. FedMA instead *matches* them:
for hidden layer ``l = 1..L`` in turn,

1. every client ``j`` trains its layers ``l..L+1`` with the matched layers
   ``< l`` frozen;
2. the server matches the clients' layer-``l`` neurons (incoming weights and
   bias; for the last hidden layer also the outgoing weights to the classes)
   with BBP-MAP (:mod:`fedjax_lite.hetero.matching`, the Hungarian algorithm),
   which assigns every client neuron to a global neuron or opens a new one
   (the global layer can grow, up to the model's width), and broadcasts the
   matched average ``W_l`` with each client's assignment ``pi_j``;
3. client ``j`` replaces its layer ``l`` by ``W_l`` (now the global width) and
   moves the input rows of its layer ``l+1`` to the global positions:
   ``W^j_{l+1}[pi_j(u), :] = W^j_{l+1}[u, :]`` (rows of global neurons it
   does not hold start at zero);

and after the last hidden layer the clients train the output layer, which the
server averages per class with the clients' class proportions,
``W_{L+1}[:, c] = \sum_j p_{jc} W^j_{L+1}[:, c]``, ``p_{jc} = n_{jc} / \sum_j
n_{jc}``. At the start of the next round client ``j`` rebuilds a model of its
own widths from the global one: its neuron ``u`` of layer ``l`` takes the
global neuron ``pi_j(u)`` (rows from the previous layer's assignment), so
clients with different hidden widths (different architectures) all map into,
and out of, one global model.

Engine mapping. One :class:`~fedjax_lite.Engine` round is one *stage*
(``L + 1`` stages make a FedMA round). Local training is the engine's vmapped,
jitted client update: the frozen layers get zero gradients and every
client's model lives in the padded global shapes with width masks (units
beyond its width are exactly zero, :mod:`fedjax_lite.hetero.layers`); the
clients' models persist across stages as engine client state. The matching
needs every client's neurons, not their mean: each client sends its neurons
in row ``slot`` of a ``[J, ...]`` array (zeros elsewhere) with weight 1, so
the engine's mean times the total weight is the stacked neurons; the server
update then runs the Hungarian matching on the host through
``jax.pure_callback`` (the one inherently host-side, per-client step:
:class:`FedMAMatching`, which also holds the static layout of the model and
the clients). The
round must sample every client in the same slot each stage:
``RoundConfig(num_clients, sampling="all")``. Run the engine on a ONE-device
mesh (``fl.engine.default_mesh(jax.devices()[:1])``; :class:`FedMAProcess`
does): on a multi-device CPU mesh the other devices wait in a collective
while device 0 runs the host callback, and XLA's CPU runtime can deadlock
there and abort the process after 40 s (observed with 2 devices).

Communication per client and FedMA round: up, every layer once (its neurons
at stage ``l``); down, every matched global layer once plus its assignment.
Compute: ``L + 1`` local trainings per round (FedAvg: one).

Shapes: one client's data ``[steps, batch, ...]``; ``J`` = population.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lite import checks
from fedjax_lite.algorithms.base import ClientOutput, FederatedAlgorithm
from fedjax_lite.algorithms.local import local_train
from fedjax_lite.data.batching import LocalWork
from fedjax_lite.engine.round import (
  Engine,
  EngineState,
  RoundConfig,
  default_mesh,
)
from fedjax_lite.hetero import layers as L
from fedjax_lite.hetero import matching
from fedjax_lite.models.core import Model

PyTree = Any


# ------------------------------------------------------------ neuron vectors
def _in_dims(layer: L.Layer, kernel_shape) -> int:
  return int(np.prod(kernel_shape[:-1]))


def layer_atoms(params: PyTree, chain, l: int) -> jax.Array:
  """Layer ``l``'s neurons as rows ``[width_l, D]``.

  Each row is the neuron's incoming kernel entries (in kernel order), its
  bias and, when the next layer is the output layer, its outgoing weights.
  """
  layer = chain[l]
  k, b = params[layer.name]["kernel"], params[layer.name]["bias"]
  rows = [k.reshape(-1, k.shape[-1]).T, b[:, None]]
  if l + 1 == len(chain) - 1:
    nxt = chain[l + 1]
    view, axis = L.unit_view(params[nxt.name]["kernel"], nxt)
    rows.append(jnp.moveaxis(view, axis, 0).reshape(view.shape[axis], -1))
  return jnp.concatenate(rows, axis=1)


def atom_dim_mask(chain, l: int, kernel_shape, in_mask) -> np.ndarray:
  """bool ``[D]``: the atom entries that read active inputs (host)."""
  layer = chain[l]
  n_in = _in_dims(layer, kernel_shape)
  if in_mask is None:
    m = np.ones(n_in, bool)
  else:
    m = np.asarray(in_mask) > 0
    reps = n_in // m.size
    m = np.tile(m, reps)
  parts = [m, np.ones(1, bool)]
  if l + 1 == len(chain) - 1:
    nxt = chain[l + 1]
    parts.append(np.ones(nxt.in_repeat * nxt.width, bool))
  return np.concatenate(parts)


def set_layer_from_atoms(params: PyTree, chain, l: int, atoms) -> PyTree:
  """Params with layer ``l``'s kernel and bias taken from ``atoms [W, D]``."""
  layer = chain[l]
  k = params[layer.name]["kernel"]
  n_in = _in_dims(layer, k.shape)
  kernel = atoms[:, :n_in].T.reshape(k.shape[:-1] + (atoms.shape[0],))
  new = dict(params)
  new[layer.name] = {"kernel": kernel, "bias": atoms[:, n_in]}
  if l + 1 == len(chain) - 1:  # the matched outgoing weights
    nxt = chain[l + 1]
    out = atoms[:, n_in + 1 :].reshape(atoms.shape[0], nxt.in_repeat, nxt.width)
    out = jnp.moveaxis(out, 0, 1).reshape(-1, nxt.width)
    new[nxt.name] = {"kernel": out, "bias": params[nxt.name]["bias"]}
  return new


def fill_unheld_inputs(
  kernel: jax.Array,
  glob: jax.Array,
  layer: L.Layer,
  assign: jax.Array,
  valid: jax.Array,
) -> jax.Array:
  """Rows of input units the client does not hold taken from ``glob``.

  Used for the output layer after the last hidden layer is matched: a
  global neuron's outgoing weights are the matched average of its holders'
  (part of its matched vector), a better start than zero.
  """
  held = (
    jnp.zeros((layer.in_units,), bool)
    .at[jnp.where(valid, assign, layer.in_units)]
    .set(True, mode="drop")
  )
  view, axis = L.unit_view(kernel, layer)
  gview, _ = L.unit_view(glob, layer)
  shape = [1] * view.ndim
  shape[axis] = -1
  return jnp.where(held.reshape(shape), view, gview).reshape(kernel.shape)


def scatter_inputs(
  kernel: jax.Array,
  layer: L.Layer,
  assign: jax.Array,
  valid: jax.Array,
  num_units: int,
) -> jax.Array:
  """Moves input unit ``u`` of ``kernel`` to ``assign[u]`` (valid ``u`` only).

  The result reads ``num_units`` input units; others are zero.
  """
  view, axis = L.unit_view(kernel, layer)
  shape = list(view.shape)
  shape[axis] = num_units
  idx = jnp.where(valid, assign, num_units)
  moved = jnp.moveaxis(view, axis, 0)
  out = jnp.zeros((num_units,) + moved.shape[1:], kernel.dtype)
  out = out.at[idx].set(moved, mode="drop")
  out = jnp.moveaxis(out, 0, axis)
  return (
    out.reshape(kernel.shape[:-2] + (-1, kernel.shape[-1]))
    if layer.kind == "dense"
    else out
  )


def gather_layer(
  kernel, bias, layer: L.Layer, in_idx, in_valid, out_idx, out_valid
):
  """Client slice of a global layer: unit ``u`` takes global ``out_idx[u]``.

  Input units likewise from ``in_idx`` (None: keep all inputs). Invalid
  positions are zero.
  """
  k = jnp.take(kernel, out_idx, axis=-1) * out_valid.astype(
    kernel.dtype
  ).reshape((1,) * (kernel.ndim - 1) + (-1,))
  b = jnp.take(bias, out_idx) * out_valid.astype(bias.dtype)
  if in_idx is not None:
    view, axis = L.unit_view(k, layer)
    view = jnp.take(view, in_idx, axis=axis)
    shape = [1] * view.ndim
    shape[axis] = -1
    view = view * in_valid.astype(view.dtype).reshape(shape)
    k = view.reshape(k.shape)
  return k, b


def _outputs_only(kernel, bias, layer, in_idx, in_valid):
  ones = jnp.ones((layer.width,), bool)
  return gather_layer(
    kernel, bias, layer, in_idx, in_valid, jnp.arange(layer.width), ones
  )


# ------------------------------------------------------------------ one shot
def _class_weights(class_counts, num_clients: int, num_classes: int):
  """float64 ``[J, C]`` per-class weights of the output average (host)."""
  if class_counts is None:
    return np.ones((num_clients, num_classes))
  if len(class_counts) != num_clients:
    raise ValueError(
      f"class_counts has {len(class_counts)} entries for {num_clients} "
      f"client models; expected one [{num_classes}] array of class counts "
      "per client."
    )
  rows = []
  for j, c in enumerate(class_counts):
    a = np.asarray(c, np.float64)
    if a.shape != (num_classes,):
      raise ValueError(
        f"class_counts[{j}] has shape {a.shape}; expected ({num_classes},) "
        "(one count per class)."
      )
    if not np.all(np.isfinite(a) & (a >= 0)):
      raise ValueError(
        f"class_counts[{j}] must be finite and >= 0, got {a.tolist()}."
      )
    rows.append(a)
  return np.stack(rows)


def matched_average(
  client_params: Sequence[PyTree],
  *,
  class_counts: Sequence[np.ndarray] | None = None,
  max_widths: Sequence[int] | None = None,
  **match_options,
) -> tuple[dict, list]:
  """One-shot layer-wise matched averaging of trained client models (host).

  FedMA without retraining between layers (the clients' models are only
  permuted): match layer 1, move every client's layer-2 inputs to the global
  positions, match layer 2, ..., and average the output layer per class.
  Clients may have different hidden widths.

  Args:
    client_params: ``J`` params of the same kind of network (MLP or FedAvg
      CNN; widths may differ).
    class_counts: optional ``J`` arrays ``[num_classes]`` (finite, >= 0)
      for the per-class output average (default: equal weights).
    max_widths: bound on each global hidden layer (default: the sum of the
      clients' widths, i.e. unbounded).
    **match_options: BBP-MAP settings, the keywords of
      :func:`fedjax_lite.hetero.matching.match_atoms` (``noise_var``,
      ``prior_var``, ``gamma``, ``num_iters``, ``seed``); the default
      ``noise_var=None`` estimates it from each layer's weights' scale.

  Returns:
    ``(global_params, assignments)`` with ``assignments[l][j]`` the global
    neuron of client ``j``'s neurons of hidden layer ``l``.
  """
  match_options = matching.match_options("matched_average", match_options)
  chains = _client_chains(client_params)
  J = len(client_params)
  weights = _class_weights(class_counts, J, chains[0][-1].width)
  num_hidden = len(chains[0]) - 1
  if max_widths is None:
    max_widths = [sum(ch[l].width for ch in chains) for l in range(num_hidden)]
  locals_ = [
    jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p)
    for p in client_params
  ]
  glob = dict(locals_[0])
  assignments = []
  for l in range(num_hidden):
    atoms = [
      np.asarray(layer_atoms(p, L.layer_chain(p), l), np.float64)
      for p in locals_
    ]
    res = matching.match_atoms(
      atoms, max_atoms=int(max_widths[l]), **match_options
    )
    g = res.atoms.shape[0]
    name = chains[0][l].name
    tmp = set_layer_from_atoms(
      locals_[0],
      L.layer_chain(locals_[0]),
      l,
      jnp.asarray(res.atoms, jnp.float32),
    )
    glob[name] = tmp[name]
    locals_ = [
      _adopt_matched_layer(p, name, glob[name], l, a, g, tmp, num_hidden)
      for p, a in zip(locals_, res.assignments)
    ]
    assignments.append(res.assignments)
  last = chains[0][-1].name
  glob[last] = _per_class_average(locals_, last, weights)
  return glob, assignments


def _client_chains(client_params: Sequence[PyTree]) -> list:
  """The clients' layer chains; a ``ValueError`` for no clients, different
  layer structures or non-finite weights."""
  if not client_params:
    raise ValueError("matched_average needs at least one client model.")
  chains = [
    L.layer_chain(jax.tree.map(np.asarray, p), f"client_params[{j}]")
    for j, p in enumerate(client_params)
  ]
  kinds = {tuple((c.name, c.kind) for c in ch) for ch in chains}
  if len(kinds) != 1:
    raise ValueError(
      f"client models have different layer structures "
      f"{sorted(kinds)}; FedMA matches models with the same "
      "layers (widths may differ)."
    )
  for j, p in enumerate(client_params):
    for path, leaf in jax.tree_util.tree_leaves_with_path(p):
      bad = int(np.sum(~np.isfinite(np.asarray(leaf))))
      if bad:
        raise ValueError(
          f"client_params[{j}]{jax.tree_util.keystr(path)} has {bad} "
          "non-finite value(s) (NaN or inf); matching needs finite weights "
          "(did that client's training diverge?)."
        )
  return chains


def _adopt_matched_layer(params, name, matched, l, assign, g, glob, nh):
  """One client's model after layer ``l`` is matched: the matched layer
  ``name`` and the next layer's inputs moved to the ``g`` global positions
  ``assign`` (for the output layer, rows it does not hold from ``glob``)."""
  p = dict(params)
  p[name] = matched
  lay = L.layer_chain(params)[l + 1]
  a = jnp.asarray(assign)
  ones = jnp.ones(a.shape, bool)
  k = scatter_inputs(p[lay.name]["kernel"], lay, a, ones, g)
  if l + 1 == nh:
    k = fill_unheld_inputs(
      k, glob[lay.name]["kernel"], lay._replace(in_units=g), a, ones
    )
  p[lay.name] = {"kernel": k, "bias": p[lay.name]["bias"]}
  return p


def _per_class_average(client_params, name: str, weights) -> dict:
  r"""Layer ``name`` averaged per class: ``W[:, c] = \sum_j p_{jc} W^j[:, c]``
  with ``p_{jc} = n_{jc} / \sum_j n_{jc}`` (equal for a class of no client),
  in float64 on the host."""
  tot = weights.sum(0, keepdims=True)
  p = np.where(
    tot > 0, weights / np.where(tot > 0, tot, 1.0), 1.0 / len(client_params)
  )
  ks = np.stack(
    [np.asarray(q[name]["kernel"], np.float64) for q in client_params]
  )
  bs = np.stack(
    [np.asarray(q[name]["bias"], np.float64) for q in client_params]
  )
  return {
    "kernel": jnp.asarray(np.einsum("jc,jic->ic", p, ks), jnp.float32),
    "bias": jnp.asarray(np.einsum("jc,jc->c", p, bs), jnp.float32),
  }


# ------------------------------------------------------------ the algorithm
@flax.struct.dataclass
class FedMAState:
  """FedMA server state (global models padded to the model's widths).

  Attributes:
    params: the last complete global model (what :func:`fed_ma`'s
      ``get_params`` returns; units beyond ``masks`` are zero).
    masks: per hidden layer, float ``[W_l]``: the global neurons in use.
    assign: per hidden layer, int32 ``[J, W_l]``: client ``j``'s neuron ``u``
      is global neuron ``assign[l][j, u]`` (its first ``w_l^j`` entries).
    work, work_masks, work_assign: the model being matched this round
      (layers before ``stage`` are done).
    stage: int32, the layer matched by the next engine round (``L``: the
      output layer's per-class average).
    num_rounds: int32, completed FedMA rounds.
  """

  params: PyTree
  masks: tuple
  assign: tuple
  work: PyTree
  work_masks: tuple
  work_assign: tuple
  stage: jax.Array
  num_rounds: jax.Array


@flax.struct.dataclass
class FedMAClientState:
  """One client's model between stages (padded) and its unit masks."""

  params: PyTree
  masks: tuple


def check_client_widths(client_widths, widths: Sequence[int]) -> np.ndarray:
  """int ``[J, L]`` client hidden widths, validated against the bound."""
  cw = np.asarray(client_widths)
  if (
    cw.ndim != 2
    or cw.shape[1] != len(widths)
    or cw.shape[0] < 1
    or not (np.issubdtype(cw.dtype, np.integer))
  ):
    raise ValueError(
      f"client_widths must be ints [num_clients, {len(widths)}]"
      f" (one width per hidden layer of every client), got "
      f"shape {cw.shape} dtype {cw.dtype}."
    )
  bad = (cw < 1) | (cw > np.asarray(widths)[None, :])
  if bad.any():
    j, l = map(int, np.argwhere(bad)[0])
    raise ValueError(
      f"client_widths[{j}, {l}] = {int(cw[j, l])}; expected 1.."
      f"{widths[l]} (the model's width of hidden layer {l} "
      "bounds the global layer). Build the model wider."
    )
  return cw.astype(np.int32)


def fed_ma(
  model: Model,
  client_optimizer: optax.GradientTransformation,
  *,
  client_widths,
  name: str = "fed_ma",
  **match_options,
) -> FederatedAlgorithm:
  """FedMA as an engine algorithm; one engine round is one stage.

  Args:
    model: the *largest* global model: its hidden widths bound how far the
      matched layers can grow (MLP or FedAvg CNN,
      :mod:`fedjax_lite.hetero.layers`).
    client_optimizer: local optax optimizer (fresh each stage). Its update
      must be zero for a zero gradient (SGD, momentum, Adam; not weight
      decay), which keeps frozen layers frozen.
    client_widths: int ``[J, L]``, every client's hidden widths (its
      architecture), each at most the model's; ``J`` must be the population
      (checked when the round is traced with the data).
    name: for reports.
    **match_options: BBP-MAP settings, the keywords of
      :func:`fedjax_lite.hetero.matching.match_atoms`; stage ``r`` of the
      run matches with ``seed + r`` (default seed 0); the default
      ``noise_var=None`` estimates it from the layer's weights' scale at
      every stage.

  Returns:
    A :class:`FederatedAlgorithm` with :class:`FedMAState`; run it with
    ``RoundConfig(J, local_work, sampling="all")`` and
    ``engine.init(params, num_clients=J)``; ``L + 1`` engine rounds make
    one FedMA round (``get_params`` is the last complete global model).
  """
  matcher = FedMAMatching(model, client_widths, match_options)
  return _FedMARound(model, client_optimizer, matcher).algorithm(name)


class FedMAMatching:
  r"""The host side of FedMA: the matching of a stage (Algorithm 1, step 2).

  At stage ``l < L`` the server holds every client's layer-``l`` neurons
  (rows of ``[W_l, D_l]``, :func:`layer_atoms`: incoming weights, bias and,
  for the last hidden layer, the outgoing weights), of which client ``j``
  holds its first ``w^j_l`` units and whose entries reading inactive inputs
  are left out (:func:`atom_dim_mask`). BBP-MAP
  (:func:`~fedjax_lite.hetero.matching.match_atoms`, the Hungarian
  algorithm, seed ``seed + r`` in FedMA round ``r``) assigns every client
  neuron ``u`` to a global neuron ``pi_j(u)`` among ``G_l <= W_l``; the
  matched averages are the global layer. This runs on the host, called from
  the jitted round through ``jax.pure_callback`` (:meth:`__call__`).

  Attributes (the static layout of the model and the clients):
    chain: the model's layers (:func:`~fedjax_lite.hetero.layers.chain_of_model`).
    widths: ``W_l``, the model's hidden widths (bound the global layers).
    num_hidden: ``L``.
    client_widths: int32 ``[J, L]``, every client's hidden widths.
    num_clients: ``J``.
    kernel_shapes: every layer's kernel shape.
    atom_dims: ``D_l``, the length of a layer-``l`` neuron vector.
    num_classes: the output layer's width.
    options: BBP-MAP settings (``match_atoms`` keywords, without ``seed``).
    seed: the first round's matching seed.
  """

  def __init__(self, model: Model, client_widths, match_options: dict):
    self.chain = L.chain_of_model(model, "fed_ma model")
    self.widths = L.hidden_widths(self.chain)
    self.num_hidden = nh = len(self.widths)
    self.client_widths = check_client_widths(client_widths, self.widths)
    self.num_clients = self.client_widths.shape[0]
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    self.kernel_shapes = [
      tuple(shapes[c.name]["kernel"].shape) for c in self.chain
    ]
    nxt = [self.chain[l + 1] for l in range(nh)]
    self.atom_dims = [
      int(np.prod(self.kernel_shapes[l][:-1]))
      + 1
      + (nxt[l].in_repeat * nxt[l].width if l + 1 == nh else 0)
      for l in range(nh)
    ]
    self.num_classes = self.chain[-1].width
    self.options = matching.match_options("fed_ma", match_options)
    self.seed = self.options.pop("seed", 0)

  def match_layer(self, l: int, atoms, units, in_mask, round_index: int):
    """Stage ``l``'s matching on the host.

    Args:
      l: the hidden layer.
      atoms: float ``[J, W_l, D_l]``, every client's neurons.
      units: ``[J, W_l]``, 1 where the client holds the unit.
      in_mask: ``[W_{l-1}]`` global input units in use (None for ``l = 0``).
      round_index: the FedMA round (the matching seed is ``seed + r``).

    Returns:
      float32 ``[W_l, D_l]`` matched neurons (rows ``>= G_l`` zero), float32
      ``[W_l]`` mask of the ``G_l`` global neurons, int32 ``[J, W_l]``
      assignment of every client's units.
    """
    J, width = self.num_clients, self.widths[l]
    held = np.asarray(units) > 0.5
    dmask = atom_dim_mask(self.chain, l, self.kernel_shapes[l], in_mask)
    local = [
      np.asarray(atoms[j], np.float64)[held[j]][:, dmask] for j in range(J)
    ]
    res = matching.match_atoms(
      local, max_atoms=width, seed=self.seed + round_index, **self.options
    )
    g = res.atoms.shape[0]
    g_atoms = np.zeros((width, self.atom_dims[l]), np.float32)
    g_atoms[np.ix_(np.arange(g), dmask)] = res.atoms
    g_mask = np.zeros((width,), np.float32)
    g_mask[:g] = 1.0
    g_assign = np.zeros((J, width), np.int32)
    for j in range(J):
      g_assign[j, np.flatnonzero(held[j])] = res.assignments[j]
    return g_atoms, g_mask, g_assign

  def match_stage(self, stage, atoms, units, in_masks, round_index):
    """Every layer's ``(atoms, mask, assignment)``: layer ``stage`` matched
    (:meth:`match_layer`), the others zero (the pure callback's result)."""
    stage = int(stage)
    outs = []
    for l, (width, dim) in enumerate(zip(self.widths, self.atom_dims)):
      if l == stage:
        in_mask = None if l == 0 else in_masks[l - 1]
        outs.append(
          self.match_layer(l, atoms[l], units[l], in_mask, int(round_index))
        )
      else:
        outs.append(
          (
            np.zeros((width, dim), np.float32),
            np.zeros((width,), np.float32),
            np.zeros((self.num_clients, width), np.int32),
          )
        )
    return tuple(outs)

  def __call__(self, stage, atoms, units, in_masks, round_index):
    """:meth:`match_stage` from inside the jitted round (a pure callback)."""
    result_shape = tuple(
      (
        jax.ShapeDtypeStruct((w, d), jnp.float32),
        jax.ShapeDtypeStruct((w,), jnp.float32),
        jax.ShapeDtypeStruct((self.num_clients, w), jnp.int32),
      )
      for w, d in zip(self.widths, self.atom_dims)
    )
    return jax.pure_callback(
      self.match_stage,
      result_shape,
      stage,
      atoms,
      units,
      in_masks,
      round_index,
      vmap_method="sequential",
    )


class _FedMARound:
  """The engine algorithm's functions of FedMA; an engine round is a stage.

  Stage ``s < L``: clients train layers ``s..L`` (``< s`` frozen) and send
  their layer-``s`` neurons, which the server matches
  (:class:`FedMAMatching`); stage ``L``: clients train the output layer and
  send it with their class counts, which the server averages per class.
  Each client sends its part in row ``slot`` of ``[J, ...]`` arrays with
  weight 1, so the engine's mean times the total weight is the stack.
  """

  def __init__(
    self,
    model: Model,
    client_optimizer: optax.GradientTransformation,
    matcher: FedMAMatching,
  ):
    self.model = model
    self.client_optimizer = client_optimizer
    self.m = matcher
    self.client_widths = jnp.asarray(matcher.client_widths)

  def algorithm(self, name: str) -> FederatedAlgorithm:
    return FederatedAlgorithm(
      server_init=self.server_init,
      client_update=self.client_update,
      server_update=self.server_update,
      broadcast=lambda s: s,
      client_init=self.client_init,
      get_params=lambda s: s.params,
      name=name,
      model=self.model,
    )

  # ------------------------------------------------------------- server
  def server_init(self, params) -> FedMAState:
    widths, J = self.m.widths, self.m.num_clients
    masks = tuple(jnp.ones((w,), jnp.float32) for w in widths)
    assign = tuple(
      jnp.tile(jnp.arange(w, dtype=jnp.int32), (J, 1)) for w in widths
    )
    return FedMAState(
      params=params,
      masks=masks,
      assign=assign,
      work=params,
      work_masks=masks,
      work_assign=assign,
      stage=jnp.zeros((), jnp.int32),
      num_rounds=jnp.zeros((), jnp.int32),
    )

  def _adopt_matched(self, state: FedMAState, matched):
    """The work model with layer ``stage``'s matched neurons (if any)."""
    chain, nh = self.m.chain, self.m.num_hidden
    work, masks = dict(state.work), list(state.work_masks)
    assign = list(state.work_assign)
    for l in range(nh):
      hit = state.stage == l
      g_atoms, g_mask, g_assign = matched[l]
      new = set_layer_from_atoms(work, chain, l, g_atoms)
      for key in dict.fromkeys((chain[l].name, chain[min(l + 1, nh)].name)):
        work[key] = jax.tree.map(
          lambda a, b, hit=hit: jnp.where(hit, a, b), new[key], work[key]
        )
      masks[l] = jnp.where(hit, g_mask, masks[l])
      assign[l] = jnp.where(hit, g_assign, assign[l])
    return work, tuple(masks), tuple(assign)

  def _output_average(self, stacked) -> dict:
    r"""``W[:, c] = \sum_j p_{jc} W^j[:, c]``, ``p_{jc} = n_{jc} / \sum_j
    n_{jc}`` (equal weights for a class no client holds)."""
    counts = stacked["class_counts"]  # [J, C]
    tot = jnp.sum(counts, axis=0, keepdims=True)
    p = jnp.where(
      tot > 0, counts / jnp.where(tot > 0, tot, 1.0), 1.0 / self.m.num_clients
    )
    return {
      "kernel": jnp.einsum("jc,jic->ic", p, stacked["last_kernel"]),
      "bias": jnp.einsum("jc,jc->c", p, stacked["last_bias"]),
    }

  def server_update(self, state: FedMAState, aggregate) -> FedMAState:
    stacked = jax.tree.map(lambda a: a * aggregate.total_weight, aggregate.mean)
    matched = self.m(
      state.stage,
      stacked["atoms"],
      stacked["units"],
      state.work_masks,
      state.num_rounds,
    )
    work, masks, assign = self._adopt_matched(state, matched)
    done = state.stage == self.m.num_hidden
    last = self.m.chain[-1].name
    work[last] = jax.tree.map(
      lambda a, b: jnp.where(done, a, b),
      self._output_average(stacked),
      work[last],
    )

    def pick(a, b):
      return jax.tree.map(lambda x, y: jnp.where(done, x, y), a, b)

    return FedMAState(
      params=pick(work, state.params),
      masks=pick(masks, state.masks),
      assign=pick(assign, state.assign),
      work=work,
      work_masks=masks,
      work_assign=assign,
      stage=jnp.where(done, 0, state.stage + 1).astype(jnp.int32),
      num_rounds=state.num_rounds + done.astype(jnp.int32),
    )

  # ------------------------------------------------------------- client
  def client_init(self, params) -> FedMAClientState:
    return FedMAClientState(
      params=jax.tree.map(jnp.zeros_like, params),
      masks=tuple(jnp.zeros((w,), jnp.float32) for w in self.m.widths),
    )

  def _rebuild(self, state: FedMAState, slot, own):
    """Stage 0: the client's own-width slice of the global model."""
    chain, nh = self.m.chain, self.m.num_hidden
    params = {}
    for i, layer in enumerate(chain):
      g = state.params[layer.name]
      in_idx = state.assign[i - 1][slot] if i > 0 else None
      in_valid = own[i - 1] > 0 if i > 0 else None
      if i < nh:
        k, b = gather_layer(
          g["kernel"],
          g["bias"],
          layer,
          in_idx,
          in_valid,
          state.assign[i][slot],
          own[i] > 0,
        )
      else:
        k, b = _outputs_only(g["kernel"], g["bias"], layer, in_idx, in_valid)
      params[layer.name] = {"kernel": k, "bias": b}
    return params, tuple(own)

  def _take_matched(self, state: FedMAState, cstate, slot, s: int):
    """Stage s >= 1: adopt global layer s-1, move layer s's inputs."""
    params = dict(cstate.params)
    masks = list(cstate.masks)
    prev, layer = self.m.chain[s - 1], self.m.chain[s]
    params[prev.name] = state.work[prev.name]
    masks[s - 1] = state.work_masks[s - 1]
    a, valid = state.work_assign[s - 1][slot], cstate.masks[s - 1] > 0
    k = scatter_inputs(
      params[layer.name]["kernel"], layer, a, valid, self.m.widths[s - 1]
    )
    if s == self.m.num_hidden:
      k = fill_unheld_inputs(
        k, state.work[layer.name]["kernel"], layer, a, valid
      )
    params[layer.name] = {"kernel": k, "bias": params[layer.name]["bias"]}
    return params, tuple(masks)

  def _train(self, params, masks, s, data, rng):
    """Local training of layers ``>= s`` (the others get zero gradients)."""
    chain, model = self.m.chain, self.model
    pm = L.param_masks(chain, masks)
    keep = {c.name: (i >= s).astype(jnp.float32) for i, c in enumerate(chain)}

    def grad_fn(p, batch, mask, step_rng):
      def objective(q):
        return model.batch_loss(
          L.apply_masks(q, pm), batch, mask, step_rng, train=True
        )

      g, stats = jax.grad(objective, has_aux=True)(p)
      return {
        k: jax.tree.map(lambda x, k=k: x * keep[k], v) for k, v in g.items()
      }, stats

    result = local_train(grad_fn, self.client_optimizer, params, data, rng)
    return L.apply_masks(result.params, pm), result.metrics

  def _upload(self, new, masks, s, data) -> dict:
    """What the client sends at stage ``s``, in row ``slot`` (zeros else)."""
    chain, nh, J = self.m.chain, self.m.num_hidden, self.m.num_clients
    onehot = (jnp.arange(J) == data.slot).astype(jnp.float32)
    atoms, units = [], []
    for l in range(nh):
      hot = onehot * (s == l).astype(jnp.float32)
      atoms.append(hot[:, None, None] * layer_atoms(new, chain, l)[None])
      units.append(hot[:, None] * masks[l][None, :])
    labels = data.batches[self.model.label_key].reshape(-1)
    counts = jnp.sum(
      jax.nn.one_hot(labels, self.m.num_classes)
      * data.mask.reshape(-1, 1).astype(jnp.float32),
      axis=0,
    )
    hot = onehot * (s == nh).astype(jnp.float32)
    last = chain[-1].name
    return {
      "atoms": tuple(atoms),
      "units": tuple(units),
      "last_kernel": hot[:, None, None] * new[last]["kernel"][None],
      "last_bias": hot[:, None] * new[last]["bias"][None],
      "class_counts": hot[:, None] * counts[None, :],
    }

  def client_update(self, state: FedMAState, cstate, data, rng):
    # Host side, at trace time: short widths would be clamped by the gather.
    checks.per_client(
      "client_widths",
      self.m.num_clients,
      data.num_clients,
      "; give every client of the population its hidden widths (one row each)",
    )
    # Only the start differs between stages (a cheap switch); the local
    # training is one computation whose frozen layers depend on the stage.
    nh = self.m.num_hidden
    s = jnp.clip(state.stage, 0, nh)
    slot = data.slot
    own = L.prefix_masks(
      self.m.widths,
      [self.client_widths[data.client_id, l] for l in range(nh)],
    )
    starts = [lambda: self._rebuild(state, slot, own)] + [
      lambda i=i: self._take_matched(state, cstate, slot, i)
      for i in range(1, nh + 1)
    ]
    params, masks = jax.lax.switch(s, starts)
    new, metrics = self._train(params, masks, s, data, rng)
    return ClientOutput(
      update=self._upload(new, masks, s, data),
      weight=jnp.ones((), jnp.float32),
      state=FedMAClientState(new, masks),
      metrics=metrics,
    )


def stages_per_round(model: Model) -> int:
  """Engine rounds per FedMA round: hidden layers + the output layer."""
  return len(L.chain_of_model(model, "fed_ma model"))


# ---------------------------------------------------------------- process
class FedMAProcess:
  """TFF-style ``initialize`` / ``next`` / ``get_model_weights`` for FedMA.

  ``next(state, federated_train_data)`` runs one FedMA round (``L + 1``
  engine rounds) on every client; the clients must be the same, in the same
  order, every round (client ``j`` has architecture ``client_widths[j]``).
  """

  def __init__(
    self,
    model: Model,
    algorithm: FederatedAlgorithm,
    local_work: LocalWork,
    num_clients: int,
    *,
    block_size: int | None = None,
    mesh=None,
  ):
    self.model = model
    self.algorithm = checks.instance_of(
      "algorithm", algorithm, FederatedAlgorithm, " (from fed_ma)"
    )
    self.num_clients = checks.positive_int("num_clients", num_clients)
    self.stages = stages_per_round(model)
    if mesh is None:  # the host matching inside the round: one device
      mesh = default_mesh(jax.devices()[:1])
    self.engine = Engine(
      algorithm,
      RoundConfig(
        num_clients, local_work, sampling="all", block_size=block_size
      ),
      mesh,
    )
    self._data = None

  def initialize(self, seed: int = 0) -> EngineState:
    """Initial state: global params from ``seed``, empty client models."""
    params = self.model.init(jax.random.PRNGKey(seed))
    return self.engine.init(
      params, seed=jax.random.PRNGKey(seed + 1), num_clients=self.num_clients
    )

  def _device_data(self, data):
    from fedjax_lite.data.federated_dataset import FederatedDataset  # pylint: disable=g-import-not-at-top

    if self._data is not None and self._data[0] is data:
      return self._data[1]
    ds = (
      data
      if isinstance(data, FederatedDataset)
      else FederatedDataset.from_clients(data)
    )
    if ds.num_clients != self.num_clients:
      raise ValueError(
        f"federated_train_data has {ds.num_clients} clients; "
        f"this FedMA process was built for {self.num_clients} "
        "(one architecture per client, in order)."
      )
    dev = self.engine.put_data(ds, model=self.model)
    self._data = (data, dev)
    return dev

  def next(
    self, state: EngineState, federated_train_data
  ) -> tuple[EngineState, dict]:
    """One FedMA round; metrics are the stages' training means (floats)."""
    data = self._device_data(federated_train_data)
    metrics = {}
    for s in range(self.stages):
      state, m = self.engine.round(state, data)
      for k, v in jax.device_get(m).items():
        if np.ndim(v) == 0:
          metrics[f"stage{s}_{k}"] = float(v)
    metrics["loss"] = metrics[f"stage{self.stages - 1}_loss"]
    if f"stage{self.stages - 1}_accuracy" in metrics:
      metrics["accuracy"] = metrics[f"stage{self.stages - 1}_accuracy"]
    metrics["global_widths"] = [
      int(np.sum(np.asarray(m))) for m in state.server.masks
    ]
    return state, metrics

  def get_model_weights(self, state: EngineState) -> PyTree:
    """The last complete global model (padded; unused units are zero)."""
    return state.server.params


def build_fed_ma_process(
  model: Model,
  client_optimizer_fn,
  *,
  client_widths,
  local_epochs: int = 1,
  batch_size: int | None = None,
  num_local_steps: int | None = None,
  block_size: int | None = None,
  mesh=None,
  **match_options,
) -> FedMAProcess:
  """FedMA as a TFF-style process.

  Args:
    model: the largest global model (its hidden widths bound the global
      layers); MLP or FedAvg CNN.
    client_optimizer_fn: no-arg factory of the client optax optimizer.
    client_widths: int ``[J, L]`` hidden widths of every client.
    local_epochs, batch_size, num_local_steps: local training per stage.
    block_size, mesh: engine settings; the default mesh is the first
      device only (see the module docstring).
    **match_options: BBP-MAP settings (as :func:`fed_ma`).
  """
  checks.optimizer_factories(client_optimizer_fn=client_optimizer_fn)
  algorithm = fed_ma(
    model,
    client_optimizer_fn(),
    client_widths=client_widths,
    **match_options,
  )
  work = LocalWork(
    batch_size=batch_size, num_epochs=local_epochs, num_steps=num_local_steps
  )
  return FedMAProcess(
    model,
    algorithm,
    work,
    int(np.asarray(client_widths).shape[0]),
    block_size=block_size,
    mesh=mesh,
  )


def round_communication(
  model: Model, client_widths: Sequence[int], global_widths: Sequence[int]
) -> tuple[int, int]:
  """Numbers a client sends and receives in one FedMA round.

  Args:
    model: the bounding global model (gives the layer kinds and shapes).
    client_widths: the client's hidden widths ``w_l``.
    global_widths: the global hidden widths ``G_l`` of the round.

  Returns:
    ``(up, down)``. Stage ``l``: up its ``w_l`` neurons (inputs from the
    ``G_{l-1}`` global neurons, bias, and for the last hidden layer the
    outgoing weights), down the ``G_l`` matched neurons and its ``w_l``
    assignment indices; output stage: up its output layer and class counts,
    down the averaged output layer.
  """
  chain = L.chain_of_model(model, "fed_ma model")
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0))
  nh = len(chain) - 1
  out = chain[-1]
  up = down = 0
  for l in range(nh):
    k = shapes[chain[l].name]["kernel"].shape
    n_in = int(np.prod(k[:-1]))
    if l > 0:
      n_in = n_in // chain[l].in_units * int(global_widths[l - 1])
    w, g = int(client_widths[l]), int(global_widths[l])
    extra = out.in_repeat * out.width if l == nh - 1 else 0
    up += w * (n_in + 1 + extra)
    down += g * (n_in + 1 + extra) + w
  g = int(global_widths[-1])
  up += g * out.in_repeat * out.width + 2 * out.width
  down += g * out.in_repeat * out.width + out.width
  return up, down
