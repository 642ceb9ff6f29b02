"""Auxiliary roadwork-object segmentation on the patch grid (trained when the data has object masks)."""
from __future__ import annotations

from torch import Tensor, nn


class SegHead(nn.Module):
    """One logit per patch token (LayerNorm + Linear(embed_dim -> 1)) of the last configured backbone layer."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim)
        self.linear = nn.Linear(embed_dim, 1)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens (B, V, h, w, C) on the patch grid -> logits (B, V, 1, h, w)."""
        return self.linear(self.norm(tokens)).squeeze(-1).unsqueeze(2)
