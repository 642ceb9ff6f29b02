"""Manifold mixup on tokens (masks ANDed, constraint-aware target mixing) and CutMix on images.

A `MixPlan` is drawn once per batch by `sample_mixup`: one mixing weight lam for the whole batch
(per-batch, as in Zhang et al. 2018 and Verma et al. 2019) and a pairing permutation `perm` with
perm[i] != i, so sample i is mixed with sample perm[i] as lam * x_i + (1 - lam) * x_perm[i].
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

TargetMixFn = Callable[[Tensor, Tensor, float], Tensor]


@dataclass(frozen=True)
class MixPlan:
    lam: float
    perm: Tensor  # LongTensor (B,), a derangement: perm[i] != i


def _derangement(batch_size: int, generator: torch.Generator | None) -> Tensor:
    """Random permutation without fixed points: a random order, each element paired with the one
    `shift` places later (cyclically), shift uniform in 1..B-1."""
    order = torch.randperm(batch_size, generator=generator)
    shift = int(torch.randint(1, batch_size, (1,), generator=generator))
    perm = torch.empty_like(order)
    perm[order] = torch.roll(order, -shift)
    return perm


def sample_mixup(batch_size: int, alpha: float, prob: float,
                 generator: torch.Generator | None = None) -> MixPlan | None:
    """With probability `prob`, a plan with lam ~ Beta(alpha, alpha) and a derangement; otherwise None.

    Batches of one sample cannot be paired and always give None. lam is drawn by numpy's Beta sampler
    seeded from `generator`, so a seeded generator makes the plan reproducible.
    """
    if alpha <= 0:
        raise ValueError(f"mixup alpha must be > 0, got {alpha}")
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"mixup prob must be in [0, 1], got {prob}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if batch_size < 2 or float(torch.rand((), generator=generator)) >= prob:
        return None
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    return MixPlan(lam=lam, perm=_derangement(batch_size, generator))


def _mix(x: Tensor, plan: MixPlan) -> Tensor:
    if x.shape[0] != plan.perm.numel():
        raise ValueError(f"batch dimension {x.shape[0]} != plan size {plan.perm.numel()}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"only floating tensors can be mixed linearly, got {x.dtype}")
    return plan.lam * x + (1.0 - plan.lam) * x[plan.perm.to(x.device)]


def mix_tokens(tokens: Tensor | Sequence[Tensor], plan: MixPlan) -> Tensor | list[Tensor]:
    """lam * x + (1 - lam) * x[perm] for a (B, N, C) tensor or each tensor of a list (one per layer)."""
    if isinstance(tokens, Tensor):
        return _mix(tokens, plan)
    return [_mix(t, plan) for t in tokens]


def mix_masks(mask: Tensor, plan: MixPlan) -> Tensor:
    """mask & mask[perm]: a mixed target is observed only if it is observed in both samples."""
    if mask.shape[0] != plan.perm.numel():
        raise ValueError(f"mask batch dimension {mask.shape[0]} != plan size {plan.perm.numel()}")
    other = mask[plan.perm.to(mask.device)]
    if mask.dtype == torch.bool:
        return mask & other
    return mask * other


def mix_targets(targets: Tensor, plan: MixPlan, mix_fn: TargetMixFn | None = None) -> Tensor:
    """Linear mix lam * y + (1 - lam) * y[perm], or `mix_fn(y, y[perm], lam)` for targets with
    constraints (e.g. components that must sum to a total); NaN stays NaN and must be masked by mix_masks."""
    if mix_fn is None:
        return _mix(targets, plan)
    if targets.shape[0] != plan.perm.numel():
        raise ValueError(f"targets batch dimension {targets.shape[0]} != plan size {plan.perm.numel()}")
    return mix_fn(targets, targets[plan.perm.to(targets.device)], plan.lam)


def mix_soft_labels(labels_int: Tensor, num_classes: int, plan: MixPlan) -> Tensor:
    """Integer class labels (B,) -> mixed soft targets (B, K): lam * onehot(y) + (1 - lam) * onehot(y[perm])."""
    if labels_int.dtype.is_floating_point or labels_int.dim() != 1:
        raise ValueError(f"labels must be a 1-D integer tensor, got {labels_int.dtype} {tuple(labels_int.shape)}")
    if bool(((labels_int < 0) | (labels_int >= num_classes)).any()):
        raise ValueError(f"labels must be in [0, {num_classes}); mask missing labels before mixing")
    onehot = torch.nn.functional.one_hot(labels_int, num_classes).float()
    return _mix(onehot, plan)


def sample_box(height: int, width: int, lam: float, generator: torch.Generator | None = None
               ) -> tuple[int, int, int, int]:
    """CutMix box (y1, y2, x1, x2) of area ratio 1 - lam, centred uniformly in the image, clipped to it."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy = int(torch.randint(0, height, (1,), generator=generator))
    cx = int(torch.randint(0, width, (1,), generator=generator))
    y1, y2 = max(cy - cut_h // 2, 0), min(cy + cut_h - cut_h // 2, height)
    x1, x2 = max(cx - cut_w // 2, 0), min(cx + cut_w - cut_w // 2, width)
    return y1, y2, x1, x2


def paste_box(x: Tensor, plan: MixPlan, box: tuple[int, int, int, int]) -> Tensor:
    """Copy of x (B, ..., H, W) with the box region taken from x[perm] (use for images and their masks)."""
    if x.shape[0] != plan.perm.numel():
        raise ValueError(f"batch dimension {x.shape[0]} != plan size {plan.perm.numel()}")
    y1, y2, x1, x2 = box
    out = x.clone()
    out[..., y1:y2, x1:x2] = x[plan.perm.to(x.device)][..., y1:y2, x1:x2]
    return out


def cutmix(images: Tensor, plan: MixPlan, generator: torch.Generator | None = None) -> tuple[Tensor, float]:
    """CutMix (Yun et al. 2019) on (B, C, H, W) images: one box for the batch, pasted from images[perm].

    Returns (mixed images, lam_corrected) with lam_corrected = 1 - pasted area / image area after clipping,
    the weight of the original sample's target. Use `sample_box` + `paste_box` to apply the same box to masks.
    """
    if images.dim() != 4:
        raise ValueError(f"cutmix expects (B, C, H, W) images, got {tuple(images.shape)}")
    height, width = images.shape[-2:]
    box = sample_box(height, width, plan.lam, generator)
    y1, y2, x1, x2 = box
    lam_corrected = 1.0 - (y2 - y1) * (x2 - x1) / float(height * width)
    return paste_box(images, plan, box), lam_corrected
