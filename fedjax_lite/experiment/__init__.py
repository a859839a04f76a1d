"""Research workflow around the engine: experiment files, runs, sweeps, plots.

* :class:`Experiment`: what an experiment file's ``build(config)`` returns
  (see :mod:`.core` for the file contract and sweepable hyperparameters).
* :func:`train` / :func:`run_file`: run into a run folder (metrics JSONL/CSV,
  ``curves.png``, crash-safe checkpoints at most every 60 s, exact resume
  after a kill of any kind; :mod:`.loop` is the round loop they share).
* :func:`sweep` / :func:`sweep_file`: seeds x hyperparameter grid as ONE
  vmapped computation (:class:`VmappedRounds`), checkpointed the same way.
* :func:`compare`, :func:`plot_curves`, :func:`plot_runs`,
  :func:`final_table`: overlaid convergence curves and final-metric tables.
* :func:`save_checkpoint` / :func:`load_checkpoint`: atomic msgpack files.

Command line: ``python -m fedjax_lite {run,sweep,compare} --help``.
"""

from fedjax_lite import _lazy

# Imported at first use (PEP 562): see fedjax_lite/_lazy.py. matplotlib is
# imported when a plot is drawn, not before.
__getattr__, __dir__, __all__ = _lazy.attach(
  __name__,
  {
    "checkpoint": ("atomic_write_bytes", "load_checkpoint", "save_checkpoint"),
    "cli": (),
    "comparison": ("compare",),
    "config": (
      "ConfigError",
      "ExperimentFile",
      "apply_overrides",
      "check_config",
      "config_to_dict",
      "load_experiment_file",
      "preset",
    ),
    "core": ("Experiment",),
    "launch": (),
    "loop": ("Checkpointing",),
    "plots": ("plot_curves", "plot_runs"),
    "records": ("final_table", "final_values", "read_jsonl"),
    "runner": (
      "RunOptions",
      "RunResult",
      "engine_for",
      "init_state",
      "run_file",
      "train",
    ),
    "sweeps": ("SweepResult", "sweep", "sweep_file"),
    "vmapped": ("VmappedRounds",),
  },
)
