"""The ClientApp: the algorithm's client update on this node's partition."""

from fedjax_lite import flower

from fedjax_flower_app import task


def setup(context) -> flower.ClientSetup:
  k, _ = flower.node_partition(context)
  config = context.run_config
  return flower.ClientSetup(
    algorithm=task.algorithm(config),
    local_work=task.local_work(config),
    train_data=task.partition(config, k),
  )


app = flower.client_app(setup)
