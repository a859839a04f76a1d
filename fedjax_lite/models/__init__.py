"""Models: the Model interface, flax wrappers and reference architectures."""

from fedjax_lite.models.core import (
  Model,
  accuracy,
  from_flax,
  num_params,
  softmax_cross_entropy,
)
from fedjax_lite.models.layers import Dense, dense_matmul
from fedjax_lite.models.simple import (
  dense_flops_per_example,
  logistic_regression,
  mlp,
)
from fedjax_lite.models.cnn import FedAvgCNN, cnn
from fedjax_lite.models.lstm import CharLSTM, char_lstm
