"""Process context: single process, or DDP when started by torchrun (RANK / WORLD_SIZE in the environment) or by
`srun -n N` (the same values derived from SLURM_* when torchrun's are absent)."""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from common.cluster import slurm

log = logging.getLogger(__name__)

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
    log.info(f"[ddp] rank {rank} of {world} (local rank {local_rank}) on {socket.gethostname()}, {device}")
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


def summing_across_ranks() -> bool:
    """True in a training forward of several processes: autograd is on (evaluation runs under no_grad, on shards of
    unequal length), so every rank reaches each global reduction of its step together."""
    return torch.is_grad_enabled() and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_sum(values: torch.Tensor) -> torch.Tensor:
    """`values` summed over the ranks in a training forward (summing_across_ranks), with autograd: a batch-level
    statistic (a masked mean's count, a soft Dice's sums) is then the global batch's, and DDP's gradient average
    of the per-rank losses is the gradient one process computes on the global batch; unchanged otherwise."""
    if not summing_across_ranks():
        return values
    from torch.distributed.nn.functional import all_reduce
    return all_reduce(values)


def mean_over_ranks(ctx: DistContext, values: dict[str, float]) -> dict[str, float]:
    """The mean of each value over the ranks (per-rank means of equal batches -> the global batch's mean)."""
    if not ctx.enabled or not values:
        return dict(values)
    totals = torch.tensor(list(values.values()), dtype=torch.float64, device=ctx.device)
    dist.all_reduce(totals)
    return {key: float(total) / ctx.world_size for key, total in zip(values, totals)}


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
