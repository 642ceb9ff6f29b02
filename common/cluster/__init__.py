"""Where a run executes: the distributed context (DDP from torchrun or SLURM_*), preemption signals and requeue, Slurm
submission.

May import common.utils.
"""
