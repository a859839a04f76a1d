r"""Federated algorithms as small tuples of pure functions.

Writing a new algorithm
=======================

An algorithm is a :class:`FederatedAlgorithm`: ``server_init``,
``broadcast``, ``client_update`` (written for ONE client; the engine vmaps it),
``server_update`` and, for per-client state, ``client_init``. The engine calls
them in one jitted round::

    shared = broadcast(server_state)                     # to every client
    out_k = client_update(shared, client_state_k, data_k, rng_k)  # vmapped
    mean = sum_k out_k.weight * out_k.update / sum_k out_k.weight
    server_state = server_update(server_state, Aggregate(mean, ...))

Start from the closest algorithm and replace only the function that differs;
never copy a file. The pieces:

* :func:`fed_avg` -- ``local_objective=`` changes what clients minimise,
  ``server_optimizer=`` (any optax optimizer) what the server does with the
  mean update ``w_t - w^k``.
* :func:`local_train` -- ``(grad_fn, optimizer, params, data, rng,
  step_mask=, opt_state=)`` runs a client's masked local steps and returns its
  params, optimizer state, steps taken ``tau`` and ``(sum, count)`` metrics.
* ``ClientOutput(update, weight, state, metrics)`` -- ``update`` may be any
  pytree (several quantities are averaged with the same weight: FedNova sends
  ``{"d": ..., "a": ...}``); ``state`` is the client's new persistent state.
* ``algorithm._replace(client_update=...)`` -- wrap another algorithm's
  function (Ditto wraps ``fed_avg``'s client update; q-FedAvg too).

Worked example: ``experiments/custom_algorithm_example.py`` (run by
``tests/test_custom_algorithm_example.py``) writes FedAvg whose clients clip
their update to an L2 norm by wrapping ``fed_avg``'s client update, and a
FedAvg with a different local objective; the core is::

    base = fl.fed_avg(model, client_optimizer)

    def client_update(server_params, client_state, data, rng):
      out = base.client_update(server_params, client_state, data, rng)
      return out._replace(update=clip(out.update))   # only what differs

    algorithm = base._replace(client_update=client_update, name="...")

Aggregation is a separate, composable stage: pass ``aggregator=`` (see
:mod:`fedjax_lite.aggregators`) to change how the round reduces updates.

Rules of thumb: hyperparameters that stay fixed are Python floats closed over
by the factory; anything that changes per round (counters, keys, control
variates) lives in the server state, a ``flax.struct.dataclass``; per-client
randomness uses the ``rng`` argument, per-round choices shared by all clients
use a key the server broadcasts (see :mod:`.stragglers`); ``data.slot`` is the
client's position in the round's sample. Test against a float64 numpy
reference of the update rule, with and without jit
(``tests/test_algorithms.py``).

The family and what each one changes
====================================

============================  ==============================================
:func:`fed_avg`               the baseline (McMahan et al., arXiv:1602.05629)
:func:`fed_prox`              local objective ``+ mu/2 ||w - w_t||^2``
:func:`fed_adam`,             server optimizer (Reddi et al.,
:func:`fed_yogi`,             arXiv:2003.00295), adaptivity ``tau``
:func:`fed_adagrad`
:func:`fed_avg_m`             server momentum (arXiv:1909.06335)
:func:`with_stragglers`       wraps any algorithm: FedProx's systems
                              heterogeneity (drop, or keep fewer epochs)
:func:`scaffold`              gradient correction + per-client control
                              variates (arXiv:1910.06378)
:func:`fed_nova`              normalized update + ``tau_eff`` rescaling
                              (arXiv:2007.07481)
:func:`mime_lite`,            server optimizer state broadcast and frozen in
:func:`mime`                  local steps; Mime adds SVRG (arXiv:2008.03606)
:func:`q_fed_avg`             fairness reweighting of the aggregate
                              (arXiv:1905.10497)
:func:`ditto`                 per-client personal models (arXiv:2012.04221)
============================  ==============================================
"""

from fedjax_lite.algorithms.base import (
  Aggregate,
  ClientOutput,
  FederatedAlgorithm,
  hyperparameter,
  tree_select,
  tree_sub,
  tree_zeros_like,
)
from fedjax_lite.algorithms.ditto import ditto, personal_params
from fedjax_lite.algorithms.fed_avg import (
  ServerState,
  fed_avg,
  model_objective,
  server_opt_update,
)
from fedjax_lite.algorithms.fed_nova import fed_nova
from fedjax_lite.algorithms.fed_opt import (
  fed_adagrad,
  fed_adam,
  fed_avg_m,
  fed_yogi,
  fedopt_server_optimizer,
  scale_by_fedopt,
)
from fedjax_lite.algorithms.fed_prox import fed_prox, prox_objective
from fedjax_lite.algorithms.full_batch import (
  first_epoch,
  full_batch_grad,
  full_batch_loss,
)
from fedjax_lite.algorithms.local import (
  LocalResult,
  local_train,
  objective_grad_fn,
)
from fedjax_lite.algorithms.mime import MimeState, mime, mime_lite
from fedjax_lite.algorithms.q_ffl import q_fed_avg
from fedjax_lite.algorithms.scaffold import ScaffoldState, scaffold
from fedjax_lite.algorithms.stragglers import (
  StragglerState,
  straggler_epochs,
  with_stragglers,
)
