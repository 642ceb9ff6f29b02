"""Weighted training sampling: each epoch draws items with replacement in proportion to their weights."""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

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
    """(index, item seed) pairs of one rank's share of an epoch, from position `start` on (a resumed epoch).

    `indices` is this rank's share of the epoch's global order, rank r holding global positions r, r + world, ...
    (DistributedSampler and WeightedEpochSampler both split so). The item seed depends on the global position
    only, so an item draws the same augmentations whichever worker loads it, after a resume and under DDP.
    """

    def __init__(self, indices: Sequence[int], seed: int, epoch: int, rank: int, world_size: int, start: int = 0):
        self.indices, self.seed, self.epoch = list(indices), int(seed), int(epoch)
        self.rank, self.world_size, self.start = rank, world_size, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for local in range(self.start, len(self.indices)):
            position = local * self.world_size + self.rank
            yield self.indices[local], item_seed(self.seed, self.epoch, position)

    def __len__(self) -> int:
        return max(len(self.indices) - self.start, 0)
