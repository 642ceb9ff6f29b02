"""Small data helpers shared by every task."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch


def default_collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors (and numbers) key by key; keep everything else (ids, paths, names) as lists."""
    batch: dict[str, Any] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        first = values[0]
        if isinstance(first, torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(first, (bool, int, float)):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch


def unwrap_subset(dataset) -> tuple[object, list[int]]:
    """The dataset behind (nested) torch Subsets and the indices into it, in the subset's order.

    mode=cv hands tasks Subsets of their datasets; tasks read per-item records (tables, sample lists) this way.
    """
    from torch.utils.data import Subset
    if isinstance(dataset, Subset):
        base, indices = unwrap_subset(dataset.dataset)
        return base, [indices[i] for i in dataset.indices]
    return dataset, list(range(len(dataset)))


def reseed_augmentations(dataset, seed: int) -> None:
    """Seed the random pipelines a dataset holds (attributes with `set_random_seed`, e.g. albumentations).

    albumentations pipelines keep their own generators, seeded from OS entropy when built: every forked
    DataLoader worker would copy the same state and replay the same draws in every epoch.
    """
    base, _ = unwrap_subset(dataset)
    for value in vars(base).values():
        if hasattr(value, "set_random_seed"):
            value.set_random_seed(seed)


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: numpy and the dataset's pipelines from torch's per-worker, per-epoch seed."""
    seed = torch.initial_seed() % 2**32            # the loader's base seed (drawn per epoch) + worker id
    np.random.seed(seed)
    reseed_augmentations(torch.utils.data.get_worker_info().dataset, seed)
