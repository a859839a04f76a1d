"""Research workflow around the engine: experiment files, runs, sweeps, plots.

* :class:`Experiment`: what an experiment file's ``build(config)`` returns
  (see :mod:`.core` for the file contract and sweepable hyperparameters).
* :func:`train` / :func:`run_file`: run into a run folder (metrics JSONL/CSV,
  ``curves.png``, crash-safe checkpoints at most every 60 s, exact resume
  after a kill of any kind). :mod:`.session` sets a run up and moves it
  forward (``advance``), :mod:`.loop` is the round loop, :mod:`.run_folder`
  the folder and its records, :mod:`.files` the launching of experiment
  files.
* :func:`sweep` / :func:`sweep_file`: seeds x hyperparameter grid as the runs
  of ONE engine round (:class:`VmappedRounds`, :mod:`.runs`), with the same
  ``advance`` and checkpoints: a run is the sweep of one setting.
* :func:`compare`, :func:`plot_curves`, :func:`plot_runs`,
  :func:`final_table`: overlaid convergence curves and final-metric tables.
* :func:`save_checkpoint` / :func:`load_checkpoint`: atomic msgpack files.
* :func:`export_params` / :func:`load_params`: a run's global model as a
  params file (flax msgpack or orbax) of its own, for any round (see
  :mod:`.export`); ``Model.load_params`` checks it against a model.
* :func:`provenance`: package versions, devices, CPU settings and the
  experiment file's git commit (``config.json``, ``summary.json``).

* :class:`MetricWriter`, :func:`make_writers`: metrics also to TensorBoard,
  W&B and MLflow (``writers=`` / ``--log``; :mod:`.writers`), and
  :class:`Callback` (``callbacks=``): a user's own per-round hook.

Command line: ``python -m fedjax_lite {run,sweep,compare,launch,export} --help``.
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
    "export": ("Exported", "export_params", "load_params"),
    "launch": (),
    "loop": ("Callback", "CallbackError", "Checkpointing"),
    "plots": ("plot_curves", "plot_runs"),
    "records": ("final_table", "final_values", "read_jsonl"),
    "files": ("run_file", "script_main"),
    "run_folder": ("provenance",),
    "runs": ("VmappedRounds", "engine_for", "init_state"),
    "session": ("RunOptions", "RunResult", "train"),
    "sweeps": ("SweepResult", "sweep", "sweep_file"),
    "writers": ("MetricWriter", "make_writers"),
  },
)
