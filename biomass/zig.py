"""Zero-inflated Gamma (ZIG) output and loss (the failure diagnosis' section 3.2).

Per target three outputs: pi (probability of an exact zero, sigmoid), mu (mean of the non-zero part,
softplus, in grams) and k (Gamma shape, softplus). Density f(y) = pi * delta(y) + (1 - pi) * Gamma(y; k,
rate k / mu); the expected grams are (1 - pi) * mu. NLL: -log pi for y = 0, -log(1 - pi) - log Gamma(y)
for y > 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from common.training.losses import as_bool_mask, masked_mean

EPS = 1e-6


class ZeroInflatedGamma:
    """Parameterisation (biomass.param interface): raw (..., 15) = per target [zero logit, mean, shape];
    space (..., 15) = [pi (5), mu (5), k (5)], averaged when pooling; targets = (1 - pi) * mu."""
    name = "zig"
    raw_dim = 15
    space_dim = 15

    @staticmethod
    def to_space(raw: Tensor) -> Tensor:
        return torch.cat([torch.sigmoid(raw[..., 0:5]), F.softplus(raw[..., 5:10]),
                          F.softplus(raw[..., 10:15]) + EPS], dim=-1)

    @staticmethod
    def to_targets(space: Tensor) -> Tensor:
        return (1.0 - space[..., 0:5]) * space[..., 5:10]

    @staticmethod
    def extras(space: Tensor, grams_per_unit: Tensor) -> dict[str, Tensor]:
        """The distribution's parameters for the loss: zig_pi, zig_mu_g (grams), zig_shape, each (B, 5)."""
        return {"zig_pi": space[..., 0:5], "zig_mu_g": space[..., 5:10] * grams_per_unit,
                "zig_shape": space[..., 10:15]}


def zig_nll(pi: Tensor, mu: Tensor, shape: Tensor, target: Tensor) -> Tensor:
    """Element-wise NLL of `target` (>= 0) under ZIG(pi, mu, shape); same shape as the inputs."""
    pi, mu, shape = pi.float().clamp(EPS, 1 - EPS), mu.float().clamp_min(EPS), shape.float().clamp_min(EPS)
    target = target.float()
    positive = target > 0
    y = torch.where(positive, target, torch.ones_like(target))
    log_gamma = shape * torch.log(shape / mu) + (shape - 1) * torch.log(y) - shape * y / mu - torch.lgamma(shape)
    return torch.where(positive, -torch.log1p(-pi) - log_gamma, -torch.log(pi))


def masked_zig_loss(pi: Tensor, mu: Tensor, shape: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean ZIG NLL over the observed (mask 1) elements; NaN targets allowed where masked."""
    observed = as_bool_mask(mask, target.shape)
    target = torch.where(observed, target.float(), torch.zeros_like(target, dtype=torch.float32))
    return masked_mean(zig_nll(pi, mu, shape, target), observed)
