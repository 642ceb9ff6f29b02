"""Averaging several trained models' outputs (fold ensembles at predict time)."""
from __future__ import annotations

import torch
from torch import nn


class MeanEnsemble(nn.Module):
    """forward(batch) -> the mean of every floating-point output over the members (others from the first)."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one model")
        self.members = nn.ModuleList(members)

    def forward(self, batch: dict) -> dict:
        outputs = [member(batch) for member in self.members]
        merged = dict(outputs[0])
        for key, value in merged.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                merged[key] = torch.stack([out[key] for out in outputs]).mean(0)
        return merged
