"""Cost of secure aggregation per round: SecAgg (complete graph, Bonawitz et
al. 2017) vs SecAgg+ (random Harary graph, Bell et al. 2020) for 100 and 1,000
clients per round.

Model: logistic regression 60 -> 10 (d = 610 parameters); updates clipped to
L2 norm 1 and quantized with 16 bits per value; modulus b = 16 +
ceil(log2 n) + 1; 10% of the clients drop after masking. SecAgg+ uses
``secagg_plus_degree(n, dropout_rate=0.1)`` (k = 30, t = 16 for n = 100;
k = 34, t = 18 for n = 1000); SecAgg uses t = n // 2 + 1.

What is measured, per configuration:

* client host seconds: ONE client's own key agreements (2 per neighbour),
  HKDFs, Shamir split and AES-GCM encryptions
  (:func:`client_host_work`, mean over sampled clients);
* client device seconds: expanding and adding every client's masks (all ``n``
  clients in one vmapped call, divided by ``n``);
* server host seconds: Shamir reconstruction of every survivor's b_u and
  every dropped client's s^SK, and the key agreements that rebuild the
  dropped clients' pairwise seeds; server device seconds: removing the masks
  from the sum; survivors' decryption of the shares they reveal (client
  work, reported apart);
* bytes: each client's sent/received messages and the server's totals,
  counted from the actual messages in the simulation (wire sizes of keys,
  ciphertexts, b-bit masked vectors, shares).

Full simulation for every configuration except SecAgg with 1,000 clients:
there every client's Shamir split is a degree-500 polynomial evaluated at
1,000 points for 5 field elements on Python integers (~0.3 s per client,
~5 min for all), so it is SAMPLED and EXTRAPOLATED, as the json marks:
client host work is measured on 3 clients (per-client cost does not depend
on the client); the server's reconstruction is timed on shares from those
clients and multiplied by the number of secrets; its key agreements are
timed on 500 and multiplied by the count (#dropped x #surviving neighbours);
device mask expansion is timed on 100 clients x 999 neighbours with random
seeds (the PRG's cost does not depend on the key) and multiplied by 10; the
server's mask removal (1,000 self masks + 100 dropped rows x 999) runs in
full, on random seeds; bytes come from the same per-message sizes (checked
equal to the simulation's counts for the simulated configurations).

Run (about 3 minutes on 2 cores)::

  python experiments/benchmarks/secagg.py           # 100 and 1000 clients
  python experiments/benchmarks/secagg.py --smoke   # seconds (20 and 40)

Writes experiments/results/secure_aggregation.{md,json}.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fedjax_lite as fl  # first: applies the CPU settings
from cryptography.hazmat.primitives.asymmetric import x25519
from fedjax_lite.privacy import secure_aggregation as sa
from fedjax_lite.privacy import shamir

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (the benchmarks' shared helpers)

BITS_PER_VALUE, CLIP, DROPOUT = 16, 1.0, 0.1
CT_BYTES = 12 + 8 + 5 * shamir.ELEMENT_BYTES + 16  # nonce ids shares tag


def expected_traffic(
  neighbors: np.ndarray, alive: np.ndarray, d: int, bits: int
) -> tuple[np.ndarray, np.ndarray]:
  """Per-client bytes (sent, received) from the protocol's message sizes."""
  k = neighbors.shape[1]
  sent = np.full(len(alive), 64 + k * CT_BYTES, np.int64)
  recv = np.full(len(alive), 64 * k + k * CT_BYTES, np.int64)
  nb_alive = alive[neighbors]  # [n, k]
  shares = (
    (4 + shamir.ELEMENT_BYTES * np.where(nb_alive, 2, 3)).sum(1)
    + 4
    + 2 * shamir.ELEMENT_BYTES
  )
  sent += alive * (math.ceil(d * bits / 8) + shares)
  recv += alive * 4 * nb_alive.sum(1)
  return sent, recv


def timed(fn, *args, repeats=2):
  """(seconds of the fastest call after a warm-up, first-call seconds,
  the result)."""
  holder = {}

  def call():
    holder["out"] = jax.block_until_ready(fn(*args))

  t = common.time_calls(call, repeats)
  return t["best_seconds"], t["warmup_seconds"], holder["out"]


def updates(n, d, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, d)) * 0.02
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  x = x * np.minimum(1.0, CLIP / norms)
  return sa.quantize(jnp.asarray(x, jnp.float32), CLIP, BITS_PER_VALUE)


def simulate(n, k, d, samples):
  """The whole protocol, every client, one round."""
  bits = sa.min_modulus_bits(BITS_PER_VALUE, n)
  proto = sa.SecAggRound(
    n, num_neighbors=k, seed=0, message_bits=bits, num_params=d
  )
  client_host = np.mean(
    [
      proto.rederive_client(u)
      for u in range(0, n, max(1, n // samples))[:samples]
    ]
  )
  q = updates(n, d)
  masks = proto.client_masks()
  mask_s, mask_first, y = timed(sa.mask_inputs, q, *masks, bits)
  alive = ~sa.dropped_clients(n, DROPOUT, 0, seed=0)
  y = np.asarray(y)
  masked_sum = y[alive].sum(0, dtype=np.uint32) & np.uint32(2**bits - 1)
  material, info = proto.unmask_material(alive)
  rm_s, rm_first, z = timed(
    sa.remove_masks, jnp.asarray(masked_sum), *material, bits
  )
  plain = np.asarray(q, np.int64)[alive].sum(0)
  exact = bool(np.array_equal(np.asarray(z, np.int64), plain))
  assert exact, "unmasked sum differs from the plain quantized sum"
  sent, recv = expected_traffic(proto.neighbors, alive, d, bits)
  assert np.array_equal(sent, proto.last_traffic.sent), "traffic formula"
  assert np.array_equal(recv, proto.last_traffic.received), "traffic formula"
  return {
    "simulated": "full",
    "degree": proto.degree,
    "threshold": proto.threshold,
    "bits": bits,
    "survivors": int(alive.sum()),
    "exact_sum": exact,
    "client_host_s": float(client_host),
    "all_clients_setup_host_s": proto.setup_seconds,
    "client_device_s": mask_s / n,
    "mask_all_clients_device_s": mask_s,
    "mask_compile_s": mask_first - mask_s,
    "survivors_decrypt_host_s": info["clients_unmask_seconds"],
    "server_host_s": info["server_host_seconds"],
    "server_device_s": rm_s,
    "unmask_compile_s": rm_first - rm_s,
    "server_key_agreements": int(info["server_key_agreements"]),
    "server_prg_expansions": int(info["server_prg_expansions"]),
    "client_key_agreements": 2 * proto.degree,
    "client_prg_expansions": proto.degree + 1,
    "client_bytes_sent": float(sent.mean()),
    "client_bytes_received": float(recv.mean()),
    "survivor_bytes_sent": float(sent[alive].mean()),
    "server_bytes_received": int(sent.sum()),
    "server_bytes_sent": int(recv.sum()),
  }


def sampled(n, d, samples, mask_clients):
  """SecAgg with n clients, measured on samples and extrapolated."""
  bits = sa.min_modulus_bits(BITS_PER_VALUE, n)
  k, t = n - 1, sa.safe_threshold(n)
  gen = np.random.default_rng(0)
  keys = [
    (
      x25519.X25519PrivateKey.from_private_bytes(gen.bytes(32)),
      x25519.X25519PrivateKey.from_private_bytes(gen.bytes(32)),
    )
    for _ in range(n)
  ]
  public = [(sa._public_bytes(c), sa._public_bytes(s)) for c, s in keys]  # pylint: disable=protected-access
  randbits = random.Random(0).getrandbits
  per_client, own = [], []
  for u in range(samples):
    nbrs = [v for v in range(n) if v != u]
    seed = gen.bytes(16)
    t0 = time.perf_counter()
    _, cts, own_share = sa.client_host_work(
      u,
      keys[u][0],
      keys[u][1],
      seed,
      nbrs,
      [public[v] for v in nbrs],
      t,
      0,
      randbits,
    )
    per_client.append(time.perf_counter() - t0)
    own.append((cts, own_share))
  # Server: Lagrange coefficients for t holders (once: every secret shares
  # the same first t survivors) + one t-term sum per secret.
  xs = list(range(1, t + 1))
  t0 = time.perf_counter()
  lams = shamir.lagrange_at_zero(xs)
  lagrange_s = time.perf_counter() - t0
  shares = [
    [random.Random(i).getrandbits(126) for _ in range(3)] for i in range(t)
  ]
  reps = 20
  t0 = time.perf_counter()
  for _ in range(reps):
    shamir.reconstruct(xs, shares, t, lams)
  per_secret = (time.perf_counter() - t0) / reps
  alive = ~sa.dropped_clients(n, DROPOUT, 0, seed=0)
  dropped = int((~alive).sum())
  kas = dropped * int(alive.sum())
  t0 = time.perf_counter()
  for i in range(500):
    sa.pairwise_seed(keys[i % n][1], public[(i * 7 + 1) % n][1], 0)
  per_ka = (time.perf_counter() - t0) / 500
  server_host = lagrange_s + n * per_secret + kas * per_ka
  # Survivors decrypt and decode the n - 1 shares they hold (as in the
  # simulation): timed on the sampled clients' ciphertexts, by receiver.
  jobs = []
  for u, (cts, _) in enumerate(own):
    for v, ct in cts.items():
      jobs.append((sa._encryption_key(keys[v][0], public[u][0], 0), ct))  # pylint: disable=protected-access
  t0 = time.perf_counter()
  for aead, ct in jobs:
    sa._decode_shares(aead.decrypt(ct[:12], ct[12:], None))  # pylint: disable=protected-access
  per_decrypt = (time.perf_counter() - t0) / len(jobs)
  decrypt_all = int(alive.sum()) * (n - 1) * per_decrypt
  # Device: masks of mask_clients clients x (n - 1) neighbours, random keys.
  rng = np.random.default_rng(1)
  q = updates(mask_clients, d)
  sw = jnp.asarray(rng.integers(0, 2**32, (mask_clients, 2), dtype=np.uint32))
  pw = jnp.asarray(
    rng.integers(0, 2**32, (mask_clients, k, 2), dtype=np.uint32)
  )
  sg = jnp.asarray(
    np.where(rng.random((mask_clients, k)) < 0.5, 1, -1), jnp.int32
  )
  mask_s, mask_first, _ = timed(sa.mask_inputs, q, sw, pw, sg, bits, repeats=1)
  # Server mask removal in full: n self masks + dropped rows x (n - 1).
  self_w = jnp.asarray(rng.integers(0, 2**32, (n, 2), dtype=np.uint32))
  rows_w = jnp.asarray(rng.integers(0, 2**32, (dropped, k, 2), dtype=np.uint32))
  rows_s = jnp.asarray(
    np.where(rng.random((dropped, k)) < 0.9, 1, 0), jnp.int32
  )
  rm_s, rm_first, _ = timed(
    sa.remove_masks,
    jnp.zeros((d,), jnp.uint32),
    self_w,
    jnp.asarray(alive, jnp.int32),
    rows_w,
    rows_s,
    bits,
    repeats=1,
  )
  nbrs = np.stack([np.delete(np.arange(n), u) for u in range(n)])
  sent, recv = expected_traffic(nbrs, alive, d, bits)
  return {
    "simulated": (
      f"sampled: client host work on {samples} clients, "
      f"device masks on {mask_clients} clients x {k} "
      "neighbours (random keys), server reconstruction and "
      "key agreements timed per item x counts; extrapolated"
    ),
    "degree": k,
    "threshold": t,
    "bits": bits,
    "survivors": int(alive.sum()),
    "exact_sum": None,
    "client_host_s": float(np.mean(per_client)),
    "all_clients_setup_host_s": float(np.mean(per_client)) * n,
    "client_device_s": mask_s / mask_clients,
    "mask_all_clients_device_s": mask_s / mask_clients * n,
    "mask_compile_s": mask_first - mask_s,
    "survivors_decrypt_host_s": decrypt_all,
    "server_host_s": server_host,
    "server_device_s": rm_s,
    "unmask_compile_s": rm_first - rm_s,
    "server_key_agreements": kas,
    "server_prg_expansions": int(alive.sum()) + kas,
    "client_key_agreements": 2 * k,
    "client_prg_expansions": k + 1,
    "client_bytes_sent": float(sent.mean()),
    "client_bytes_received": float(recv.mean()),
    "survivor_bytes_sent": float(sent[alive].mean()),
    "server_bytes_received": int(sent.sum()),
    "server_bytes_sent": int(recv.sum()),
  }


def engine_rounds(n, timed_rounds=3):
  """Seconds per jitted FedAvg round (after compiling) with the plain
  clipped mean, SecAgg+ and SecAgg as the round's aggregator."""
  train, _ = fl.datasets.fedprox_synthetic(
    1.0, 1.0, num_clients=n, examples_per_client=50, seed=0
  )
  model = fl.models.logistic_regression(60, 10)
  params = model.init(jax.random.PRNGKey(0))
  k_plus, _ = sa.secagg_plus_degree(n, dropout_rate=DROPOUT)
  aggs = {
    "clipped mean (no secure aggregation)": fl.aggregators.clipped(
      fl.aggregators.unweighted_mean(), CLIP
    ),
    f"SecAgg+ (k={k_plus})": sa.secure_aggregator(
      CLIP,
      bits_per_value=BITS_PER_VALUE,
      num_neighbors=k_plus,
      dropout_rate=DROPOUT,
    ),
    "SecAgg": sa.secure_aggregator(
      CLIP, bits_per_value=BITS_PER_VALUE, dropout_rate=DROPOUT
    ),
  }
  out = []
  for name, agg in aggs.items():
    alg = fl.fed_avg(model, optax.sgd(0.05), aggregator=agg)
    engine = fl.Engine(
      alg,
      fl.RoundConfig(
        n, fl.LocalWork(batch_size=10, num_epochs=1), sampling="all"
      ),
    )
    data = engine.put_data(train)
    holder = {"state": engine.init(params, seed=0)}

    def one_round(engine=engine, data=data, holder=holder):
      holder["state"], holder["metrics"] = jax.block_until_ready(
        engine.round(holder["state"], data)
      )

    t = common.time_calls(one_round, timed_rounds)
    first = t["warmup_seconds"]
    row = {
      "clients": n,
      "aggregator": name,
      "round_s": t["seconds_per_round"],
      "first_round_s": first,
    }
    row.update(
      {
        k: float(v)
        for k, v in holder["metrics"].items()
        if k.startswith("secagg_")
      }
    )
    out.append(row)
    print(
      f"engine n={n} {name:40s} {row['round_s']:.3f} s/round "
      f"(first round incl. compile {first:.1f} s)",
      flush=True,
    )
  return out


def markdown(record: dict) -> str:
  """The results page (experiments/results/secure_aggregation.md)."""
  rows, engine_rows = record["rows"], record["engine"]
  lines = [
    "# Secure aggregation: cost per round (SecAgg vs SecAgg+)",
    "",
    common.record_markdown(record)
    + " Host times scale with the load (the machine is shared).",
    "",
    f"Model: logistic regression 60 -> 10 (d = {record['d']}), "
    f"{BITS_PER_VALUE} bits per value, {int(DROPOUT * 100)}% of the "
    "clients drop after masking. Host = Python (`cryptography` X25519, "
    "HKDF-SHA256, AES-GCM; Shamir on Python ints mod 2^127 - 1); device = "
    "JAX threefry mask expansion and uint32 sums (here on one CPU device).",
    "",
    "| clients | protocol | k | t | b | client host s | client device s |"
    " client KB sent | client KB recv | server host s | server device s |"
    " server KAs | server MB recv | survivors' decrypt s | exact | how |",
    "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:"
    "|---|---|",
  ]
  for r in rows:
    how = "simulated" if r["simulated"] == "full" else "sampled + extrapolated"
    lines.append(
      f"| {r['clients']} | {r['protocol']} | {r['degree']} | "
      f"{r['threshold']} | {r['bits']} | {r['client_host_s']:.4f} | "
      f"{r['client_device_s']:.5f} | {r['client_bytes_sent'] / 1e3:.1f} | "
      f"{r['client_bytes_received'] / 1e3:.1f} | "
      f"{r['server_host_s']:.3f} | {r['server_device_s']:.3f} | "
      f"{r['server_key_agreements']} | "
      f"{r['server_bytes_received'] / 1e6:.2f} | "
      f"{r['survivors_decrypt_host_s']:.3f} | "
      f"{'yes' if r['exact_sum'] else ('n/a' if r['exact_sum'] is None else 'NO')}"
      f" | {how} |"
    )
  lines += [
    "",
    "Columns: *client host s* = one client's key agreements (2 per "
    "neighbour), HKDFs, Shamir split and encryptions; *client device s* ="
    " one client's mask expansion (k + 1 PRG vectors of d words; all "
    "clients in one vmapped call / n); *client KB* = mean over all clients"
    " (dropped ones send no masked input and no shares); *server host s* "
    "= reconstructing every secret from t shares + the key agreements for "
    "(dropped, surviving neighbour) pairs; *server device s* = removing "
    "the masks from the sum; *survivors' decrypt s* = all survivors' "
    "AES-GCM decryptions of the shares they reveal (total over clients); "
    "*exact* = unmasked sum == plain quantized sum (integers). Compile "
    "times are excluded (in the json). The masked input of a client is "
    f"d x b bits; the plain update is d x 32 bits = {record['d'] * 4} B.",
    "",
  ]
  by = {(r["clients"], r["protocol"]): r for r in rows}
  for n in sorted({r["clients"] for r in rows}):
    full, plus = by.get((n, "SecAgg")), by.get((n, "SecAgg+"))
    if full and plus and plus["degree"] < full["degree"]:
      lines.append(
        f"- {n} clients: SecAgg+ (k = {plus['degree']}) vs SecAgg: "
        f"{full['client_bytes_sent'] / plus['client_bytes_sent']:.1f}x "
        f"fewer bytes sent and "
        f"{full['client_bytes_received'] / plus['client_bytes_received']:.1f}"
        f"x fewer received per client, "
        f"{full['client_host_s'] / plus['client_host_s']:.1f}x less client"
        f" host time, {full['server_key_agreements'] / max(1, plus['server_key_agreements']):.0f}x"
        f" fewer server key agreements, "
        f"{full['server_host_s'] / plus['server_host_s']:.1f}x less server "
        f"host time, {full['server_device_s'] / plus['server_device_s']:.0f}"
        "x less server device time."
      )
  lines.append("")
  if engine_rows:
    lines += [
      "## A whole FedAvg round in the engine",
      "",
      "One jitted round (sampling, local training of every client, "
      "aggregation, server update) on FedProx Synthetic(1, 1) data, 50 "
      "examples per client, batch 10, one epoch; median of 3 rounds after"
      " the first (which includes compiling). The secure aggregators run "
      "AdvertiseKeys/ShareKeys on the host through `jax.pure_callback` "
      "every round (fresh keys), so their round time includes that host "
      "work.",
      "",
      "| clients | aggregator | s / round | first round s | host setup s "
      "| server host s | KB sent per client |",
      "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in engine_rows:
      lines.append(
        f"| {r['clients']} | {r['aggregator']} | {r['round_s']:.3f} | "
        f"{r['first_round_s']:.1f} | "
        f"{r.get('secagg_setup_host_seconds', 0):.3f} | "
        f"{r.get('secagg_server_host_seconds', 0):.3f} | "
        f"{r.get('secagg_client_bytes_sent', 0) / 1e3:.1f} |"
      )
    lines.append("")
  lines += ["Raw numbers: `secure_aggregation.json`.", ""]
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--smoke", action="store_true")
  p.add_argument("--out", default=common.RESULTS)
  args = p.parse_args(argv)
  record = common.start_record(__file__, argv, peak="here", devices=True)
  model = fl.models.logistic_regression(60, 10)
  d = sum(
    int(np.prod(x.shape))
    for x in jax.tree.leaves(model.init(jax.random.PRNGKey(0)))
  )
  sizes = (20, 40) if args.smoke else (100, 1000)
  rows = []
  for n in sizes:
    k_plus, _ = sa.secagg_plus_degree(n, dropout_rate=DROPOUT)
    for protocol, k in (("SecAgg+", k_plus), ("SecAgg", None)):
      t0 = time.perf_counter()
      # Smoke mode also exercises the sampled path (largest size).
      if k is None and (n >= 1000 or (args.smoke and n == sizes[-1])):
        r = sampled(n, d, samples=3, mask_clients=100)
      else:
        r = simulate(n, k, d, samples=5)
      r.update(clients=n, protocol=protocol, wall_s=time.perf_counter() - t0)
      rows.append(r)
      print(
        f"n={n:5d} {protocol:8s} k={r['degree']:4d} t={r['threshold']:4d}"
        f" client host {r['client_host_s']:.4f}s device "
        f"{r['client_device_s']:.5f}s sent {r['client_bytes_sent']:.0f}B"
        f" recv {r['client_bytes_received']:.0f}B | server host "
        f"{r['server_host_s']:.3f}s device {r['server_device_s']:.3f}s | "
        f"exact={r['exact_sum']} ({r['wall_s']:.0f}s)",
        flush=True,
      )
  record.update(
    d=d,
    bits_per_value=BITS_PER_VALUE,
    dropout_rate=DROPOUT,
    rows=rows,
    engine=engine_rounds(sizes[0]),
  )
  stem = "secure_aggregation" + ("_smoke" if args.smoke else "")
  common.write_record(record, os.path.join(args.out, stem + ".json"), markdown)
  print("wrote", os.path.join(args.out, stem + ".{md,json}"))


if __name__ == "__main__":
  main()
