"""Output parameterisations: raw head outputs -> a non-negative "space" that is averaged when pooling
tokens, layers, views or ensemble members -> the five targets (order of biomass.constants.TARGETS).

- total_ratio: raw (..., 4) = total logit + 3 ratio logits (green, dead, clover); space = the three
  components total * softmax(ratios); targets rebuilt as green, dead, clover, green + clover, sum,
  so GDM = green + clover and Total = all three hold by construction, also after averaging.
- direct: raw (..., 5) -> five non-negative outputs (softplus); no identity is imposed.
- zig: zero-inflated Gamma per target (biomass.zig); expected grams (1 - pi) * mu, no identity imposed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from biomass.zig import ZeroInflatedGamma


class TotalRatio:
    name = "total_ratio"
    raw_dim = 4
    space_dim = 3

    @staticmethod
    def to_space(raw: Tensor) -> Tensor:
        return F.softplus(raw[..., :1]) * torch.softmax(raw[..., 1:4], dim=-1)

    @staticmethod
    def ratio_logits(raw: Tensor) -> Tensor:
        return raw[..., 1:4]

    @staticmethod
    def to_targets(space: Tensor) -> Tensor:
        green, dead, clover = space.unbind(-1)
        return torch.stack([green, dead, clover, green + clover, green + dead + clover], dim=-1)


class Direct:
    name = "direct"
    raw_dim = 5
    space_dim = 5

    @staticmethod
    def to_space(raw: Tensor) -> Tensor:
        return F.softplus(raw)

    @staticmethod
    def to_targets(space: Tensor) -> Tensor:
        return space


PARAMETERISATIONS = {p.name: p for p in (TotalRatio, Direct, ZeroInflatedGamma)}


def get_param(name: str):
    if name not in PARAMETERISATIONS:
        raise ValueError(f"model.param={name!r}: expected one of {sorted(PARAMETERISATIONS)}")
    return PARAMETERISATIONS[name]
