"""What a run reports: the Tracker interface and its wandb implementation, run names and tags, console lines,
metrics.json and curves.

May import common.utils.
"""
