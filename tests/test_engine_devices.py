"""Each device computes only its own clients: the block step runs under
``shard_map``, so no partitioner choice can replicate client work."""

import jax
import numpy as np
import optax
import pytest

import fedjax_lite as fl


def compiled_round(model, ds, num_devices, block_size, clients_per_round):
  mesh = fl.engine.default_mesh(jax.devices("cpu")[:num_devices])
  engine = fl.Engine(
    fl.fed_avg(model, optax.sgd(0.1)),
    fl.RoundConfig(
      clients_per_round,
      fl.LocalWork(batch_size=5, num_epochs=1),
      block_size=block_size,
    ),
    mesh=mesh,
  )
  data = engine.put_data(ds)
  state = engine.init(model.init(jax.random.PRNGKey(0)), seed=0)
  compiled = engine._round_jit.lower(state, data).compile()  # pylint: disable=protected-access
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]), compiled.as_text()


@pytest.mark.parametrize(
  "model,shape",
  [
    # lax convolutions (a vmapped block of them is a grouped convolution)
    (
      fl.models.cnn((8, 8, 2), 3, channels=(4, 8), hidden=8, fast=False),
      (8, 8, 2),
    ),
    (fl.models.mlp(30, 5, (64,)), (30,)),
  ],
)
def test_no_device_computes_another_devices_clients(model, shape):
  rng = np.random.default_rng(0)
  n, e = 8, 20
  ds = fl.FederatedDataset(
    features={
      "x": rng.standard_normal((n * e,) + shape).astype(np.float32),
      "y": rng.integers(0, 3, n * e).astype(np.int32),
    },
    offsets=[i * e for i in range(n)],
    counts=[e] * n,
  )
  # one block of 2 clients: on 2 devices each device trains 1 of them
  two, hlo = compiled_round(model, ds, 2, 1, 2)
  one_of_one, _ = compiled_round(model, ds, 1, 1, 2)  # 1 client per block
  two_on_one, _ = compiled_round(model, ds, 1, 2, 2)  # 2 clients per block
  assert two == pytest.approx(one_of_one, rel=0.05)
  assert two < 0.6 * two_on_one
  assert "all-gather" not in hlo
