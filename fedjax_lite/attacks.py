r"""Byzantine clients: data poisoning, update attacks and omniscient attacks.

Layer: sits beside ``algorithms/`` and ``aggregators/`` (imports those, plus
``data/``; never ``engine/``).

A fixed, seeded subset of the population is Byzantine
(:func:`byzantine_mask`: a bool ``[num_clients]`` mask). :func:`with_attack`
wraps an algorithm so that, inside the jitted round, a sampled client looks
its flag up with ``mask[data.client_id]`` (no Python loop over clients) and,
if Byzantine, misbehaves in one of three ways:

* data poisoning before local training: :func:`label_flip`
  (``y -> C - 1 - y``; Fang et al. 2020, Tolpegin et al. 2020);
* a forged update after local training: :func:`sign_flip`
  (``Delta -> -s Delta``), :func:`scaling` (``Delta -> lambda Delta``, model
  replacement / boosting, Bagdasaryan et al. 2020, Bhagoji et al. 2019),
  :func:`gaussian` (``Delta -> N(0, sigma^2 I)``), :func:`nonfinite`
  (``Delta -> NaN``);
* an omniscient update chosen at aggregation time from the benign clients'
  updates: :func:`alie` ("A little is enough", Baruch et al. 2019) and
  :func:`ipm` (inner-product manipulation, Xie et al. 2020).

How the Byzantine flag reaches the aggregator (omniscient attacks). The
aggregator contract's ``add`` receives updates, weights, validity and
*slots*, not client ids, so the aggregator cannot look the mask up itself.
Instead the wrapped ``client_update`` sends a :class:`FlaggedUpdate`
``(update, byzantine)``: the flag travels in the update pytree, through the
engine's blocks and devices, next to the vector it marks. The algorithm's
aggregator is replaced by :func:`omniscient_aggregator`, a materialized
wrapper that keeps every slot's update and flag, overwrites the Byzantine
slots with the attack vector in ``finalize``, and then runs the algorithm's
own aggregator (default the weighted mean) on the result. Its
``AggregatorOutput.mean`` has the plain update structure again, so the
server update never sees the flag. The wrapper works with any aggregator
(streaming or materialized), costs ``clients_per_round x model`` memory and
replays the inner aggregator on one block of all slots.

:func:`combine` chains attacks (e.g. a boosted label-flip update);
:func:`select_attack` picks one of several by a traced index, so one
compiled round (a vectorized sweep) covers several attacks.

Byzantine clients keep their honest aggregation weight ``n_k`` in every
attack (they lie about the update, not about their data size), and every
wrapped round reports the metric ``byzantine``: the share of the round's
clients that were Byzantine.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jax.scipy.special import ndtri

from fedjax_lite import aggregators as aggs
from fedjax_lite import checks
from fedjax_lite.algorithms.base import FederatedAlgorithm
from fedjax_lite.data.batching import ClientData

PyTree = Any
# A stream id for attack randomness: the client's key is folded with it, so
# the wrapped algorithm's own randomness (data order, dropout) is unchanged.
_ATTACK_STREAM = 0x0B12


# ------------------------------------------------------------ Byzantine set
def _checked(check, name: str, value, *args, **kw):
  """``check(name, value, *args, **kw)`` for a concrete value; a traced one
  (a hyperparameter of a vectorized sweep) was checked where it was concrete
  and passes through unchanged."""
  if isinstance(value, jax.core.Tracer):
    return value
  return check(name, value, *args, **kw)


def _check_fraction(fraction) -> None:
  _checked(
    checks.in_range,
    "fraction",
    fraction,
    0.0,
    1.0,
    expected="in [0, 1) (the Byzantine fraction, e.g. 0.2 for 20%)",
  )


def byzantine_mask(num_clients: int, fraction, seed: int = 0):
  r"""Which clients of the population are Byzantine: bool ``[num_clients]``.

  Client ``i`` is Byzantine iff ``rank_i < round(fraction * num_clients)``,
  where ``rank`` is a permutation of ``0..num_clients-1`` drawn from
  ``seed``. So the set has exactly ``round(fraction N)`` clients, is fixed for
  a seed, and the sets of growing fractions are nested (the 10% set is inside
  the 20% set), which makes a sweep over fractions a clean comparison.

  Args:
    num_clients: population size ``N``.
    fraction: Byzantine fraction in ``[0, 1)``; may be a traced scalar inside
      a vectorized sweep (then the result is a traced array).
    seed: seeds the permutation.

  Returns:
    A numpy bool array for a concrete ``fraction``, else a jax bool array.
  """
  checks.positive_int("num_clients", num_clients, hint=" (the population size)")
  _check_fraction(fraction)
  rank = np.random.default_rng(seed).permutation(int(num_clients))
  if isinstance(fraction, jax.core.Tracer):
    count = jnp.round(jnp.asarray(fraction, jnp.float32) * num_clients)
    return jnp.asarray(rank) < count
  count = int(np.round(float(fraction) * num_clients))
  return rank < count


# ------------------------------------------------------------------ attacks
class Attack(NamedTuple):
  """A Byzantine behaviour (at most one of the three hooks is usually set).

  Attributes:
    name: for reports.
    poison_data: ``ClientData -> ClientData`` applied to a Byzantine client's
      data before local training, or None.
    poison_update: ``(update, rng) -> update`` replacing a Byzantine client's
      update after local training, or None.
    byzantine_update: omniscient attack: ``(updates [n, d], benign [n],
      byzantine [n], rng) -> [n, d]``, what every slot sends, computed from
      the round's flattened updates (``benign`` / ``byzantine`` are bool slot
      masks, empty and padding slots are in neither; rows that are not
      Byzantine must come back unchanged), or None.
  """

  name: str
  poison_data: Callable[[ClientData], ClientData] | None = None
  poison_update: Callable[[PyTree, jax.Array], PyTree] | None = None
  byzantine_update: Callable[..., jax.Array] | None = None


def label_flip(num_classes: int, label_key: str = "y") -> Attack:
  r"""Data poisoning: Byzantine clients train on ``y -> C - 1 - y``.

  The client then runs the wrapped algorithm's honest local training on the
  flipped labels (Tolpegin et al. 2020, "Data Poisoning Attacks Against
  Federated Learning Systems", arXiv:2007.08432; Fang et al. 2020).
  """
  c = checks.int_at_least("num_classes", num_classes, 2)

  def poison_data(data: ClientData) -> ClientData:
    if label_key not in data.batches:
      raise ValueError(
        f"label_flip: the client data has features "
        f"{sorted(data.batches)}, no label {label_key!r}; pass "
        f"label_flip(num_classes, label_key=<label feature>)."
      )
    y = data.batches[label_key]
    return data.replace(
      batches={**data.batches, label_key: (c - 1 - y).astype(y.dtype)}
    )

  return Attack(name="label_flip", poison_data=poison_data)


def sign_flip(scale: float = 1.0) -> Attack:
  r"""Update attack ``Delta -> -s Delta`` (reversed gradient; ``s = 1``)."""
  s = _checked(checks.positive_float, "scale", scale)
  return Attack(
    name="sign_flip",
    poison_update=lambda u, rng: jax.tree.map(lambda x: (-s) * x, u),
  )


def scaling(factor: float) -> Attack:
  r"""Update attack ``Delta -> lambda Delta`` (boosting / model replacement).

  With ``lambda ~ n / n_k`` a single client replaces the global model by its
  own (Bagdasaryan et al. 2020, arXiv:1807.00459; Bhagoji et al. 2019).
  """
  f = _checked(checks.positive_float, "factor", factor)
  return Attack(
    name="scaling",
    poison_update=lambda u, rng: jax.tree.map(lambda x: f * x, u),
  )


def gaussian(std: float) -> Attack:
  r"""Update attack: ``Delta -> N(0, std^2 I)`` instead of the update."""
  s = _checked(checks.positive_float, "std", std)

  def poison_update(update, rng):
    leaves, treedef = jax.tree.flatten(update)
    keys = jax.random.split(rng, len(leaves))
    return jax.tree.unflatten(
      treedef,
      [
        s * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)
      ],
    )

  return Attack(name="gaussian", poison_update=poison_update)


def alie_z_max(n, f):
  r"""``z_max`` of Baruch et al. 2019 (NeurIPS, arXiv:1902.06156), Sec. 4.

  With ``n`` clients of which ``f`` are Byzantine, the attacker needs
  ``s = floor(n/2 + 1) - f`` benign "supporters"; ``z_max`` is the largest
  ``z`` with ``Phi(z) < (n - s) / n``, i.e. ``z_max = Phi^{-1}((n - s)/n)``.
  Works on Python numbers and (traced) jax scalars.
  """
  n = jnp.asarray(n, jnp.float32)
  f = jnp.asarray(f, jnp.float32)
  s = jnp.floor(n / 2.0 + 1.0) - f
  p = (n - s) / jnp.maximum(n, 1.0)
  # p in (0, 1) whenever 1 <= s <= n - 1; keep ndtri finite at the edges.
  return ndtri(jnp.clip(p, 1e-6, 1.0 - 1e-6))


def _benign_moments(updates, benign):
  """Unweighted mean and std (ddof=1) of the benign rows of ``[n, d]``."""
  w = benign.astype(updates.dtype)[:, None]
  nb = jnp.sum(w)
  mean = jnp.sum(w * updates, axis=0) / jnp.maximum(nb, 1.0)
  var = jnp.sum(w * (updates - mean[None]) ** 2, axis=0) / jnp.maximum(
    nb - 1.0, 1.0
  )
  return mean, jnp.sqrt(var)


def alie(z: float | None = None) -> Attack:
  r""" "A little is enough" (Baruch et al. 2019, NeurIPS, arXiv:1902.06156).

  Every Byzantine client sends, coordinate-wise,

  .. math:: p_j = \mu_j - z_{max}\,\sigma_j

  where ``mu`` and ``sigma`` are the mean and standard deviation (ddof=1) of
  the round's benign updates and ``z_max = Phi^{-1}((n - s)/n)``,
  ``s = floor(n/2 + 1) - f`` (:func:`alie_z_max`), with ``n`` the round's
  clients and ``f`` its Byzantine clients (counted every round: with partial
  participation ``f`` varies). The shift stays within the spread of the
  benign updates, so median- and distance-based rules keep or select it.

  Args:
    z: a fixed ``z`` instead of the paper's ``z_max``.
  """

  def byzantine_update(updates, benign, byzantine, rng):
    del rng
    mean, std = _benign_moments(updates, benign)
    if z is None:
      n = jnp.sum(benign) + jnp.sum(byzantine)
      zz = alie_z_max(n, jnp.sum(byzantine))
    else:
      zz = jnp.float32(z)
    return _send(updates, byzantine, mean - zz * std)

  return Attack(name="alie", byzantine_update=byzantine_update)


def ipm(epsilon: float = 0.1) -> Attack:
  r"""Inner-product manipulation (Xie, Koyejo & Gupta 2020, UAI,
  "Fall of Empires", arXiv:1903.03936).

  Every Byzantine client sends ``-epsilon * mean`` of the benign updates, so
  the aggregate's inner product with the true mean becomes negative once the
  aggregator lets it through: small ``epsilon`` (0.1) hides among benign
  updates against Krum; large ``epsilon`` (> n / f - 1 against the mean)
  reverses the mean.
  """
  eps = _checked(checks.positive_float, "epsilon", epsilon)

  def byzantine_update(updates, benign, byzantine, rng):
    del rng
    mean, _ = _benign_moments(updates, benign)
    return _send(updates, byzantine, -eps * mean)

  return Attack(name="ipm", byzantine_update=byzantine_update)


def nonfinite(value: float = float("nan")) -> Attack:
  r"""Update attack: every coordinate of ``Delta`` becomes ``value`` (NaN by
  default, or +-inf), the simplest Byzantine update there is.

  The engine leaves such clients out of the round before any aggregator sees
  them (``RoundConfig(nonfinite="drop")``, metric ``dropped_nonfinite``), so
  under it every aggregator reduces the finite updates only;
  ``nonfinite="raise"`` stops the round naming the clients instead.
  """
  v = float(value)
  if np.isfinite(v):
    raise ValueError(f"nonfinite: value must be NaN or +-inf, got {value!r}.")
  return Attack(
    name="nonfinite",
    poison_update=lambda u, rng: jax.tree.map(lambda x: jnp.full_like(x, v), u),
  )


def _send(updates, byzantine, vector):
  """``updates`` with every Byzantine row replaced by ``vector``."""
  return jnp.where(
    byzantine[:, None], vector[None].astype(updates.dtype), updates
  )


def no_attack() -> Attack:
  """Honest behaviour (a baseline; with_attack still reports ``byzantine``)."""
  return Attack(name="none")


def combine(*attacks: Attack, name: str | None = None) -> Attack:
  r"""Several attacks at once, in order: their data poisonings, then their
  update forgeries, then their aggregation-time hooks.

  E.g. ``combine(label_flip(10), scaling(10))`` trains on flipped labels and
  boosts the poisoned update tenfold so it survives averaging: the explicit
  boosting of Bhagoji et al. 2019 ("Analyzing Federated Learning through an
  Adversarial Lens", arXiv:1811.12470) with an untargeted objective.
  """
  if not attacks or not all(isinstance(a, Attack) for a in attacks):
    raise TypeError(f"combine takes Attack arguments, got {attacks!r}.")

  def chain(hook):
    fns = [getattr(a, hook) for a in attacks if getattr(a, hook) is not None]
    if not fns:
      return None
    if hook == "poison_data":

      def run_data(data):
        for f in fns:
          data = f(data)
        return data

      return run_data

    def run(x, *rest):
      for f in fns:
        x = f(x, *rest)
      return x

    return run

  return Attack(
    name=name or "+".join(a.name for a in attacks),
    poison_data=chain("poison_data"),
    poison_update=chain("poison_update"),
    byzantine_update=chain("byzantine_update"),
  )


def select_attack(index, attacks) -> Attack:
  r"""Attack number ``index`` of ``attacks``, with ``index`` possibly traced.

  Lets one compiled round cover several attacks: in a vectorized sweep each
  run gets its own ``index`` (a float hyperparameter is rounded). Every
  hook of the selection computes all the attacks' versions and keeps the
  chosen one (``jnp.where``; cheap next to local training: the local
  training itself runs once, on the selected data). Attacks without a hook
  pass its input through unchanged.

  Args:
    index: int in ``[0, len(attacks))``, or a traced scalar.
    attacks: a sequence of :class:`Attack`.
  """
  attacks = tuple(attacks)
  if not attacks or not all(isinstance(a, Attack) for a in attacks):
    raise TypeError(
      f"attacks must be a non-empty sequence of Attack, got {attacks!r}."
    )
  if not isinstance(index, jax.core.Tracer):
    i = float(np.asarray(index))
    if not (0 <= round(i) < len(attacks)):
      raise ValueError(
        f"index must select one of the {len(attacks)} attacks "
        f"(0..{len(attacks) - 1}), got {index!r}."
      )
  idx = jnp.round(jnp.asarray(index, jnp.float32)).astype(jnp.int32)

  def pick(values):
    out = values[0]
    for j, v in enumerate(values[1:], 1):
      out = jax.tree.map(lambda a, b, j=j: jnp.where(idx == j, a, b), v, out)
    return out

  def hook(name, passthrough):
    if all(getattr(a, name) is None for a in attacks):
      return None

    def fn(*args):
      return pick(
        [
          getattr(a, name)(*args)
          if getattr(a, name) is not None
          else passthrough(*args)
          for a in attacks
        ]
      )

    return fn

  return Attack(
    name="select(" + ",".join(a.name for a in attacks) + ")",
    poison_data=hook("poison_data", lambda data: data),
    poison_update=hook("poison_update", lambda u, rng: u),
    byzantine_update=hook("byzantine_update", lambda u, b, z, rng: u),
  )


# --------------------------------------------------- client-side wrapper
@flax.struct.dataclass
class FlaggedUpdate:
  """A client's update plus its Byzantine flag (omniscient attacks only).

  Attributes:
    update: the client's (honest) update.
    byzantine: float32 scalar, 1 for a Byzantine client, else 0.
  """

  update: PyTree
  byzantine: jax.Array


def with_attack(
  algorithm: FederatedAlgorithm, attack: Attack, byzantine
) -> FederatedAlgorithm:
  r"""``algorithm`` whose Byzantine clients follow ``attack``.

  Args:
    algorithm: the honest algorithm (any client state, any aggregator).
    attack: an :class:`Attack` (:func:`label_flip`, :func:`sign_flip`,
      :func:`scaling`, :func:`gaussian`, :func:`alie`, :func:`ipm`).
    byzantine: bool ``[num_clients]`` mask (:func:`byzantine_mask`), indexed
      with each client's ``data.client_id`` inside the round; its length
      must be the population's (checked when the round is traced with the
      data: ``ValueError`` otherwise).

  Returns:
    The wrapped algorithm. Client metrics gain ``byzantine`` (share of the
    round's clients that were Byzantine). For omniscient attacks the update
    is a :class:`FlaggedUpdate` and the aggregator becomes
    ``omniscient_aggregator(algorithm.aggregator or weighted_mean(), attack)``.
  """
  checks.instance_of("algorithm", algorithm, FederatedAlgorithm)
  checks.instance_of("attack", attack, Attack, " (e.g. fl.attacks.sign_flip())")
  mask = (
    byzantine if isinstance(byzantine, jax.Array) else np.asarray(byzantine)
  )
  if mask.ndim != 1 or mask.dtype != bool:
    raise ValueError(
      f"byzantine must be a bool mask of shape [num_clients] "
      f"(fl.attacks.byzantine_mask(num_clients, fraction, "
      f"seed)), got dtype {mask.dtype} shape {mask.shape}."
    )
  omniscient = attack.byzantine_update is not None

  def client_update(broadcast, client_state, data: ClientData, rng):
    # Host side, at trace time: a short mask would be clamped by the gather.
    checks.per_client(
      "byzantine",
      mask.shape[0],
      data.num_clients,
      f"; build it with fl.attacks.byzantine_mask({data.num_clients}, "
      "fraction, seed)",
    )
    is_byz = jnp.asarray(mask)[data.client_id]
    k_attack = jax.random.fold_in(rng, _ATTACK_STREAM)
    if attack.poison_data is not None:
      bad = attack.poison_data(data)
      data = jax.tree.map(lambda p, h: jnp.where(is_byz, p, h), bad, data)
    out = algorithm.client_update(broadcast, client_state, data, rng)
    update = out.update
    if attack.poison_update is not None:
      forged = attack.poison_update(update, k_attack)
      update = jax.tree.map(
        lambda p, h: jnp.where(is_byz, p, h).astype(h.dtype), forged, update
      )
    flag = is_byz.astype(jnp.float32)
    if omniscient:
      update = FlaggedUpdate(update=update, byzantine=flag)
    metrics = dict(out.metrics)
    metrics["byzantine"] = (flag, jnp.ones((), jnp.float32))
    return out._replace(update=update, metrics=metrics)

  aggregator = algorithm.aggregator
  if omniscient:
    aggregator = omniscient_aggregator(aggregator, attack)
  return algorithm._replace(
    client_update=client_update,
    aggregator=aggregator,
    name=f"{algorithm.name}+{attack.name}",
  )


# ------------------------------------------- aggregation-time (omniscient)
def omniscient_aggregator(inner, attack: Attack):
  r"""Aggregator wrapper that lets Byzantine slots send ``attack``'s vector.

  Expects :class:`FlaggedUpdate` updates (from :func:`with_attack`). ``add``
  scatters every client's update, weight, flag and validity into a
  ``[num_slots, ...]`` buffer at its slot (disjoint slots, so ``merge`` is a
  sum over devices); ``finalize`` flattens the buffer to ``[n, d]``, computes
  ``U' = attack.byzantine_update(U, benign, byzantine, rng)`` (the
  Byzantine rows replaced by the attack's vector) and replays ``inner``
  (init, one ``add`` of all slots, merge, finalize) on the result.
  Materialized: memory ``num_slots x model``. A run-dependent ``inner``
  (``Aggregator.bind``, e.g. DP accounting) is bound to the run and wrapped
  again; its ``check_output`` is kept. The wrapper keeps no state of its
  own: its state is ``inner``'s.

  Args:
    inner: the aggregator under attack (None: weighted mean).
    attack: an omniscient :class:`Attack` (:func:`alie`, :func:`ipm`).
  """
  if attack.byzantine_update is None:
    raise ValueError(
      f"attack {attack.name!r} is not an aggregation-time "
      "attack (it has no byzantine_update); apply it with "
      "with_attack(algorithm, attack, mask) only."
    )
  if inner is None:
    inner = aggs.weighted_mean()
  unflag = functools.partial(_unflagged_spec, attack.name)
  return aggs.Aggregator(
    lambda update_spec: inner.init_state(unflag(update_spec)),
    lambda state, update_spec, num_slots: _slot_buffers(
      unflag(update_spec), num_slots
    ),
    _scatter_to_slots,
    aggs.sum_over_devices,  # one device writes each slot: the sum keeps it
    functools.partial(_attacked_finalize, inner, attack),
    materialized=True,
    name=f"{attack.name}({inner.name})",
    active_slots=inner.active_slots,  # the inner aggregator's state
    # A run-dependent inner aggregator (e.g. DP accounting) binds to the
    # run, and the bound one is wrapped again.
    bind=(
      None
      if inner.bind is None
      else lambda run: omniscient_aggregator(inner.bind(run), attack)
    ),
    check_output=inner.check_output,
  )


def _unflagged_spec(attack_name: str, update_spec) -> PyTree:
  """The plain update spec inside a :class:`FlaggedUpdate` spec; a
  ``TypeError`` for updates that do not come from :func:`with_attack`."""
  if not isinstance(update_spec, FlaggedUpdate):
    raise TypeError(
      f"{attack_name}(...) aggregates FlaggedUpdate updates "
      f"(from fl.attacks.with_attack), got "
      f"{type(update_spec).__name__}. Build the algorithm with "
      "with_attack(algorithm, attack, mask) instead of setting"
      " the aggregator directly."
    )
  return update_spec.update


def _slot_buffers(spec: PyTree, num_slots: int) -> dict:
  """Zero ``[num_slots, ...]`` buffers: updates, weights, validity, flags."""
  return {
    "updates": jax.tree.map(
      lambda s: jnp.zeros((num_slots,) + s.shape, s.dtype), spec
    ),
    "weights": jnp.zeros((num_slots,), jnp.float32),
    "valid": jnp.zeros((num_slots,), jnp.float32),
    "byzantine": jnp.zeros((num_slots,), jnp.float32),
  }


def _scatter_to_slots(state, acc, updates, weights, valid, slots) -> dict:
  """Writes a block's flagged updates into their slots' rows of ``acc``."""
  del state
  # A client takes part if it is real and has weight (as for the robust
  # aggregators); others go to an out-of-range row and are dropped.
  part = jnp.logical_and(valid, weights > 0)
  v = part.astype(jnp.float32)
  idx = jnp.where(part, slots, acc["weights"].shape[0])

  def put(buf, x):
    return buf.at[idx].set(x.astype(buf.dtype), mode="drop")

  return {
    "updates": jax.tree.map(put, acc["updates"], updates.update),
    "weights": put(acc["weights"], weights.astype(jnp.float32)),
    "valid": put(acc["valid"], v),
    "byzantine": put(acc["byzantine"], updates.byzantine),
  }


def _attacked_finalize(inner, attack: Attack, state, acc, rng):
  """Byzantine rows replaced by the attack's vector, then ``inner``."""
  valid = acc["valid"] > 0.5
  byz = jnp.logical_and(valid, acc["byzantine"] > 0.5)
  benign = jnp.logical_and(valid, jnp.logical_not(byz))
  flat = jax.vmap(lambda u: ravel_pytree(u)[0])(acc["updates"])  # [n, d]
  unravel = ravel_pytree(jax.tree.map(lambda a: a[0], acc["updates"]))[1]
  k_attack, k_inner = jax.random.split(rng)
  flat = attack.byzantine_update(flat, benign, byz, k_attack)
  out, new_state = _replay(
    inner, state, jax.vmap(unravel)(flat), acc["weights"], valid, k_inner
  )
  metrics = dict(out.metrics)
  metrics["byzantine_slots"] = jnp.sum(byz).astype(jnp.float32)
  return out._replace(metrics=metrics), new_state


def _replay(inner, state, updates, weights, valid, rng):
  """``inner`` on every slot at once: ``init``, one ``add`` of the
  ``[n, ...]`` updates, ``merge`` of one device, ``finalize``."""
  num_slots = weights.shape[0]
  spec = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), updates
  )
  acc = inner.init(state, spec, num_slots)
  acc = inner.add(
    state,
    acc,
    updates,
    weights,
    valid,
    jnp.arange(num_slots, dtype=jnp.int32),
  )
  acc = inner.merge(jax.tree.map(lambda a: a[None], acc))
  return inner.finalize(state, acc, rng)
