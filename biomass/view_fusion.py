"""Views of the 2:1 panorama: the whole image, or its left and right square halves through the shared
backbone with cross-view attention (the leaderboard winner's layout).

The halves' token grids are put back side by side into the whole image's (h, 2h) grid after the
cross-view attention, so every head works unchanged and pools both views in component space.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from common.models.backbone import Backbone, BackboneOutput

LAYOUTS = ("whole", "halves")


class CrossViewAttention(nn.Module):
    """Tokens of one view attend to the other view's tokens; gated residual (gate starts at 0)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.norm_q, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, other: Tensor) -> Tensor:
        kv = self.norm_kv(other)
        return x + self.gate * self.attn(self.norm_q(x), kv, kv, need_weights=False)[0]


def side_by_side(left: Tensor, right: Tensor, side: int) -> Tensor:
    """(B, side*side, C) x 2 -> (B, side*2*side, C) in row-major order of the (side, 2*side) grid."""
    b, _, c = left.shape
    grid = torch.cat([left.reshape(b, side, side, c), right.reshape(b, side, side, c)], dim=2)
    return grid.reshape(b, side * 2 * side, c)


class HalvesEncoder(nn.Module):
    """embed_dim, num_layers: of the features the cross-view attention reads (`project`ed ones when given)."""

    def __init__(self, embed_dim: int, num_layers: int, heads: int, dropout: float):
        super().__init__()
        self.cross = nn.ModuleList(CrossViewAttention(embed_dim, heads, dropout) for _ in range(num_layers))

    def forward(self, backbone: Backbone, images: Tensor,
                project: Callable[[BackboneOutput], BackboneOutput] | None = None) -> BackboneOutput:
        b, _, h, w = images.shape
        if w != 2 * h:
            raise ValueError(f"view layout 'halves' needs images twice as wide as high, got {h}x{w} (HxW); "
                             f"set data.image_size to [H, 2H]")
        halves = torch.cat([images[..., :h], images[..., h:]], dim=0)       # (2B, 3, h, h)
        feats = backbone(halves)
        if project is not None:         # a pyramid backbone's stages to one width and grid (biomass.stages)
            feats = project(feats)
        side = feats.grid[0]
        tokens = []
        for cross, t in zip(self.cross, feats.tokens):
            left, right = t[:b], t[b:]
            tokens.append(side_by_side(cross(left, right), cross(right, left), side))
        cls = None if feats.cls is None else 0.5 * (feats.cls[:b] + feats.cls[b:])
        regs = None if feats.registers is None else torch.cat([feats.registers[:b], feats.registers[b:]], dim=1)
        return BackboneOutput(tokens=tokens, grid=(side, 2 * side), cls=cls, registers=regs)
