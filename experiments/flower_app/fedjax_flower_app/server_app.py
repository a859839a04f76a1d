"""The ServerApp: the algorithm's aggregation and server update."""

from fedjax_lite import flower

from fedjax_flower_app import task


def build_strategy(context):
  config = context.run_config
  nodes = int(config["min-nodes"])
  return flower.AlgorithmStrategy(
    task.algorithm(config),
    task.initial_params(config),
    seed=int(config["seed"]),
    min_train_nodes=nodes,
    min_available_nodes=nodes,
    fraction_evaluate=float(config["fraction-evaluate"]),
    min_evaluate_nodes=nodes,
    accept_failures=bool(config["accept-failures"]),
  )


app = flower.server_app(build_strategy)
