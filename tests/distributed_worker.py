"""One process of a multi-process engine run (started by test_distributed.py).

  python tests/distributed_worker.py OUT NUM_PROCESSES PROCESS_ID DEVICES \\
      PLACEMENT COORDINATOR

Trains FedAvg (MLP, Adam server) for 4 rounds on a fixed population and
writes the final parameters (process 0) to OUT as JSON.
"""

import json
import sys

import fedjax_lite as fl
from fedjax_lite import distributed


def main(out, num_processes, process_id, devices, placement, coordinator):
  if num_processes > 1:
    distributed.initialize(
      coordinator,
      num_processes,
      process_id,
      local_devices=devices,
      timeout_s=int(__import__("os").environ.get("WORKER_TIMEOUT", 60)),
    )
  else:
    fl.configure_cpu(num_devices=devices, force=True)
  import jax  # noqa: E402
  import numpy as np  # noqa: E402
  import optax  # noqa: E402

  rng = np.random.default_rng(0)
  sizes = rng.integers(1, 30, size=40)
  ds = fl.FederatedDataset.from_clients(
    [
      {
        "x": rng.standard_normal((n, 4)).astype(np.float32),
        "y": rng.integers(0, 3, n).astype(np.int32),
      }
      for n in sizes
    ]
  )
  loaded = []

  def load(clients):
    loaded.append(len(clients))
    return fl.data.client_rows(ds, clients)

  source = ds
  if placement == "sharded":
    source = fl.data.ClientLoader(ds.counts, load)
  model = fl.models.mlp(4, 3, hidden=(6,))
  engine = fl.Engine(
    fl.fed_avg(model, optax.sgd(0.05), optax.adam(0.01)),
    fl.RoundConfig(10, fl.LocalWork(batch_size=4, num_epochs=1)),
  )
  data = engine.put_data(source, buckets=2, placement=placement)
  state = engine.init(model.init(jax.random.PRNGKey(1)), seed=3)
  state, history = engine.run(state, data, 4)
  result = {
    "params": jax.tree.map(
      lambda a: np.asarray(a).tolist(), state.server.params
    ),
    "loss": np.asarray(history["loss"]).tolist(),
    "devices": len(jax.devices()),
    "processes": jax.process_count(),
    "clients_loaded": int(sum(loaded[1:])),
  }
  with open(f"{out}.{process_id}", "w") as f:
    json.dump(result, f)


if __name__ == "__main__":
  a = sys.argv[1:]
  main(a[0], int(a[1]), int(a[2]), int(a[3]), a[4], a[5])
