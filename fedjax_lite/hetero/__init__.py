"""Heterogeneous architectures: FedMA (matched averaging) and HeteroFL.

Sits beside :mod:`fedjax_lite.learning`: it uses ``algorithms/``,
``engine/``, ``models/`` and ``data/``; nothing below imports it.

* :func:`fed_ma` / :func:`build_fed_ma_process` -- FedMA (Wang et al. 2020,
  arXiv:2002.06440): layer-wise BBP-MAP matching of neurons, clients with
  different hidden widths; :func:`matched_average` is the one-shot version.
* :func:`hetero_fl` -- HeteroFL (Diao et al. 2021, arXiv:2010.01264): nested
  width slices trained inside one jitted round with width masks.
* :mod:`.matching` -- the BBP-MAP cost and the Hungarian matching (host).
* :mod:`.layers` -- the supported networks (MLP, FedAvg CNN) and width masks.
"""

from fedjax_lite.hetero import layers, matching
from fedjax_lite.hetero.fed_ma import (
  FedMAClientState,
  FedMAProcess,
  FedMAState,
  build_fed_ma_process,
  fed_ma,
  matched_average,
  round_communication,
  stages_per_round,
)
from fedjax_lite.hetero.hetero_fl import (
  LEVELS,
  communication,
  hetero_fl,
  sub_model_params,
)
from fedjax_lite.hetero.matching import Matching, bbp_map_cost, match_atoms
