"""CGDSeg as the reference deck lays it out: backbone tokens -> text grounding -> FPN (three scales from one
token grid) -> Dense-CSSE decoder stages (the first starting from the coarsest FPN level) -> head -> sclera
logits at input resolution."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.data.cached_encoder import encode
from common.data.feature_cache import input_hw
from common.models.backbone import Backbone, BackboneOutput, tokens_to_map
from common.models.option_groups import group_options
from common.utils.timm_import import timm
from sclera.grounding import build_grounding

DenseBlock = timm.models.densenet.DenseBlock


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
    """Concurrent channel and spatial squeeze-excitation; the two recalibrated maps are summed.
    Channel path: two bias-free 1x1 convolutions C -> C/r -> C (the deck's 2 C^2 / r parameters);
    spatial path: one 1x1 convolution C -> 1 with bias (C + 1)."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.channel = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, hidden, 1, bias=False), nn.ReLU(),
                                     nn.Conv2d(hidden, channels, 1, bias=False), nn.Sigmoid())
        self.spatial = nn.Sequential(nn.Conv2d(channels, 1, 1), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        return x * self.channel(x) + x * self.spatial(x)


def transition(cin: int, cout: int) -> nn.Sequential:
    """DenseNet transition without pooling: BN -> ReLU -> 1x1 convolution (no bias)."""
    return nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, cout, 1, bias=False))


class DecoderStage(nn.Module):
    """Upsample to the stage's size, concatenate the FPN skip (if any), DenseBlock, transition, CSSE."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, dense_layers: int, growth: int, bn_size: int,
                 se_reduction: int):
        super().__init__()
        cin = in_ch + skip_ch
        self.dense = DenseBlock(dense_layers, cin, bn_size=bn_size, growth_rate=growth)
        self.transition = transition(cin + dense_layers * growth, out_ch)
        self.se = CSSE(out_ch, se_reduction)

    def forward(self, x: Tensor, size: tuple[int, int], skip: Optional[Tensor]) -> Tensor:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.se(self.transition(self.dense(x)))


class Head(nn.Module):
    """Upsample to the input size, conv3x3 (with bias, as the deck's nn.Conv2d) + BN + ReLU, conv1x1 to logits."""

    def __init__(self, in_ch: int, mid_ch: int, num_classes: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_ch, mid_ch, 3, padding=1), nn.BatchNorm2d(mid_ch), nn.ReLU())
        self.out = nn.Conv2d(mid_ch, num_classes, 1)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        return self.out(self.body(F.interpolate(x, size=size, mode="bilinear", align_corners=False)))


def count(module: Optional[nn.Module], trainable_only: bool = False) -> int:
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _check_decoder(fpn_channels: Sequence[int], decoder_input: int, decoder_channels: Sequence[int],
                   decoder_strides: Sequence[float], decoder_skips: Sequence[Optional[int]]) -> None:
    if not len(decoder_channels) == len(decoder_strides) == len(decoder_skips):
        raise ValueError(f"model.decoder_channels {list(decoder_channels)}, decoder_strides {list(decoder_strides)} "
                         f"and decoder_skips {list(decoder_skips)} need one entry per decoder stage")
    levels = range(len(fpn_channels))
    for key, value in [("decoder_input", decoder_input)] + [("decoder_skips", s) for s in decoder_skips if s is not None]:
        if value not in levels:
            raise ValueError(f"model.{key}: FPN level {value} does not exist (levels 0..{len(fpn_channels) - 1})")


# model.fit_to_patch: how an input whose sides are not multiples of the patch size p meets the backbone
FIT_TO_PATCH = {
    "crop": "the last h % p rows and w % p columns left out, as a stride-p patch convolution leaves them "
            "(the reference deck's Conv14 on 256 px: 18x18 patches over 252 px, 4 px unused)",
    "resize": "resized (bilinear, antialiased) down to the nearest multiple of p",
    "none": "passed as it is (the backbone refuses it)",
}


def fit_mode(value: Union[str, bool]) -> str:
    """model.fit_to_patch as one of FIT_TO_PATCH; true / false are how older configs spelled resize / none."""
    mode = {True: "resize", False: "none"}.get(value, value) if isinstance(value, bool) else value
    if mode not in FIT_TO_PATCH:
        raise ValueError(f"model.fit_to_patch={value!r}: expected one of {sorted(FIT_TO_PATCH)}")
    return mode


def fitted_to_patch(images: Tensor, p: int, mode: str) -> Tensor:
    h, w = images.shape[-2:]
    size = (max(p, h // p * p), max(p, w // p * p))
    if mode == "crop":
        return images[..., :size[0], :size[1]]
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


@dataclass(frozen=True)
class EncoderOptions:
    """Which configured backbone layers' tokens are concatenated, the text grounding applied to them (a mapping
    for sclera.grounding.build_grounding; none or null: no grounding), and `fit_to_patch` (FIT_TO_PATCH)."""
    token_layers: Sequence[int]
    grounding: Optional[Mapping]
    fit_to_patch: Union[str, bool]


@dataclass(frozen=True)
class FPNOptions:
    fpn_channels: Sequence[int]
    fpn_strides: Sequence[float]


@dataclass(frozen=True)
class DecoderOptions:
    """Dense-CSSE decoder stages: where they start, each stage's width, size and skip, and the dense blocks."""
    decoder_input: int
    decoder_channels: Sequence[int]
    decoder_strides: Sequence[float]
    decoder_skips: Sequence[Optional[int]]
    dense_layers: int
    growth: int
    bn_size: int
    se_reduction: int


@dataclass(frozen=True)
class HeadOptions:
    head_channels: int
    num_classes: int


OPTION_GROUPS = {"encoder": EncoderOptions, "fpn": FPNOptions, "decoder": DecoderOptions, "head": HeadOptions}


class CGDSeg(nn.Module):
    """forward(batch with "image" (B,3,H,W) in [0,1]) -> {"logits": (B, num_classes, H, W)}.

    The decoder starts from FPN level `decoder_input`; stage i upsamples to input / decoder_strides[i] and
    concatenates FPN level decoder_skips[i] (none when null). With `fit_to_patch`, an input whose sides are
    not multiples of the patch size is cropped or resized down to the nearest multiple (FIT_TO_PATCH) for the
    backbone only; FPN, decoder and logits keep the input size. Built from the flat keys of conf/model/sclera/*.yaml by
    `from_options`.
    """

    def __init__(self, backbone: Backbone, encoder: EncoderOptions, fpn: FPNOptions, decoder: DecoderOptions,
                 head: HeadOptions):
        super().__init__()
        d = decoder
        _check_decoder(fpn.fpn_channels, d.decoder_input, d.decoder_channels, d.decoder_strides, d.decoder_skips)
        self.backbone = backbone
        self.token_layers = [int(i) for i in encoder.token_layers]
        self.fit_to_patch = fit_mode(encoder.fit_to_patch)
        dim = backbone.embed_dim * len(self.token_layers)
        self.grounding = build_grounding(encoder.grounding, dim)
        self.fpn = FPN(dim, fpn.fpn_channels, fpn.fpn_strides)
        self.decoder_input = int(d.decoder_input)
        self.decoder_strides = [float(s) for s in d.decoder_strides]
        self.decoder_skips = [None if s is None else int(s) for s in d.decoder_skips]
        stages, cin = [], fpn.fpn_channels[self.decoder_input]
        for cout, skip in zip(d.decoder_channels, self.decoder_skips):
            skip_ch = 0 if skip is None else fpn.fpn_channels[skip]
            stages.append(DecoderStage(cin, skip_ch, cout, d.dense_layers, d.growth, d.bn_size, d.se_reduction))
            cin = cout
        self.decoder = nn.ModuleList(stages)
        self.head = Head(cin, head.head_channels, head.num_classes)

    @classmethod
    def from_options(cls, backbone: Backbone, **options) -> "CGDSeg":
        """From the flat keys of conf/model/sclera/*.yaml (as every checkpoint's config stores them), each handed
        to the group with a field of its name (OPTION_GROUPS)."""
        return cls(backbone, **group_options(options, OPTION_GROUPS, "model (sclera.model.CGDSeg)"))

    def parameter_report(self) -> dict[str, int]:
        """Trainable parameters per component (backbone: its adapters), plus the frozen and total counts."""
        parts = {"backbone_adapters": self.backbone, "grounding": self.grounding, "fpn": self.fpn,
                 "decoder": self.decoder, "head": self.head}
        report = {name: count(m, trainable_only=True) for name, m in parts.items()}
        report["trainable"] = count(self, trainable_only=True)
        report["frozen"] = count(self) - report["trainable"]
        return report

    def features(self, images: Tensor | BackboneOutput, cache_keys: Optional[Sequence[str]] = None) -> Tensor:
        """images: pixels, or their cached backbone features (data.cache_features)."""
        p = self.backbone.patch_size
        h, w = input_hw(images)
        if isinstance(images, Tensor) and self.fit_to_patch != "none" and (h % p or w % p):   # 256 -> 252 for patch 14
            images = fitted_to_patch(images, p, self.fit_to_patch)
        out = encode(self.backbone, images, cache_keys)
        tokens = torch.cat([out.tokens[i] for i in self.token_layers], dim=-1)
        if self.grounding is not None:
            tokens = self.grounding(tokens)
        return tokens_to_map(tokens, out.grid)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        images = batch["image"]
        size = input_hw(images)
        levels = self.fpn(self.features(images, batch.get("cache_key")), size)
        x = levels[self.decoder_input]
        for stage, stride, skip in zip(self.decoder, self.decoder_strides, self.decoder_skips):
            x = stage(x, scaled_size(size, stride), None if skip is None else levels[skip])
        return {"logits": self.head(x, size)}
