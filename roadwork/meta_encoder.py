"""Metadata encoder: GPS sinusoidal encoding and category embeddings, each with a learnable NULL entry.

Index 0 of every category is NULL (unknown). During training each field of each sample is replaced by
NULL with probability `dropout`, so the model also works when all metadata is unknown (the benchmark).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn


def gps_features(gps: Tensor, num_frequencies: int) -> Tensor:
    """(B, 2) degrees -> (B, 4 F): sin and cos of 2^f * lat and 2^f * lon in radians, f = 0..F-1."""
    radians = gps.float() * (math.pi / 180.0)
    scales = 2.0 ** torch.arange(num_frequencies, device=gps.device, dtype=torch.float32)
    angles = (radians[:, :, None] * scales).flatten(1)              # (B, 2F)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class MetadataEncoder(nn.Module):
    def __init__(self, vocab_sizes: dict[str, int], text_fields: Sequence[str], use_gps: bool, dim: int,
                 out_dim: int, gps_frequencies: int, dropout: float):
        super().__init__()
        self.categories = nn.ModuleDict({f: nn.Embedding(n + 1, dim) for f, n in vocab_sizes.items()})
        self.texts = nn.ModuleDict({f: nn.Embedding(2, dim) for f in text_fields})  # 0 absent, 1 present
        self.gps = nn.Linear(4 * gps_frequencies, dim) if use_gps else None
        self.gps_null = nn.Parameter(torch.zeros(dim)) if use_gps else None
        self.gps_frequencies = gps_frequencies
        fields = len(self.categories) + len(self.texts) + int(use_gps)
        self.out = nn.Sequential(nn.Linear(fields * dim, out_dim), nn.GELU(), nn.LayerNorm(out_dim))
        self.dropout = dropout

    def _drop(self, known: Tensor) -> Tensor:
        if not self.training or self.dropout <= 0:
            return known
        return known & (torch.rand(known.shape, device=known.device) >= self.dropout)

    def forward(self, batch: dict) -> Tensor:
        parts = []
        for name, table in {**self.categories, **self.texts}.items():
            index = batch[name].long()
            parts.append(table(torch.where(self._drop(index > 0), index, torch.zeros_like(index))))
        if self.gps is not None:
            known = self._drop(batch["gps_known"] > 0.5)
            encoded = self.gps(gps_features(batch["gps"], self.gps_frequencies))
            parts.append(torch.where(known[:, None], encoded, self.gps_null.expand_as(encoded)))
        return self.out(torch.cat(parts, dim=1))
