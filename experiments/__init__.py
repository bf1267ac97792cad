"""Experiments that choose a configuration (cross-validation); results and logs in ``experiments/results/``."""
