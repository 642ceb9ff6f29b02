"""Small data helpers shared by every task."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from common.cluster.preemption import ignore_in_worker
from common.data.feature_cache import CachedItem, collate_pixels
from common.utils.seed import isolated_rng, seed_cpu


def default_collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors (and numbers) key by key; keep everything else (ids, paths, names) as lists. Pixels that
    may be cached features (common.data.feature_cache.pixels_or_features) collate by `collate_pixels`."""
    batch: dict[str, Any] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        first = values[0]
        if any(isinstance(v, CachedItem) for v in values):
            batch[key] = collate_pixels(values)
        elif isinstance(first, torch.Tensor):
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


def sample_weights_of(dataset) -> np.ndarray | None:
    """The sampling weight of each item of a training dataset (or Subset of one): its `sample_weights` (one per item
    of the dataset behind the subsets), in the subset's order; None when it has none (every item once per epoch)."""
    base, indices = unwrap_subset(dataset)
    weights = getattr(base, "sample_weights", None)
    return None if weights is None else np.asarray(weights, dtype=np.float64)[indices]


def reseed_augmentations(dataset, seed: int) -> None:
    """Seed the random pipelines a dataset holds (attributes with `set_random_seed`, e.g. albumentations).

    albumentations pipelines keep their own generators, seeded from OS entropy when built: every forked
    DataLoader worker would copy the same state and replay the same draws in every epoch.
    """
    base, _ = unwrap_subset(dataset.dataset if isinstance(dataset, SeededItems) else dataset)
    for value in vars(base).values():
        if hasattr(value, "set_random_seed"):
            value.set_random_seed(seed)


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: preemption signals ignored (the main process acts on them); numpy and the
    dataset's pipelines from torch's per-worker, per-epoch seed (training items reseed per item: SeededItems)."""
    ignore_in_worker()
    seed = torch.initial_seed() % 2**32            # the loader's base seed (drawn per epoch) + worker id
    np.random.seed(seed)
    reseed_augmentations(torch.utils.data.get_worker_info().dataset, seed)


class SeededItems(Dataset):
    """A training dataset read with (index, item seed) keys (common.data.sampling.SeededOrder).

    Before each item, python, numpy, torch and the dataset's augmentation pipelines are seeded with the item's
    seed; in the main process (num_workers=0) inside `isolated_rng`, so that the training draws (dropout, mixup)
    stay as they were: an epoch's items are the same with any num_workers and after a resume.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        # a worker's generators serve only its items; the main process's also serve training (about 1 ms to keep)
        with isolated_rng() if torch.utils.data.get_worker_info() is None else nullcontext():
            seed_cpu(seed)
            reseed_augmentations(self.dataset, seed)
            return self.dataset[index]
