"""The DataLoaders of a run: one per dataset and fit, its order set through its sampler.

Trainer.fit builds its training and validation loaders once (persistent workers with data.num_workers > 0) and
moves the training one to each epoch through its sampler (SeededOrder.set_epoch); its workers end with fit. A
validation item draws nothing at random (the tasks' validation sets do not augment), so workers that live across
epochs score the same items as fresh ones would.
"""
from __future__ import annotations

from typing import Callable

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, SequentialSampler

from common.cluster.distributed import DistContext, ShardSampler
from common.data.datasets import SeededItems, reseed_augmentations, seed_worker
from common.data.sampling import SeededOrder


def build_loader(cfg: DictConfig, ctx: DistContext, dataset: Dataset, collate: Callable, train: bool,
                 epoch: int = 0, skip_batches: int = 0, weights=None, persistent: bool = False) -> DataLoader:
    """weights (train only): one sampling weight per item (common.data.datasets.sample_weights_of); None shuffles.
    A training loader's order is its sampler's (SeededOrder): `set_epoch(epoch, start)` moves one loader to
    another epoch. persistent: workers kept between epochs (fit builds its loaders once)."""
    data, seed = cfg.data, int(cfg.seed)
    drop_last = train and len(dataset) > int(data.batch_size)
    if train:
        sampler = SeededOrder(len(dataset), seed, ctx.rank, ctx.world_size, weights)
        sampler.set_epoch(epoch, start=skip_batches * int(data.batch_size))
        dataset = SeededItems(dataset)
    elif ctx.enabled:
        sampler = ShardSampler(len(dataset), ctx.rank, ctx.world_size)
    else:
        sampler = SequentialSampler(dataset)
    workers = int(data.num_workers)
    if workers == 0 and not train:
        reseed_augmentations(dataset, torch.initial_seed() % 2**32)   # workers do it in seed_worker
    pin = ctx.device.type == "cuda" if cfg.trainer.pin_memory == "auto" else bool(cfg.trainer.pin_memory)
    # the loader's own generator draws the workers' base seed: the global generators stay as they were
    return DataLoader(dataset, batch_size=int(data.batch_size), sampler=sampler, collate_fn=collate,
                      num_workers=workers, pin_memory=pin, drop_last=drop_last,
                      worker_init_fn=seed_worker if workers else None,
                      generator=torch.Generator().manual_seed(seed + epoch),
                      persistent_workers=persistent and workers > 0)


def end_workers(loader: DataLoader) -> None:
    """Stop a persistent loader's workers now, not when the loader is collected (an exception's traceback, e.g. a
    preempted fit's, would keep them running). torch has no public call for it: its iterator's own shutdown."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    loader._iterator = None
