"""Multi-stage (ConvNeXt) features -> one width and one grid, so that every multi-layer biomass head reads the stages
as it reads a ViT's layers (same channel count, same (h, w) token grid).

Each stage i: a 1x1 convolution from its width to `width` (identity when equal), then a resampling of its map to
the grid of stride `stride` (bilinear up for the coarser stages, area average down for the finer ones).
A backbone whose configured layers already share one width and one grid (a ViT) needs no projection.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from common.models.backbone import BackboneOutput, tokens_to_map


def is_pyramid(dims: Sequence[int], strides: Sequence[int]) -> bool:
    return len(set(dims)) > 1 or len(set(strides)) > 1


def resample(fmap: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(fmap.shape[-2:]) == tuple(size):
        return fmap
    if fmap.shape[-2] < size[0]:
        return F.interpolate(fmap, size=size, mode="bilinear", align_corners=False)
    return F.adaptive_avg_pool2d(fmap, size)


class StageProjector(nn.Module):
    def __init__(self, dims: Sequence[int], strides: Sequence[int], width: Optional[int], stride: int):
        super().__init__()
        self.width = int(width) if width is not None else int(dims[-1])
        self.stride, self.strides = int(stride), [int(s) for s in strides]
        if self.stride <= 0:
            raise ValueError(f"model.stages.stride={stride}: expected a positive pixel stride")
        self.project = nn.ModuleList(nn.Identity() if d == self.width else nn.Conv2d(d, self.width, 1) for d in dims)

    def forward(self, feats: BackboneOutput) -> BackboneOutput:
        grids = feats.grids or [feats.grid] * len(feats.tokens)
        height, width = grids[-1][0] * self.strides[-1], grids[-1][1] * self.strides[-1]
        grid = (max(1, height // self.stride), max(1, width // self.stride))
        tokens = [resample(proj(tokens_to_map(t, g)), grid).flatten(2).transpose(1, 2)
                  for proj, t, g in zip(self.project, feats.tokens, grids)]
        return BackboneOutput(tokens=tokens, grid=grid, cls=feats.cls, registers=feats.registers,
                              grids=[grid] * len(tokens))
