"""``python -m fedjax_lite``: the experiment command line (also ``fedjax-lite``).

Importing the package first applies its fast CPU settings before JAX starts.
See ``python -m fedjax_lite --help`` and :mod:`fedjax_lite.experiment.cli`.
"""

import sys

import fedjax_lite  # noqa: F401  (first: CPU settings before jax initialises)
from fedjax_lite.experiment.cli import main

if __name__ == "__main__":
  sys.exit(main())
