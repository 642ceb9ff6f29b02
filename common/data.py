"""Small data helpers shared by every task."""
from __future__ import annotations

from typing import Any

import torch


def default_collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors (and numbers) key by key; keep everything else (ids, paths, names) as lists."""
    batch: dict[str, Any] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        first = values[0]
        if isinstance(first, torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(first, (bool, int, float)) and not isinstance(first, str):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch
