"""Research workflow around the engine: experiment files, runs, sweeps, plots.

* :class:`Experiment`: what an experiment file's ``build(config)`` returns.
* :func:`train` / :func:`run_file`: run into a run folder (metrics JSONL/CSV,
  ``curves.png``, checkpoints, exact resume after SIGINT/SIGTERM).
* :func:`plot_curves`, :func:`plot_runs`: convergence figures.

Command line: ``python -m fedjax_lite {run,sweep,compare} --help``.
"""

from fedjax_lite.experiment.checkpoint import (atomic_write_bytes,
                                               load_checkpoint,
                                               save_checkpoint)
from fedjax_lite.experiment.config import (ConfigError, ExperimentFile,
                                           apply_overrides, check_config,
                                           config_to_dict,
                                           load_experiment_file)
from fedjax_lite.experiment.core import Experiment
from fedjax_lite.experiment.plots import plot_curves, plot_runs
from fedjax_lite.experiment.records import read_jsonl
from fedjax_lite.experiment.runner import (RunResult, init_state, run_file,
                                           train)
