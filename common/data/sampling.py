"""Weighted training sampling: each epoch draws items with replacement in proportion to their weights."""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DistributedSampler, Sampler

from common.utils.seed import item_seed


def check_weights(weights: Sequence[float], what: str) -> np.ndarray:
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 1 or not np.isfinite(weights).all() or (weights < 0).any():
        raise ValueError(f"{what}: sampling weights must be finite and >= 0, one per training item")
    if weights.sum() <= 0:
        raise ValueError(f"{what}: every sampling weight is 0, nothing can be drawn")
    return weights


class WeightedEpochSampler(Sampler[int]):
    """One seeded draw of len(weights) indices per epoch (with replacement), split across ranks.

    Rank r takes every world_size-th index of the same global draw, as DistributedSampler does with a
    permutation, so N processes see together the batches of one process with N times the batch size.
    `skip` drops this rank's first indices (resume in the middle of an epoch).
    """

    def __init__(self, weights: np.ndarray, rank: int, world_size: int, seed: int, epoch: int, skip: int = 0):
        self.weights = torch.as_tensor(check_weights(weights, "WeightedEpochSampler"))
        self.rank, self.world_size, self.seed, self.epoch, self.skip = rank, world_size, seed, epoch, skip
        self.per_rank = len(self.weights) // world_size

    def global_draw(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.multinomial(self.weights, self.per_rank * self.world_size, replacement=True,
                                 generator=generator)

    def __iter__(self) -> Iterator[int]:
        mine = self.global_draw()[self.rank::self.world_size][self.skip:]
        return iter(mine.tolist())

    def __len__(self) -> int:
        return max(self.per_rank - self.skip, 0)


class SeededOrder(Sampler[tuple[int, int]]):
    """(index, item seed) pairs of one rank's share of an epoch's seeded global order, from position `start` on (a
    resumed epoch). `set_epoch(epoch, start)` before each epoch's iteration picks its order, so one DataLoader (and
    its persistent workers) serves every epoch of a run.

    The global order is a seeded permutation (DistributedSampler's, drop_last) or, with `weights`, a seeded weighted
    draw (WeightedEpochSampler); rank r holds global positions r, r + world, ... The item seed depends on the global
    position only, so an item draws the same augmentations whichever worker loads it, after a resume and under DDP.
    """

    def __init__(self, size: int, seed: int, rank: int, world_size: int, weights: np.ndarray | None = None):
        self.size, self.seed, self.rank, self.world_size, self.weights = size, int(seed), rank, world_size, weights
        self.set_epoch(0)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start, self.indices = int(epoch), int(start), self.epoch_order(int(epoch))

    def epoch_order(self, epoch: int) -> list[int]:
        """This rank's share of the epoch's global order: the global batches of N processes are the batches of one
        process with N times the batch size."""
        if self.weights is not None:
            return list(WeightedEpochSampler(self.weights, self.rank, self.world_size, self.seed, epoch))
        sampler = DistributedSampler(range(self.size), self.world_size, self.rank, shuffle=True, seed=self.seed,
                                     drop_last=True)
        sampler.set_epoch(epoch)
        return list(sampler)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for local in range(self.start, len(self.indices)):
            position = local * self.world_size + self.rank
            yield self.indices[local], item_seed(self.seed, self.epoch, position)

    def __len__(self) -> int:
        return max(len(self.indices) - self.start, 0)
