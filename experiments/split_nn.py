"""SplitNN on 8x8 digits split between two parties, against centralized.

The guest holds the left image half (32 pixels) and the labels, the host the
right half; each holds an independent 90% of the images in its own order
(ECDH PSI aligns the ~81% common rows; the guest splits them 80/20 into
train/test). Bottom models ``mlp(32 -> 64 -> 16)`` per party, top model
``mlp(32 -> 32 -> 10)`` at the guest, Adam, batch 32. Compared, over
``num_seeds`` seeds with the same data and batches:

* ``split``: the SplitNN protocol (exact cut gradients);
* ``central``: an ordinary dense ``mlp(64 -> 128 -> 32 -> 10)`` on the
  joined features (what one owner of all columns would train; the same
  network as ``split`` trained centrally has identical gradients, which
  ``tests/test_vertical_split_nn.py`` checks, so it is not rerun here);
* ``split_noise=<s>``: SplitNN with N(0, s^2) noise on the cut gradients
  sent to the host (label protection).

The runner's ``Experiment`` (engine rounds over client blocks) does not fit
vertical training, so this file defines ``run(config, run_dir)``, which
``python -m fedjax_lite run`` calls with a fresh run folder; it writes
``metrics.jsonl`` (one row per epoch and variant), ``curves.png`` (mean and
std over seeds) and ``summary.json`` into ``runs/split_nn-<timestamp>/``::

  python -m fedjax_lite run experiments/split_nn.py          # 40 epochs x 3 seeds
  python -m fedjax_lite run experiments/split_nn.py:smoke    # seconds
"""

import dataclasses
import json
from pathlib import Path

import fedjax_lite as fl  # first: applies the fast CPU settings
import fedjax_lite.experiment  # noqa: F401  (fl.experiment)
import fedjax_lite.vertical as fv
import numpy as np
import optax


@dataclasses.dataclass(frozen=True)
class Config:
  num_epochs: int = 40
  num_seeds: int = 3
  learning_rate: float = 1e-3
  batch_size: int = 32
  cut_dim: int = 16
  noise_stds: tuple[float, ...] = (0.01, 0.1)
  keep: float = 0.9
  test_fraction: float = 0.2
  seed: int = 0


def get_config(arg: str = "") -> Config:
  """``arg``: "" (the full run) or "smoke" (seconds)."""
  return fl.experiment.preset(
    Config(), arg, smoke=dict(num_epochs=2, num_seeds=1, noise_stds=(0.1,))
  )


def variants(cfg: Config, train: fv.AlignedData):
  """name -> (train data, bottoms, top, grad_noise_std)."""
  d = train.feature_dims
  c = cfg.cut_dim
  split_bottoms = [fl.models.mlp(k, c, hidden=(64,)) for k in d]
  top = fl.models.mlp(c * len(d), 10, hidden=(32,))
  joined = fv.AlignedData(
    xs=(train.joined(),), y=train.y, ids=train.ids, names=("central",)
  )
  out = {
    "split": (train, split_bottoms, top, 0.0),
    "central": (
      joined,
      [fl.models.mlp(sum(d), 32, hidden=(128,))],
      fl.models.mlp(32, 10, hidden=()),
      0.0,
    ),
  }
  for s in cfg.noise_stds:
    out[f"split_noise={s:g}"] = (train, split_bottoms, top, s)
  return out


def run(cfg: Config, run_dir: Path | None = None) -> dict:
  ds = fv.digits_vertical(
    2, keep=cfg.keep, seed=cfg.seed, names=("guest", "host")
  )
  aligned, psi = ds.align(seed=cfg.seed)
  train, test = aligned.split(cfg.test_fraction, seed=cfg.seed)
  log = fl.experiment.records.MetricsLog(run_dir) if run_dir else None
  groups, finals, rms, bytes_per_step = {}, {}, {}, None
  for name, (data, bottoms, top, noise) in variants(cfg, train).items():
    test_v = test
    if len(data.xs) == 1:  # the centralized model sees joined columns
      test_v = fv.AlignedData(
        xs=(test.joined(),), y=test.y, ids=test.ids, names=("central",)
      )
    proc = fv.build_split_nn_process(
      data,
      bottoms,
      top,
      optax.adam(cfg.learning_rate),
      batch_size=cfg.batch_size,
      grad_noise_std=noise,
    )
    groups[name], finals[name], rms[name] = [], [], []
    for seed in range(cfg.seed, cfg.seed + cfg.num_seeds):
      state, rows = proc.initialize(seed), []
      for epoch in range(1, cfg.num_epochs + 1):
        state, m = proc.next(state)
        ev = proc.evaluate(state, test_v)
        row = {
          "round": epoch,
          "variant": name,
          "seed": seed,
          "train_loss": m["loss"],
          "train_accuracy": m["accuracy"],
          "test_loss": ev["loss"],
          "test_accuracy": ev["accuracy"],
          "bytes_per_step": m["bytes_per_step"],
          "cut_grad_rms": m["cut_grad_rms"],
        }
        rows.append(row)
        if log:
          log.append(row)
      if name == "split":
        bytes_per_step = m["bytes_per_step"]
      groups[name].append(rows)
      finals[name].append(rows[-1]["test_accuracy"])
      rms[name].append(float(np.mean([r["cut_grad_rms"] for r in rows])))
  if log:
    log.close()
  summary = {
    "psi_intersection": psi.size,
    "train_rows": train.num_examples,
    "test_rows": test.num_examples,
    "test_accuracy": {
      k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "per_seed": v}
      for k, v in finals.items()
    },
    "split_bytes_per_step": bytes_per_step,
    "mean_cut_grad_rms": {k: float(np.mean(v)) for k, v in rms.items()},
    "config": dataclasses.asdict(cfg),
  }
  if run_dir:
    fl.experiment.plot_runs(
      groups,
      run_dir / "curves.png",
      title="SplitNN vs centralized (digits, 2 parties)",
    )
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
  return summary


def main(argv=None) -> dict:
  return fl.experiment.script_main(__file__, get_config, run, argv)


if __name__ == "__main__":
  main()
