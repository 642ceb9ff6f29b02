"""Checkpoints -> a predictor: the checks on a checkpoint's config, ensembles and their weights.

May import everything above except common.runs.
"""
