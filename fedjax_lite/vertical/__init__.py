"""Vertical federated learning and federated transfer learning.

placeholder
"""

from fedjax_lite.vertical.data import (AlignedData, Party, VerticalDataset,
                                       align_rows, breast_cancer_vertical,
                                       digits_vertical, split_vertical)
from fedjax_lite.vertical import paillier, psi
from fedjax_lite.vertical.psi import PsiResult, ecdh_psi
from fedjax_lite.vertical.hetero_lr import (
    HeteroLRState, VerticalLRProcess,
    build_vertical_logistic_regression_process, taylor_loss)
from fedjax_lite.vertical.split_nn import (SplitNNProcess, SplitNNState,
                                           build_split_nn_process)
from fedjax_lite.vertical.ftl import (FTLData, FTLProcess, FTLState,
                                      build_ftl_process, digits_transfer,
                                      split_transfer, train_target_alone)
