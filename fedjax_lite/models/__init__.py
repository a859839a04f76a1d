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
from fedjax_lite.models.cnn import FedAvgCNN, SimpleCNN, cnn, simple_cnn
from fedjax_lite.models.conv import (
  Conv,
  ConvCM,
  DenseCM,
  conv2d,
  conv2d_cm,
  conv_general_dilated,
  dense_cm,
  max_pool,
  max_pool_cm,
  to_channel_last,
  to_channel_major,
)
from fedjax_lite.models.lstm import CharLSTM, char_lstm
from fedjax_lite.models.resnet import ResNet18GN, resnet18_gn
from fedjax_lite.models.standard import (
  STANDARD_MODELS,
  emnist_cnn,
  group_norm_cm,
  multi_label_metrics,
  resnet18_gn_tff,
  sequence_metrics,
  shakespeare_lstm,
  sigmoid_cross_entropy,
  stackoverflow_nwp_lstm,
  stackoverflow_tag_lr,
)
