"""MIL over crops through the backbone (the failure diagnosis, 6.1 and 2.3.2): the image is cut into a
rows x cols grid of crops (instances), each crop passes through the backbone and the head as an image of its own,
and the bag (the image) is their weighted average in component space: Y = sum_i a_i y_i with a_i = 1/K ("mean") or
the gated attention of Ilse et al. 2018 over the crops' mean tokens ("attention"). Beside the head option
model/biomass=mil, which attends over the tokens of one pass.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

POOLINGS = ("mean", "attention")


def split_crops(images: Tensor, grid: Sequence[int]) -> Tensor:
    """(B, C, H, W) -> (B * rows * cols, C, H / rows, W / cols), each image's crops together, row by row."""
    rows, cols = int(grid[0]), int(grid[1])
    b, c, h, w = images.shape
    if h % rows or w % cols:
        raise ValueError(f"model.crops.grid={list(grid)}: the {h}x{w} image does not split into equal crops")
    crops = images.view(b, c, rows, h // rows, cols, w // cols).permute(0, 2, 4, 1, 3, 5)
    return crops.reshape(b * rows * cols, c, h // rows, w // cols)


class CropBag(nn.Module):
    def __init__(self, grid: Sequence[int], pooling: str, attn_dim: int, embed_dim: int):
        super().__init__()
        if len(grid) != 2 or min(int(g) for g in grid) < 1:
            raise ValueError(f"model.crops.grid={list(grid)}: expected [rows, cols] of positive integers")
        if pooling not in POOLINGS:
            raise ValueError(f"model.crops.pooling={pooling!r}: expected one of {POOLINGS}")
        self.grid, self.count, self.pooling = [int(g) for g in grid], int(grid[0]) * int(grid[1]), pooling
        if pooling == "attention":
            self.attn_v, self.attn_u = nn.Linear(embed_dim, attn_dim), nn.Linear(embed_dim, attn_dim)
            self.attn_w = nn.Linear(attn_dim, 1)
        self.last_attention: Tensor | None = None

    def crop_weights(self, last_tokens: Tensor) -> Tensor:
        """(B, K) weights of the crops from their last-layer tokens (B * K, N, C); sum 1 per image."""
        embedding = last_tokens.mean(dim=1).view(-1, self.count, last_tokens.shape[-1])
        if self.pooling == "mean":
            return embedding.new_full(embedding.shape[:2], 1.0 / self.count)
        scores = self.attn_w(torch.tanh(self.attn_v(embedding)) * torch.sigmoid(self.attn_u(embedding))).squeeze(-1)
        weights = torch.softmax(scores.float(), dim=1).to(embedding.dtype)
        self.last_attention = weights.detach()
        return weights

    def bag(self, raw: Tensor, weights: Tensor, last_tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Per-crop head outputs (B * K, M, D), (B * K, M) -> the image's instances (B, K * M, D), (B, K * M)."""
        k, (_, m, d) = self.count, raw.shape
        crop = self.crop_weights(last_tokens)
        return raw.reshape(-1, k * m, d), (weights.view(-1, k, m) * crop.unsqueeze(-1)).reshape(-1, k * m)
