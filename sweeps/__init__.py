"""Optuna search spaces (the `sweeps` config group: conf/sweeps links here) and the shared-study sweeper."""
