"""Hetero logistic regression on breast cancer split between two parties.

The 30 breast-cancer columns are split into a guest (first 15, with the
labels) and a host (last 15); each party holds an independent 90% of the
patients in its own order, so about 81% are common. ECDH PSI aligns them,
the guest splits the common rows 80/20 into train/test, and hetero LR trains
in plaintext mode (jitted epochs) for ``num_epochs``; then the Paillier mode
(arbiter key of ``key_bits`` bits) runs ``paillier_epochs`` epochs from the
same start to measure seconds and bytes per epoch and to compare its loss
with the plaintext run's. For context the centralized logistic regression of
scikit-learn on the joined features is reported too.

The runner's ``Experiment`` (engine rounds over client blocks) does not fit
vertical training, so this file defines ``run(config, run_dir)``, which
``python -m fedjax_lite run`` calls with a fresh run folder; it writes
``metrics.jsonl``, ``metrics.csv``, ``curves.png`` and ``summary.json`` into
``runs/vertical_lr-<timestamp>/`` with fedjax_lite.experiment's record and
plot helpers::

  python -m fedjax_lite run experiments/vertical_lr.py          # 100 epochs + 2 Paillier epochs
  python -m fedjax_lite run experiments/vertical_lr.py:smoke    # seconds
  python -m fedjax_lite run experiments/vertical_lr.py --set key_bits=2048 seed=1
"""

import dataclasses
import json
import platform
from pathlib import Path

import fedjax_lite as fl  # first: applies the fast CPU settings
import fedjax_lite.experiment  # noqa: F401  (fl.experiment)
import fedjax_lite.vertical as fv
import numpy as np


@dataclasses.dataclass(frozen=True)
class Config:
  num_epochs: int = 100
  learning_rate: float = 0.15
  l2: float = 1e-3
  batch_size: int = 64
  keep: float = 0.9
  test_fraction: float = 0.2
  paillier_epochs: int = 2
  key_bits: int = 1024
  # Keys below 2048 bits (the usual minimum) time the protocol only; they are
  # not secure. Set key_bits=2048 insecure_ok=false for a real-size key.
  insecure_ok: bool = True
  seed: int = 0


def get_config(arg: str = "") -> Config:
  """``arg``: "" (the full run) or "smoke" (seconds)."""
  return fl.experiment.preset(
    Config(),
    arg,
    smoke=dict(num_epochs=3, paillier_epochs=1, key_bits=256, batch_size=256),
  )


def run(cfg: Config, run_dir: Path | None = None) -> dict:
  ds = fv.breast_cancer_vertical(
    2, keep=cfg.keep, seed=cfg.seed, names=("guest", "host")
  )
  aligned, psi = ds.align(seed=cfg.seed)
  train, test = aligned.split(cfg.test_fraction, seed=cfg.seed)
  kw = dict(
    learning_rate=cfg.learning_rate, l2=cfg.l2, batch_size=cfg.batch_size
  )
  proc = fv.build_vertical_logistic_regression_process(train, **kw)
  state = proc.initialize(cfg.seed)
  start = state
  rows = []
  log = fl.experiment.records.MetricsLog(run_dir) if run_dir else None
  for epoch in range(1, cfg.num_epochs + 1):
    state, m = proc.next(state)
    ev = proc.evaluate(state, test)
    row = {
      "round": epoch,
      "train_loss": m["loss"],
      "seconds": m["seconds"],
      "test_loss": ev["taylor_loss"],
      "test_accuracy": ev["accuracy"],
      "test_logistic_loss": ev["loss"],
    }
    rows.append(row)
    if log:
      log.append(row)
  if log:
    log.close()
  # Paillier epochs from the same start; the plaintext losses to compare.
  enc = fv.build_vertical_logistic_regression_process(
    train,
    mode="paillier",
    key_bits=cfg.key_bits,
    insecure_ok=cfg.insecure_ok,
    **kw,
  )
  s_enc, s_pl, enc_rows = start, start, []
  for _ in range(cfg.paillier_epochs):
    s_enc, me = enc.next(s_enc)
    s_pl, mp = proc.next(s_pl)
    enc_rows.append(
      {
        **me,
        "plaintext_loss": mp["loss"],
        "abs_loss_diff": abs(me["loss"] - mp["loss"]),
      }
    )
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top

  central = LogisticRegression(max_iter=5000).fit(train.joined(), train.y)
  summary = {
    "psi": {
      "intersection": psi.size,
      "bytes_sent": psi.bytes_sent,
      "party_sizes": [p.num_examples for p in ds.parties],
    },
    "train_rows": train.num_examples,
    "test_rows": test.num_examples,
    "final": rows[-1],
    # The first epoch includes compiling.
    "plaintext_seconds_per_epoch": float(
      np.median([r["seconds"] for r in rows[1:]] or [rows[0]["seconds"]])
    ),
    "plaintext_bytes_per_epoch": {
      k: v for k, v in m.items() if k.startswith("bytes_")
    },
    "sklearn_central_test_accuracy": float(
      central.score(test.joined(), test.y)
    ),
    "paillier": {
      "key_bits": cfg.key_bits,
      "epochs": enc_rows,
      "seconds_per_epoch": float(np.mean([r["seconds"] for r in enc_rows])),
      "cpu_seconds_per_epoch": float(
        np.mean([r["cpu_seconds"] for r in enc_rows])
      ),
      "bytes_per_epoch": {
        k: v for k, v in enc_rows[0].items() if k.startswith("bytes_")
      },
    }
    if enc_rows
    else None,
    "config": dataclasses.asdict(cfg),
    "machine": platform.processor() or platform.machine(),
  }
  if run_dir:
    fl.experiment.plot_curves(
      rows, run_dir / "curves.png", title="Hetero LR (breast cancer, 2 parties)"
    )
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
  return summary


def main(argv=None) -> dict:
  return fl.experiment.script_main(__file__, get_config, run, argv)


if __name__ == "__main__":
  main()
