"""CGDSeg: backbone tokens -> text grounding -> FPN (three scales from one token grid) ->
three Dense-CSSE decoder stages -> head -> sclera logits at input resolution."""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from timm.models.densenet import DenseBlock
from torch import Tensor, nn

from common.backbone import Backbone, tokens_to_map
from common.cache import encode
from sclera.grounding import build_grounding

log = logging.getLogger(__name__)


def conv_bn_act(cin: int, cout: int, kernel: int, act: type[nn.Module]) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout), act())


def scaled_size(size: tuple[int, int], stride: float) -> tuple[int, int]:
    return max(1, round(size[0] / stride)), max(1, round(size[1] / stride))


class FPN(nn.Module):
    """One feature map per stride (relative to the input): bilinear resize + 1x1 conv + BN + GELU."""

    def __init__(self, in_dim: int, channels: Sequence[int], strides: Sequence[float]):
        super().__init__()
        if len(channels) != len(strides):
            raise ValueError(f"model.fpn_channels {list(channels)} and model.fpn_strides {list(strides)} differ in length")
        self.strides = [float(s) for s in strides]
        self.levels = nn.ModuleList(conv_bn_act(in_dim, c, 1, nn.GELU) for c in channels)

    def forward(self, grid: Tensor, input_size: tuple[int, int]) -> list[Tensor]:
        return [level(F.interpolate(grid, size=scaled_size(input_size, s), mode="bilinear", align_corners=False))
                for level, s in zip(self.levels, self.strides)]


class CSSE(nn.Module):
    """Concurrent channel and spatial squeeze-excitation; the two recalibrated maps are summed."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.channel = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, hidden, 1), nn.ReLU(),
                                     nn.Conv2d(hidden, channels, 1), nn.Sigmoid())
        self.spatial = nn.Sequential(nn.Conv2d(channels, 1, 1), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        return x * self.channel(x) + x * self.spatial(x)


class DecoderStage(nn.Module):
    """Upsample to the skip's size, concatenate, DenseBlock, transition (1x1 conv + BN + ReLU), CSSE."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, dense_layers: int, growth: int, bn_size: int,
                 se_reduction: int):
        super().__init__()
        cin = in_ch + skip_ch
        self.dense = DenseBlock(dense_layers, cin, bn_size=bn_size, growth_rate=growth)
        self.transition = conv_bn_act(cin + dense_layers * growth, out_ch, 1, nn.ReLU)
        self.se = CSSE(out_ch, se_reduction)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.se(self.transition(self.dense(torch.cat([x, skip], dim=1))))


class Head(nn.Module):
    """Upsample to the input size + conv3x3 + BN + ReLU + conv1x1 to logits."""

    def __init__(self, in_ch: int, mid_ch: int, num_classes: int):
        super().__init__()
        self.body = conv_bn_act(in_ch, mid_ch, 3, nn.ReLU)
        self.out = nn.Conv2d(mid_ch, num_classes, 1)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        return self.out(self.body(F.interpolate(x, size=size, mode="bilinear", align_corners=False)))


def count(module: Optional[nn.Module], trainable_only: bool = False) -> int:
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


class CGDSeg(nn.Module):
    """forward(batch with "image" (B,3,H,W) in [0,1]) -> {"logits": (B, num_classes, H, W)}.

    The decoder starts from the (grounded) token grid; stage i joins FPN level (coarsest first).
    With `fit_to_patch`, an input whose sides are not multiples of the patch size is resized down to
    the nearest multiple for the backbone only; FPN, decoder and logits keep the input size.
    """

    def __init__(self, backbone: Backbone, token_layers: Sequence[int], grounding: Optional[Mapping],
                 fpn_channels: Sequence[int], fpn_strides: Sequence[float], decoder_channels: Sequence[int],
                 dense_layers: int, growth: int, bn_size: int, se_reduction: int, head_channels: int,
                 num_classes: int, fit_to_patch: bool):
        super().__init__()
        if len(decoder_channels) != len(fpn_channels):
            raise ValueError(f"model.decoder_channels {list(decoder_channels)} needs one stage per FPN level "
                             f"({len(fpn_channels)})")
        self.backbone = backbone
        self.token_layers = [int(i) for i in token_layers]
        self.fit_to_patch = bool(fit_to_patch)
        dim = backbone.embed_dim * len(self.token_layers)
        self.grounding = build_grounding(grounding, dim)
        self.fpn = FPN(dim, fpn_channels, fpn_strides)
        order = sorted(range(len(fpn_strides)), key=lambda i: -float(fpn_strides[i]))   # coarsest first
        self.order = order
        stages, cin = [], dim
        for i, cout in zip(order, decoder_channels):
            stages.append(DecoderStage(cin, fpn_channels[i], cout, dense_layers, growth, bn_size, se_reduction))
            cin = cout
        self.decoder = nn.ModuleList(stages)
        self.head = Head(cin, head_channels, num_classes)
        log.info("CGDSeg parameters: %s", self.parameter_report())

    def parameter_report(self) -> dict[str, int]:
        parts = {"backbone": self.backbone, "grounding": self.grounding, "fpn": self.fpn,
                 "decoder": self.decoder, "head": self.head}
        report = {name: count(m) for name, m in parts.items()}
        report["backbone_trainable"] = count(self.backbone, trainable_only=True)
        report["trainable"] = count(self, trainable_only=True)
        return report

    def features(self, images: Tensor, cache_keys: Optional[Sequence[str]] = None) -> Tensor:
        p = self.backbone.patch_size
        h, w = images.shape[-2:]
        if self.fit_to_patch and (h % p or w % p):      # e.g. 256 -> 252 for patch 14: an 18x18 grid
            images = F.interpolate(images, size=(max(p, h // p * p), max(p, w // p * p)), mode="bilinear",
                                   align_corners=False, antialias=True)
        out = encode(self.backbone, images, cache_keys)
        tokens = torch.cat([out.tokens[i] for i in self.token_layers], dim=-1)
        if self.grounding is not None:
            tokens = self.grounding(tokens)
        return tokens_to_map(tokens, out.grid)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        images = batch["image"]
        size = (images.shape[-2], images.shape[-1])
        x = self.features(images, batch.get("cache_key"))
        levels = self.fpn(x, size)
        for stage, i in zip(self.decoder, self.order):
            x = stage(x, levels[i])
        return {"logits": self.head(x, size)}
