"""Config resolvers that tell sweep workers apart (registered by run.py before Hydra composes)."""
from __future__ import annotations

import os
import socket
import zlib

from omegaconf import OmegaConf


def worker_id() -> str:
    """Slurm array task or job id when under Slurm, else SWEEP_WORKER_ID, else host-pid."""
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"slurm-{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm-{os.environ['SLURM_JOB_ID']}"
    return os.environ.get("SWEEP_WORKER_ID") or f"{socket.gethostname()}-{os.getpid()}"


def worker_seed(seed: int) -> int:
    """The sampler seed offset per worker, so that workers of one study do not propose the same trials."""
    return int(seed) + zlib.crc32(worker_id().encode()) % 100_000


def register_resolvers() -> None:
    for name, fn in (("worker_id", worker_id), ("worker_seed", worker_seed)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn, use_cache=True)
