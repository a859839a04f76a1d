"""Federated algorithms as small tuples of pure functions."""

from fedjax_lite.algorithms.base import (Aggregate, ClientOutput,
                                         FederatedAlgorithm, tree_sub,
                                         tree_zeros_like)
from fedjax_lite.algorithms.fed_avg import (ServerState, fed_avg,
                                            model_objective, server_opt_update)
from fedjax_lite.algorithms.local import LocalResult, local_train, loss_grad_fn
