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

from fedjax_lite.experiment import records
from fedjax_lite.experiment import runner
from fedjax_lite.experiment.checkpoint import (
  atomic_write_bytes,
  load_checkpoint,
  save_checkpoint,
)
from fedjax_lite.experiment.comparison import compare
from fedjax_lite.experiment.config import (
  ConfigError,
  ExperimentFile,
  apply_overrides,
  check_config,
  config_to_dict,
  load_experiment_file,
  preset,
)
from fedjax_lite.experiment.core import Experiment
from fedjax_lite.experiment.loop import Checkpointing
from fedjax_lite.experiment.plots import plot_curves, plot_runs
from fedjax_lite.experiment.records import final_table, final_values, read_jsonl
from fedjax_lite.experiment.runner import (
  RunOptions,
  RunResult,
  engine_for,
  init_state,
  run_file,
  train,
)
from fedjax_lite.experiment.sweeps import SweepResult, sweep, sweep_file
from fedjax_lite.experiment.vmapped import VmappedRounds
