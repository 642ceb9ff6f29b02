"""Regression heads, one interface.

`head(BackboneOutput) -> (raw, weights)`: raw (B, M, D) raw outputs of M instances (one pooled
vector, every patch token, every location of every pyramid level, ...) and weights (B, M) summing
to 1 per image. The model maps raw to the parameterisation's non-negative space per instance and
takes the weighted sum, so "each patch predicts g/m2" and the image predicts their average.
Every head is built as cls(embed_dim=..., num_layers=..., out_dim=..., **its own config).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from common.models.backbone import BackboneOutput, tokens_to_map


def mlp(in_dim: int, hidden: int, out_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU(),
                         nn.Dropout(dropout), nn.Linear(hidden, out_dim))


def uniform_weights(raw: Tensor) -> Tensor:
    return raw.new_full(raw.shape[:2], 1.0 / raw.shape[1])


class PooledMLP(nn.Module):
    """MLP on [CLS, mean patch token] of one layer (mean patch twice when there is no CLS)."""

    def __init__(self, embed_dim: int, num_layers: int, out_dim: int, hidden: int, dropout: float,
                 layer: int = -1):
        super().__init__()
        self.layer = layer
        self.net = mlp(2 * embed_dim, hidden, out_dim, dropout)

    def forward(self, out: BackboneOutput) -> tuple[Tensor, Tensor]:
        tokens = out.tokens[self.layer]
        mean = tokens.mean(dim=1)
        cls = out.cls if out.cls is not None else mean
        raw = self.net(torch.cat([cls, mean], dim=-1)).unsqueeze(1)
        return raw, uniform_weights(raw)


class DensityMLP(nn.Module):
    """Per-token MLP on the concatenated tokens of all configured layers; uniform average."""

    def __init__(self, embed_dim: int, num_layers: int, out_dim: int, hidden: int, dropout: float):
        super().__init__()
        self.net = mlp(embed_dim * num_layers, hidden, out_dim, dropout)

    def forward(self, out: BackboneOutput) -> tuple[Tensor, Tensor]:
        raw = self.net(torch.cat(out.tokens, dim=-1))
        return raw, uniform_weights(raw)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map at each location (Detectron2's ViTDet LayerNorm, eps 1e-6)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


NORMS = ("ln", "gn1", "bn", "none")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "ln":
        return LayerNorm2d(channels)
    if kind == "gn1":           # one group: normalises over C x H x W (the suite's earlier "ln")
        return nn.GroupNorm(1, channels)
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"head norm={kind!r}: expected one of {NORMS}")


DOWNSAMPLES = ("pairs", "ceil")


def _downsample(scale: float, mode: str) -> nn.Module:
    """pairs: log2(1/scale) 2x2 max-pools, floor sizes (ViTDet; 30x60 -> 15x30 -> 7x15); ceil: one k x k max-pool,
    sizes rounded up (30x60 -> 8x15)."""
    k = int(round(1 / scale))
    if mode == "pairs":
        return nn.Sequential(*[nn.MaxPool2d(2, 2) for _ in range(k.bit_length() - 1)])
    if mode == "ceil":
        return nn.MaxPool2d(k, k, ceil_mode=True)
    raise ValueError(f"head downsample={mode!r}: expected one of {DOWNSAMPLES}")


def _rescale(channels: int, scale: float, norm: str, downsample: str) -> tuple[nn.Module, int]:
    """ViTDet's simple pyramid: deconvolutions up, max-pooling down, from one stride-p map."""
    if scale == 4.0:
        return nn.Sequential(nn.ConvTranspose2d(channels, channels // 2, 2, 2), _norm(norm, channels // 2),
                             nn.GELU(), nn.ConvTranspose2d(channels // 2, channels // 4, 2, 2)), channels // 4
    if scale == 2.0:
        return nn.ConvTranspose2d(channels, channels // 2, 2, 2), channels // 2
    if scale == 1.0:
        return nn.Identity(), channels
    if scale in (0.5, 0.25):
        return _downsample(scale, downsample), channels
    raise ValueError(f"pyramid scale {scale}: expected one of 4, 2, 1, 0.5, 0.25")


def vitdet_pyramid(embed_dim: int, width: int, scales: Sequence[float], norm: str,
                   downsample: str = "ceil") -> nn.ModuleList:
    """ViTDet's simple feature pyramid: per scale, rescale the token map, then 1x1 and 3x3 convolutions."""
    levels = nn.ModuleList()
    for scale in scales:
        rescale, ch = _rescale(embed_dim, float(scale), norm, downsample)
        levels.append(nn.Sequential(
            rescale, nn.Conv2d(ch, width, 1, bias=norm == "none"), _norm(norm, width),
            nn.Conv2d(width, width, 3, padding=1, bias=norm == "none"), _norm(norm, width)))
    return levels


def check_grid(grid: tuple[int, int], scales: Sequence[float], downsample: str) -> None:
    """Floor max-pools need the grid at least 1/scale locations along each side."""
    if downsample != "pairs":
        return
    need = int(round(1 / min(float(s) for s in scales)))
    if min(grid) < need:
        raise ValueError(f"ViTDet pyramid: a {grid[0]}x{grid[1]} token grid is too small for scale {min(scales)} "
                         f"with downsample=pairs (needs >= {need} locations a side): use a larger data.image_size "
                         f"or downsample=ceil")


class ViTDetHead(nn.Module):
    """ViTDet simple feature pyramid on one layer + a shared per-location predictor.

    Each level predicts per location; the image value is the mean over locations, then over levels.
    """

    def __init__(self, embed_dim: int, num_layers: int, out_dim: int, width: int, hidden: int,
                 dropout: float, scales: Sequence[float] = (2.0, 1.0, 0.5, 0.25), norm: str = "ln",
                 layer: int = -1, downsample: str = "ceil"):
        super().__init__()
        self.layer, self.scales, self.downsample = layer, list(scales), downsample
        self.levels = vitdet_pyramid(embed_dim, width, scales, norm, downsample)
        self.predict = nn.Sequential(nn.Conv2d(width, hidden, 1), nn.GELU(), nn.Dropout(dropout),
                                     nn.Conv2d(hidden, out_dim, 1))

    def forward(self, out: BackboneOutput) -> tuple[Tensor, Tensor]:
        check_grid(out.grid, self.scales, self.downsample)
        fmap = tokens_to_map(out.tokens[self.layer], out.grid)
        raws, weights = [], []
        for level in self.levels:
            raw = self.predict(level(fmap)).flatten(2).transpose(1, 2)
            raws.append(raw)
            weights.append(uniform_weights(raw) / len(self.levels))
        return torch.cat(raws, dim=1), torch.cat(weights, dim=1)
