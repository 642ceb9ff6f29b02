"""Turning a task into trained weights: the trainer, checkpoints, optimiser and schedules, EMA, losses, multi-task
balancing, mixup, device placement, adaptation, the parts of a run, the dataset root, cross-validation.

May import common.utils, common.cluster, common.tracking, common.models, common.data, common.task and common.metric.
"""
