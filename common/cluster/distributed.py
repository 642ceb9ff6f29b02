"""Process context: single process, or DDP when started by torchrun (RANK / WORLD_SIZE in the environment) or by
`srun -n N` (the same values derived from SLURM_* when torchrun's are absent)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from common.cluster import slurm


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(setting: str, local_rank: int = 0) -> torch.device:
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu or auto")
        # srun --gpus-per-task / --gpu-bind=single:1 shows each task only its own GPU
        return torch.device("cuda", 0 if torch.cuda.device_count() == 1 else local_rank)
    if setting != "cpu":
        raise ValueError(f"trainer.device={setting!r}: expected auto, cpu or cuda")
    return torch.device("cpu")


def setup(device_setting: str) -> DistContext:
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(slurm.ddp_environment(dict(os.environ)) or {})
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistContext(device=resolve_device(device_setting))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_setting, local_rank)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device)


def teardown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def agree(ctx: DistContext, flag: bool) -> bool:
    """The main process's flag, on every process."""
    if not ctx.enabled:
        return flag
    value = torch.tensor([int(flag)], device=ctx.device)
    dist.broadcast(value, src=0)
    return bool(value.item())


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


class ShardSampler(Sampler[int]):
    """Evaluation sharding without padding: rank r sees items r, r + world, ... (no duplicated items)."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)
