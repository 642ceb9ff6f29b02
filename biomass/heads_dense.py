"""Multi-layer dense heads (same interface as biomass.heads): FPN and a DPT-style reassemble-and-fuse.

Layer i of the configured backbone layers is reassembled to `scales[i]` times the patch grid
(shallow layers to fine maps, deep layers to coarse ones, as in DPT), then fused:
- FPNHead: top-down pathway (upsample + add), a 3x3 smoothing conv per level, every level predicts
  per location; the image value is the mean over locations, then over levels.
- DPTHead: from the coarsest map, repeatedly upsample, add the next finer map after a residual conv
  unit, refine; the finest fused map predicts per location; the image value is their mean.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from biomass.heads import _norm, uniform_weights
from common.models.backbone import BackboneOutput, tokens_to_map


def reassemble(embed_dim: int, width: int, scale: float) -> nn.Module:
    """1x1 projection to `width`, then resampling by `scale` (transposed conv up, strided conv down)."""
    layers: list[nn.Module] = [nn.Conv2d(embed_dim, width, 1)]
    if scale > 1:
        k = int(round(scale))
        layers.append(nn.ConvTranspose2d(width, width, k, k))
    elif scale < 1:
        k = int(round(1 / scale))
        layers.append(nn.Conv2d(width, width, 3, stride=k, padding=1))
    return nn.Sequential(*layers)


def predictor(width: int, hidden: int, out_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(width, hidden, 1), nn.GELU(), nn.Dropout(dropout), nn.Conv2d(hidden, out_dim, 1))


# scales: null -> these, by number of layers (shallow layers to fine maps, as DPT; ConvNeXt's four stages projected
# to stride 16 come back to their own strides 4, 8, 16, 32)
DEFAULT_SCALES = {1: [1.0], 2: [2.0, 0.5], 3: [2.0, 1.0, 0.5], 4: [4.0, 2.0, 1.0, 0.5]}


def _check_scales(scales: Sequence[float] | None, num_layers: int) -> list[float]:
    if scales is None:
        if num_layers not in DEFAULT_SCALES:
            raise ValueError(f"head.scales=null has defaults for 1 to 4 layers, the backbone gives {num_layers}: "
                             f"give one scale per layer in backbone.layers")
        return list(DEFAULT_SCALES[num_layers])
    if len(scales) != num_layers:
        raise ValueError(f"head.scales has {len(scales)} entries but the backbone gives {num_layers} layers; "
                         f"give one scale per layer in backbone.layers")
    return [float(s) for s in scales]


class _MultiScale(nn.Module):
    def __init__(self, embed_dim: int, num_layers: int, width: int, scales: Sequence[float] | None):
        super().__init__()
        self.scales = _check_scales(scales, num_layers)
        self.reassemble = nn.ModuleList(reassemble(embed_dim, width, s) for s in self.scales)

    def maps(self, out: BackboneOutput) -> list[Tensor]:
        """Reassembled maps ordered from the coarsest to the finest."""
        maps = [r(tokens_to_map(t, out.grid)) for r, t in zip(self.reassemble, out.tokens)]
        return sorted(maps, key=lambda m: m.shape[-2] * m.shape[-1])


class FPNHead(_MultiScale):
    def __init__(self, embed_dim: int, num_layers: int, out_dim: int, width: int, hidden: int,
                 dropout: float, scales: Sequence[float] | None, norm: str = "ln"):
        super().__init__(embed_dim, num_layers, width, scales)
        self.smooth = nn.ModuleList(nn.Sequential(nn.Conv2d(width, width, 3, padding=1), _norm(norm, width))
                                    for _ in self.scales)
        self.predict = predictor(width, hidden, out_dim, dropout)

    def forward(self, out: BackboneOutput) -> tuple[Tensor, Tensor]:
        raws, weights, top = [], [], None
        for smooth, fmap in zip(self.smooth, self.maps(out)):
            top = fmap if top is None else fmap + F.interpolate(top, size=fmap.shape[-2:], mode="nearest")
            raw = self.predict(smooth(top)).flatten(2).transpose(1, 2)
            raws.append(raw)
            weights.append(uniform_weights(raw) / len(self.scales))
        return torch.cat(raws, dim=1), torch.cat(weights, dim=1)


class ResidualConvUnit(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(nn.GELU(), nn.Conv2d(width, width, 3, padding=1),
                                  nn.GELU(), nn.Conv2d(width, width, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class DPTHead(_MultiScale):
    def __init__(self, embed_dim: int, num_layers: int, out_dim: int, width: int, hidden: int,
                 dropout: float, scales: Sequence[float] | None):
        super().__init__(embed_dim, num_layers, width, scales)
        self.skip = nn.ModuleList(ResidualConvUnit(width) for _ in self.scales)
        self.refine = nn.ModuleList(ResidualConvUnit(width) for _ in self.scales)
        self.predict = predictor(width, hidden, out_dim, dropout)

    def forward(self, out: BackboneOutput) -> tuple[Tensor, Tensor]:
        fused = None
        for skip, refine, fmap in zip(self.skip, self.refine, self.maps(out)):
            x = skip(fmap)
            if fused is not None:
                x = x + F.interpolate(fused, size=fmap.shape[-2:], mode="bilinear", align_corners=False)
            fused = refine(x)
        raw = self.predict(fused).flatten(2).transpose(1, 2)
        return raw, uniform_weights(raw)
