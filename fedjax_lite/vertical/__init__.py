"""Vertical federated learning and federated transfer learning.

Horizontal FL (the engine) has clients with the same features and different
samples. Here the parties share samples but hold different features
(vertical FL, e.g. a bank and a retailer with common customers), or share
neither except a small overlap (federated transfer learning):

* :mod:`.data`: :class:`Party`, :class:`VerticalDataset`, the splitters
  (:func:`split_vertical`, :func:`breast_cancer_vertical`,
  :func:`digits_vertical`) and :class:`AlignedData`;
* :mod:`.psi`: ECDH private set intersection over X25519 to align rows;
* :mod:`.hetero_lr`: Taylor-loss hetero logistic regression (Hardy et al.
  2017), plaintext (jitted) or Paillier with an arbiter;
* :mod:`.split_nn`: SplitNN (bottom models per party, top model at the
  label owner), optional noise on cut-layer gradients;
* :mod:`.ftl`: federated transfer learning (Liu et al. 2020), plaintext or
  two-key Paillier;
* :mod:`.paillier`: the ``phe`` helpers (fixed-point encoding, masking).

Each setting has a TFF-style builder whose process has ``initialize(seed)``
and ``next(state) -> (state, metrics)``. Layer: this package sits at the
level of ``learning.py``; it imports ``models`` (and ``scikit-learn``'s
bundled datasets), and nothing in the package imports it except
``fedjax_lite/__init__.py``. The cryptographic parts are single-process
simulations of the protocols with real primitives (``cryptography``,
``phe``); each module states what its protocol protects and what it does not.
"""

from fedjax_lite import _lazy

# Imported at first use (PEP 562): see fedjax_lite/_lazy.py.
__getattr__, __dir__, __all__ = _lazy.attach(
  __name__,
  {
    "data": (
      "AlignedData",
      "Party",
      "VerticalDataset",
      "align_rows",
      "breast_cancer_vertical",
      "digits_vertical",
      "split_vertical",
    ),
    "ftl": (
      "FTLData",
      "FTLProcess",
      "FTLState",
      "build_ftl_process",
      "digits_transfer",
      "split_transfer",
      "train_target_alone",
    ),
    "hetero_lr": (
      "HeteroLRState",
      "VerticalLRProcess",
      "build_vertical_logistic_regression_process",
      "taylor_loss",
    ),
    "paillier": (),
    "psi": ("PsiResult", "ecdh_psi"),
    "split_nn": ("SplitNNProcess", "SplitNNState", "build_split_nn_process"),
  },
)
