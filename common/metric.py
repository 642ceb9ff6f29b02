"""Base class for metrics that accumulate per-batch arrays and compute on all of them at once.

Accumulating raw arrays (not running sums) keeps every metric exact, lets global metrics such as
R2, MCC or ROC AUC be computed over the whole split, and makes the DDP reduction generic: each rank
gathers every other rank's arrays before `compute`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections import defaultdict

import numpy as np
import torch
import torch.distributed as dist


class Metric(ABC):
    def __init__(self):
        self._store: dict[str, list] = defaultdict(list)

    def reset(self) -> None:
        self._store = defaultdict(list)

    def add(self, **arrays) -> None:
        """Append per-batch values (tensors are detached and moved to numpy; lists are extended)."""
        for key, value in arrays.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().float().cpu().numpy() if value.is_floating_point() \
                    else value.detach().cpu().numpy()
            if isinstance(value, np.ndarray):
                self._store[key].append(value)
            else:
                self._store[key].append(np.asarray(list(value), dtype=object))

    def gathered(self) -> dict[str, np.ndarray]:
        """All accumulated values concatenated along the first axis, over all DDP ranks."""
        local = {k: np.concatenate(v, axis=0) for k, v in self._store.items() if v}
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return local
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, local)
        keys = parts[0].keys()
        return {k: np.concatenate([p[k] for p in parts if k in p], axis=0) for k in keys}

    @abstractmethod
    def update(self, outputs: dict, batch: dict) -> None:
        """Record one batch (call `self.add(...)`)."""

    @abstractmethod
    def compute(self) -> dict[str, float]:
        """Metrics over everything recorded (use `self.gathered()`)."""

    def tables(self, values: dict[str, float]) -> dict[str, tuple[list[str], list[list]]]:
        """Optional: tables of computed values ({name: (columns, rows)}), logged once per run for the best epoch's
        values (e.g. a breakdown by subgroup); default none."""
        return {}
