"""Vertical federated learning and federated transfer learning.

placeholder
"""

from fedjax_lite.vertical.data import (AlignedData, Party, VerticalDataset,
                                       align_rows, breast_cancer_vertical,
                                       digits_vertical, split_vertical)
from fedjax_lite.vertical.psi import PsiResult, ecdh_psi
from fedjax_lite.vertical.hetero_lr import (
    HeteroLRState, VerticalLRProcess,
    build_vertical_logistic_regression_process, taylor_loss)
