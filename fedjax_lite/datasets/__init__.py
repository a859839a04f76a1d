"""Federated datasets: generators, real data and partitioners."""

from fedjax_lite.datasets.synthetic import fedprox_synthetic
