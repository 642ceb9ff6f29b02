"""The CSIRO write-up's ViTDet scalar readout (same interface as biomass.heads).

One backbone layer's patch tokens -> 2D map -> simple feature pyramid (scales 2, 1, 0.5, 0.25; each level
1x1 conv -> LN -> 3x3 conv -> LN to `width` channels) -> global average pool per level -> concatenation
(len(scales) * width) -> MLP ([Dropout(input_dropout)], Linear, SiLU, Dropout) -> the shared bottleneck z -> one
linear map from z to every raw output (total + ratio logits, NDVI, height, state logits: separate linear heads on z are
the rows of this one linear map). One instance per image (weight 1); several layers are fused by
biomass.heads_pool.LayerFusion in component space (its fused_z: outputs read from the fused z instead).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from biomass.heads import check_grid, vitdet_pyramid
from common.models.backbone import BackboneOutput, tokens_to_map


class ViTDetScalarHead(nn.Module):
    def __init__(self, embed_dim: int, num_layers: int, out_dim: int, width: int, bottleneck: int,
                 dropout: float, scales: Sequence[float] = (2.0, 1.0, 0.5, 0.25), norm: str = "ln",
                 layer: int = -1, downsample: str = "ceil", input_dropout: float = 0.0):
        super().__init__()
        self.layer, self.scales, self.downsample = layer, list(scales), downsample
        self.levels = vitdet_pyramid(embed_dim, width, scales, norm, downsample)
        self.bottleneck = nn.Sequential(nn.Dropout(input_dropout), nn.Linear(width * len(self.levels), bottleneck),
                                        nn.SiLU(), nn.Dropout(dropout))
        self.out = nn.Linear(bottleneck, out_dim)

    def descriptor(self, out: BackboneOutput) -> Tensor:
        """(B, len(scales) * width): every pyramid level average-pooled, concatenated."""
        check_grid(out.grid, self.scales, self.downsample)
        fmap = tokens_to_map(out.tokens[self.layer], out.grid)
        return torch.cat([level(fmap).mean(dim=(-2, -1)) for level in self.levels], dim=-1)

    def z(self, out: BackboneOutput) -> Tensor:
        """(B, bottleneck): the shared bottleneck every output is a linear map of."""
        return self.bottleneck(self.descriptor(out))

    def forward(self, out: BackboneOutput) -> tuple[Tensor, Tensor]:
        raw = self.out(self.z(out)).unsqueeze(1)
        return raw, raw.new_ones(raw.shape[:2])
