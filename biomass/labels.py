"""Label helpers shared by the criterion and the mixup: state one-hots and mixed-label lookup."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

MIXED_PREFIX = "mixed/"   # model outputs under this prefix replace the batch's labels in the criterion


def state_targets(states: Sequence[str], vocab: Sequence[str], device) -> tuple[Tensor, Tensor]:
    """State strings -> (one-hot (B, K), mask (B,)); unknown or empty states are masked."""
    index = {s: i for i, s in enumerate(vocab)}
    ids = torch.tensor([index.get(s, -1) for s in states], device=device)
    mask = (ids >= 0).float()
    return F.one_hot(ids.clamp_min(0), num_classes=len(vocab)).float() * mask[:, None], mask


def labels_of(outputs: dict, batch: dict) -> dict:
    """The batch with the mixed labels of `outputs` (if any) in place of the originals."""
    mixed = {k[len(MIXED_PREFIX):]: v for k, v in outputs.items() if k.startswith(MIXED_PREFIX)}
    return {**batch, **mixed} if mixed else batch
