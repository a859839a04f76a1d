"""Seconds per round of fedjax_lite vs a per-client loop and naive vmap.

Workloads (see BENCHMARKS.md): ``mlp100`` (100 clients x 100 examples of 784
features, MLP 784-200-200-62) and ``logreg1000`` (1000 clients x 50 examples of
60 features, logistic regression to 10 classes); SGD lr 0.05, batch 10, one
local epoch; server FedAvg (SGD lr 1.0) weighted by examples; data from
``numpy.random.default_rng(0)``.

Every measurement runs in its own process, in this order, in one invocation:
the matmul peak (default XLA settings), (b) a per-client jitted Python loop
(what FedJAX does; default XLA settings), (c) naive ``vmap`` over all clients
(default XLA settings) and (a) the engine with the settings ``fedjax_lite``
chooses by default. A round includes sampling/gathering client data, local
training, aggregation and the server update. Reported: median seconds/round
over the timed rounds after a warm-up round, model GFLOP/s (6 x MACs per
example), the fraction of the measured matmul peak, peak RSS, and ratios.

Run::

  python experiments/benchmarks/benchmark.py           # both workloads, all modes
  python experiments/benchmarks/benchmark.py --json out.json
  python experiments/benchmarks/benchmark.py --memory  # logreg 1k vs 10k clients

The other scripts here build their data and models with :func:`make_data`,
:func:`make_dataset` and :func:`model_for`; ``compare_trees.py`` runs this
file's engine worker (``--worker engine``) of two source trees.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys

WORKLOADS = {
  # name: population, clients/round, examples/client, features, classes,
  #       hidden layers
  "mlp100": dict(
    num_clients=100,
    clients_per_round=100,
    examples=100,
    features=784,
    classes=62,
    hidden=(200, 200),
  ),
  "logreg1000": dict(
    num_clients=1000,
    clients_per_round=1000,
    examples=50,
    features=60,
    classes=10,
    hidden=(),
  ),
}
LR, BATCH = 0.05, 10

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (the benchmarks' shared helpers)


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak_rss() -> bool:
  """Resets the kernel's peak-RSS mark (VmHWM) of this process (Linux)."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def hwm_rss_mb() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024.0
  return float("nan")


def current_rss_mb() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def make_data(w, num_clients=None):
  """Per-client arrays x [clients, examples, features], y [clients,
  examples] from ``numpy.random.default_rng(0)``."""
  import numpy as np

  n = num_clients or w["num_clients"]
  rng = np.random.default_rng(0)
  x = rng.standard_normal((n, w["examples"], w["features"]), dtype=np.float32)
  y = rng.integers(0, w["classes"], (n, w["examples"])).astype(np.int32)
  return x, y


def make_dataset(w):
  """:func:`make_data` packed as a ``FederatedDataset`` (client k holds
  rows ``[k * examples, (k + 1) * examples)``)."""
  import fedjax_lite as fl

  x, y = make_data(w)
  return fl.FederatedDataset(
    features={"x": x.reshape(-1, w["features"]), "y": y.reshape(-1)},
    offsets=[i * w["examples"] for i in range(w["num_clients"])],
    counts=[w["examples"]] * w["num_clients"],
  )


def model_for(w, fast_grad=True):
  import fedjax_lite as fl

  if w["hidden"]:
    return fl.models.mlp(
      w["features"], w["classes"], w["hidden"], fast_grad=fast_grad
    )
  return fl.models.logistic_regression(
    w["features"], w["classes"], fast_grad=fast_grad
  )


def round_flops(w, params) -> float:
  import fedjax_lite as fl

  per_example = fl.models.dense_flops_per_example(params)
  return float(per_example * w["examples"] * w["clients_per_round"])


def time_rounds(fn, rounds):
  """:func:`common.time_calls` of ``fn`` (blocked until its result is
  ready): a warm-up round, then ``rounds`` timed ones."""
  import jax

  return common.time_calls(lambda: jax.block_until_ready(fn()), rounds)


# ----------------------------------------------------------------- workers
def worker_engine(args):
  import fedjax_lite as fl
  import jax
  import optax

  w = dict(WORKLOADS[args.workload])
  if args.clients_per_round:
    w["clients_per_round"] = args.clients_per_round
  if args.num_clients:
    w["num_clients"] = args.num_clients
  ds = make_dataset(w)
  model = model_for(w, fast_grad=not args.plain_dense)
  params = model.init(jax.random.PRNGKey(0))
  work = fl.LocalWork(batch_size=BATCH, num_epochs=1)
  engine = fl.Engine(
    fl.fed_avg(model, optax.sgd(LR), optax.sgd(1.0)),
    fl.RoundConfig(w["clients_per_round"], work, block_size=args.block_size),
  )
  data = engine.put_data(ds)
  del ds
  jax.block_until_ready(data)
  rss_data = current_rss_mb()
  state = engine.init(params, seed=0)
  holder = {"s": state}

  # Compile explicitly so that the memory window below holds only execution.
  compiled = engine._round_jit.lower(state, data).compile()  # pylint: disable=protected-access
  try:
    temp_mb = compiled.memory_analysis().temp_size_in_bytes / 2**20
  except Exception:  # pylint: disable=broad-except
    temp_mb = float("nan")
  rss_before = current_rss_mb()
  reset = reset_peak_rss()

  def one():
    holder["s"], _ = compiled(holder["s"], data)
    return holder["s"].server.params

  out = time_rounds(one, args.rounds)
  out.update(
    {
      "rss_before_rounds_mb": rss_before,
      "xla_temp_mb": temp_mb,
      "round_peak_rss_mb": hwm_rss_mb() if reset else float("nan"),
      "devices": len(jax.devices()),
      "platform": jax.devices()[0].platform,
      "block_size": engine.block_sizes,
      "traces": engine.num_traces,
      "settings": fl.runtime.settings(),
      "rss_after_data_mb": rss_data,
    }
  )
  if args.scan_rounds:
    k, st = args.scan_rounds, holder["s"]
    scan = time_rounds(lambda: engine.run(st, data, k), 1)
    out["scan_seconds_per_round"] = scan["seconds_per_round"] / k
  out["flops_per_round"] = round_flops(w, params)
  return out


def _client_fn(model):
  import jax
  import optax

  opt = optax.sgd(LR)

  def client(params, xb, yb):
    def step(p, batch):
      x, yy = batch
      mask = jax.numpy.ones(x.shape[:1], bool)
      g, _ = jax.grad(model.batch_loss, has_aux=True)(
        p, {"x": x, "y": yy}, mask
      )
      u, _ = opt.update(g, opt.init(p), p)
      return optax.apply_updates(p, u), None

    p, _ = jax.lax.scan(step, params, (xb, yb))
    return jax.tree.map(lambda a, b: a - b, params, p)

  return client


def worker_loop(args):
  """A lean per-client loop: one jitted call runs a client's whole local
  training (``lax.scan`` over its batches), one jitted call accumulates."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  w = WORKLOADS[args.workload]
  x, y = make_data(w)
  model = model_for(w, fast_grad=not args.plain_dense)
  params = model.init(jax.random.PRNGKey(0))
  client = jax.jit(_client_fn(model))
  accumulate = jax.jit(
    lambda acc, d, wt: jax.tree.map(lambda a, b: a + wt * b, acc, d)
  )
  server = jax.jit(
    lambda p, acc, tot: jax.tree.map(lambda a, b: a - b / tot, p, acc)
  )
  rng = np.random.default_rng(1)
  steps = w["examples"] // BATCH
  holder = {"p": params}

  def one():
    p = holder["p"]
    ids = rng.choice(w["num_clients"], w["clients_per_round"], replace=False)
    acc = jax.tree.map(jnp.zeros_like, p)
    total = 0.0
    for c in ids:
      perm = rng.permutation(w["examples"])
      xb = x[c][perm].reshape(steps, BATCH, -1)
      yb = y[c][perm].reshape(steps, BATCH)
      delta = client(p, xb, yb)
      acc = accumulate(acc, delta, float(w["examples"]))
      total += w["examples"]
    holder["p"] = server(p, acc, total)
    return holder["p"]

  out = time_rounds(one, args.rounds)
  out["flops_per_round"] = round_flops(w, params)
  return out


def worker_fedjax_loop(args):
  """The FedJAX approach (its default ``for_each_client`` jit backend).

  A Python loop over clients; per client a jitted ``client_init``, a jitted
  ``client_step`` per batch and a jitted ``client_final``; the server averages
  the client deltas with eager weighted tree sums, as ``fedjax.tree_util``
  does, then applies the server optimizer.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  w = WORKLOADS[args.workload]
  x, y = make_data(w)
  model = model_for(w, fast_grad=not args.plain_dense)
  params = model.init(jax.random.PRNGKey(0))
  opt = optax.sgd(LR)
  server_opt = optax.sgd(1.0)

  @jax.jit
  def client_init(server_params, rng):
    return {
      "params": server_params,
      "opt_state": opt.init(server_params),
      "rng": rng,
    }

  @jax.jit
  def client_step(state, batch):
    rng, use_rng = jax.random.split(state["rng"])
    mask = jnp.ones(batch["x"].shape[:1], bool)
    g, _ = jax.grad(model.batch_loss, has_aux=True)(
      state["params"], batch, mask, use_rng
    )
    u, opt_state = opt.update(g, state["opt_state"], state["params"])
    return {
      "params": optax.apply_updates(state["params"], u),
      "opt_state": opt_state,
      "rng": rng,
    }

  @jax.jit
  def client_final(server_params, state):
    return jax.tree.map(lambda a, b: a - b, server_params, state["params"])

  @jax.jit
  def server_update(p, opt_state, delta):
    u, opt_state = server_opt.update(delta, opt_state, p)
    return optax.apply_updates(p, u), opt_state

  rng = np.random.default_rng(1)
  holder = {
    "p": params,
    "o": server_opt.init(params),
    "k": jax.random.PRNGKey(0),
  }

  def one():
    p = holder["p"]
    ids = rng.choice(w["num_clients"], w["clients_per_round"], replace=False)
    total, acc = 0.0, None
    for c in ids:
      perm = rng.permutation(w["examples"])
      cx, cy = x[c][perm], y[c][perm]
      holder["k"], k = jax.random.split(holder["k"])
      state = client_init(p, k)
      for s in range(0, w["examples"], BATCH):
        state = client_step(
          state, {"x": cx[s : s + BATCH], "y": cy[s : s + BATCH]}
        )
      delta = client_final(p, state)
      weighted = jax.tree.map(lambda d: d * float(w["examples"]), delta)
      acc = weighted if acc is None else jax.tree.map(jnp.add, acc, weighted)
      total += w["examples"]
    mean = jax.tree.map(lambda a: a / total, acc)
    holder["p"], holder["o"] = server_update(p, holder["o"], mean)
    return holder["p"]

  out = time_rounds(one, args.rounds)
  out["flops_per_round"] = round_flops(w, params)
  return out


def worker_vmap(args):
  """Naive vmap over all sampled clients at once (every model copy live)."""
  import jax
  import jax.numpy as jnp

  w = WORKLOADS[args.workload]
  x, y = make_data(w)
  model = model_for(w, fast_grad=not args.plain_dense)
  params = model.init(jax.random.PRNGKey(0))
  client = _client_fn(model)
  steps = w["examples"] // BATCH
  xd, yd = jnp.asarray(x), jnp.asarray(y)
  m = w["clients_per_round"]

  @jax.jit
  def rnd(p, key):
    k1, k2 = jax.random.split(key)
    ids = jax.random.choice(k1, w["num_clients"], (m,), replace=False)
    perm = jax.vmap(lambda k: jax.random.permutation(k, w["examples"]))(
      jax.random.split(k2, m)
    )
    xb = jnp.take_along_axis(xd[ids], perm[..., None], 1).reshape(
      m, steps, BATCH, -1
    )
    yb = jnp.take_along_axis(yd[ids], perm, 1).reshape(m, steps, BATCH)
    deltas = jax.vmap(client, in_axes=(None, 0, 0))(p, xb, yb)
    return jax.tree.map(lambda a, d: a - d.mean(0), p, deltas)

  holder = {"p": params, "k": jax.random.PRNGKey(0)}

  def one():
    holder["k"], k = jax.random.split(holder["k"])
    holder["p"] = rnd(holder["p"], k)
    return holder["p"]

  out = time_rounds(one, args.rounds)
  out["flops_per_round"] = round_flops(w, params)
  return out


WORKERS = {
  "engine": worker_engine,
  "fedjax_loop": worker_fedjax_loop,
  "loop": worker_loop,
  "vmap": worker_vmap,
}


def run_worker(mode, workload, rounds, extra=(), tuned=False):
  """One worker of this file in a process of its own (without the
  package's CPU settings unless ``tuned``)."""
  env = {} if tuned else {"FEDJAX_LITE_CPU_TUNING": "0"}
  argv = [os.path.abspath(__file__), "--worker", mode, "--workload", workload]
  return common.run_worker(argv + ["--rounds", str(rounds), *extra], env=env)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workloads", default="mlp100,logreg1000")
  ap.add_argument(
    "--modes",
    default="fedjax_loop,loop,vmap,engine",
    help="comma list of fedjax_loop, loop, vmap, engine, "
    "engine_default_xla (the engine without the package's CPU "
    "settings)",
  )
  ap.add_argument("--rounds", type=int, default=5, help="timed rounds")
  ap.add_argument("--json", default=None, help="write results here")
  ap.add_argument(
    "--memory",
    action="store_true",
    help="also measure logreg with 1k vs 10k clients/round",
  )
  ap.add_argument(
    "--plain-dense",
    action="store_true",
    help="use autodiff's dense gradient layout everywhere",
  )
  # worker options
  ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--workload", default="mlp100", help=argparse.SUPPRESS)
  ap.add_argument("--block-size", type=int, default=None)
  ap.add_argument(
    "--clients-per-round", type=int, default=None, help=argparse.SUPPRESS
  )
  ap.add_argument(
    "--num-clients", type=int, default=None, help=argparse.SUPPRESS
  )
  ap.add_argument("--scan-rounds", type=int, default=0, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)

  if args.worker:
    if args.worker == "engine":
      import fedjax_lite  # noqa: F401  (applies the package's CPU settings)
    out = WORKERS[args.worker](args)
    out["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(out))
    return

  extra = ["--plain-dense"] if args.plain_dense else []
  # No JAX backend in this process: every measurement runs in a worker.
  results = common.start_record(__file__, argv)
  peak = results["peak"]
  print(f"# CPU: {results['machine']['cpu']}", flush=True)
  print(
    f"# matmul peak (jax, default XLA, {peak['matmul_n']}^2): "
    f"{peak['peak_gflops']:.1f} GFLOP/s",
    flush=True,
  )
  modes = args.modes.split(",")
  for wl in args.workloads.split(","):
    res = {}
    for mode in modes:
      bs = (
        ["--block-size", str(args.block_size)]
        if (args.block_size and mode == "engine")
        else []
      )
      sc = ["--scan-rounds", "5"] if mode.startswith("engine") else []
      worker = "engine" if mode.startswith("engine") else mode
      r = run_worker(
        worker, wl, args.rounds, extra + bs + sc, tuned=(mode == "engine")
      )
      r["gflops"] = r["flops_per_round"] / r["seconds_per_round"] / 1e9
      r["fraction_of_peak"] = r["gflops"] / peak["peak_gflops"]
      res[mode] = r
      print(
        f"{wl:11s} {mode:7s} {r['seconds_per_round'] * 1e3:9.2f} ms/round "
        f"{r['gflops']:7.1f} GFLOP/s ({100 * r['fraction_of_peak']:.0f}% of "
        f"peak)  peak RSS {r['peak_rss_mb']:.0f} MB"
        + (
          f"  scan {r['scan_seconds_per_round'] * 1e3:.2f} ms/round"
          if "scan_seconds_per_round" in r
          else ""
        ),
        flush=True,
      )
    if "engine" in res:
      for base in ("fedjax_loop", "loop", "vmap"):
        if base in res:
          ratio = (
            res[base]["seconds_per_round"] / res["engine"]["seconds_per_round"]
          )
          res[f"speedup_vs_{base}"] = ratio
          print(f"{wl:11s} engine is {ratio:.2f}x faster than {base}")
    results[wl] = res
  if args.memory:
    mem = {}
    for m, block in (
      (1000, None),
      (10000, None),
      ("1000-b250", 250),
      ("10000-b250", 250),
    ):
      clients = int(str(m).split("-")[0])
      bs = ["--block-size", str(block)] if block else []
      r = run_worker(
        "engine",
        "logreg1000",
        3,
        ["--num-clients", "10000", "--clients-per-round", str(clients)] + bs,
        tuned=True,
      )
      # Working memory of a round: peak RSS while executing rounds (the
      # kernel's high-water mark is reset after compiling; the window holds
      # the first execution and the timed rounds) minus the resident memory
      # before them (data, params, compiled program).
      r["beyond_data_mb"] = r["round_peak_rss_mb"] - r["rss_before_rounds_mb"]
      mem[m] = r
      print(
        f"logreg pop=10000 clients/round={m!s:>10} block "
        f"{r['block_size']}: data resident "
        f"{r['rss_after_data_mb']:.0f} MB, before rounds "
        f"{r['rss_before_rounds_mb']:.0f} MB (data + compiled round), "
        f"peak while executing rounds "
        f"{r['round_peak_rss_mb']:.0f} MB -> round working memory "
        f"{r['beyond_data_mb']:.1f} MB (XLA temp buffers "
        f"{r['xla_temp_mb']:.1f} MB); process peak "
        f"{r['peak_rss_mb']:.0f} MB (includes compiling); "
        f"{r['seconds_per_round'] * 1e3:.1f} ms/round",
        flush=True,
      )
    for tag, a, b in (
      ("auto", 10000, 1000),
      ("b250", "10000-b250", "1000-b250"),
    ):
      mem[f"ratio_beyond_data_{tag}"] = mem[a]["beyond_data_mb"] / max(
        mem[b]["beyond_data_mb"], 1e-9
      )
      mem[f"ratio_xla_temp_{tag}"] = mem[a]["xla_temp_mb"] / max(
        mem[b]["xla_temp_mb"], 1e-9
      )
      print(
        f"round working memory, 10k / 1k clients per round, block "
        f"{tag}: {mem[f'ratio_beyond_data_{tag}']:.2f}x (RSS), "
        f"{mem[f'ratio_xla_temp_{tag}']:.2f}x (XLA temp buffers)"
      )
    results["memory"] = mem
  common.write_record(results, args.json)


if __name__ == "__main__":
  main()
