"""Config resolvers that tell sweep workers apart (registered by run.py before Hydra composes)."""
from __future__ import annotations

import os
import socket

from common.utils.hydra_lines import register_resolver


def worker_id() -> str:
    """Slurm array task or job id when under Slurm, else SWEEP_WORKER_ID, else host-pid.

    A requeued Slurm job keeps its id: that is how a restarted worker finds the trial it was running."""
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"slurm-{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm-{os.environ['SLURM_JOB_ID']}"
    return os.environ.get("SWEEP_WORKER_ID") or f"{socket.gethostname()}-{os.getpid()}"


def register_resolvers() -> None:
    register_resolver("worker_id", worker_id)
