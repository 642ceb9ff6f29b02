"""Predict-time test-time augmentation and ensembling of several trained biomass models.

TTA views: the image, its horizontal / vertical flips and rescalings (sides rounded to the patch
size). Every view predicts the same quadrat's grams (the heads average per-area densities), so the
predictions are averaged. Averaging pred_g is averaging in component space: the targets are linear
in the components, so GDM = green + clover and Total = all three still hold.
Ensemble members (e.g. the fold models of mode=cv) are averaged per image, either equally or with
MC-dropout weights: K stochastic passes with the head's dropout on, weight 1 / (variance of the
predicted total + eps), normalised over the members.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def tta_views(images: Tensor, hflip: bool, vflip: bool, scales: Sequence[float], patch: int) -> list[Tensor]:
    views = [images]
    if hflip:
        views.append(images.flip(-1))
    if vflip:
        views.append(images.flip(-2))
    h, w = images.shape[-2:]
    for scale in scales:
        size = (max(patch, round(h * scale / patch) * patch), max(patch, round(w * scale / patch) * patch))
        if size != (h, w):
            views.append(F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True))
    return views


def predict_tta(model: nn.Module, batch: dict, hflip: bool, vflip: bool, scales: Sequence[float]) -> Tensor:
    """Mean pred_g (B, 5) of `model` over the TTA views of batch["image"]."""
    patch = model.backbone.patch_size
    preds = [model({**batch, "image": view})["pred_g"].float()
             for view in tta_views(batch["image"], hflip, vflip, scales, patch)]
    return torch.stack(preds).mean(dim=0)


def _dropouts(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.head.modules() if isinstance(m, nn.Dropout) and m.p > 0]


@torch.no_grad()
def mc_dropout_variance(model: nn.Module, batch: dict, passes: int) -> Tensor:
    """Per-image variance (B,) of the predicted total grams over `passes` passes with head dropout on."""
    dropouts = _dropouts(model)
    if not dropouts:
        raise ValueError("MC-dropout weighting needs dropout in the head (model.head.dropout > 0)")
    for m in dropouts:
        m.train()
    try:
        totals = torch.stack([model(batch)["pred_g"][:, -1].float() for _ in range(passes)])
    finally:
        for m in dropouts:
            m.eval()
    return totals.var(dim=0, unbiased=True)


class BiomassEnsemble(nn.Module):
    """forward(batch) -> pred_g (B, 5): members' TTA predictions averaged per image (equal weights, or
    MC-dropout inverse-variance weights when mc_passes >= 2), each times the member's fixed `prior` weight
    (ensemble.weighting=metric), renormalised per image; plus member_weights (B, M)."""

    def __init__(self, members: Sequence[nn.Module], hflip: bool, vflip: bool, scales: Sequence[float],
                 mc_passes: int, mc_eps: float, prior: Sequence[float] | None = None):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one model")
        if mc_passes == 1:
            raise ValueError("mc_passes must be 0 (equal weights) or >= 2 (a variance needs two passes)")
        self.members = nn.ModuleList(members)
        self.hflip, self.vflip, self.scales = bool(hflip), bool(vflip), [float(s) for s in scales]
        self.mc_passes, self.mc_eps = int(mc_passes), float(mc_eps)
        self.backbone = members[0].backbone   # the Task contract's attribute (parameter tags, device moves)
        self.register_buffer("prior", torch.tensor([1.0] * len(members) if prior is None else list(prior)))

    @torch.no_grad()
    def forward(self, batch: dict) -> dict[str, Tensor]:
        preds = torch.stack([predict_tta(m.eval(), batch, self.hflip, self.vflip, self.scales)
                             for m in self.members], dim=1)                       # (B, M, 5)
        if self.mc_passes >= 2:
            var = torch.stack([mc_dropout_variance(m, batch, self.mc_passes) for m in self.members], dim=1)
            weights = 1.0 / (var + self.mc_eps)
        else:
            weights = preds.new_ones(preds.shape[:2])
        weights = weights * self.prior.to(weights)
        weights = weights / weights.sum(dim=1, keepdim=True)
        return {"pred_g": (weights.unsqueeze(-1) * preds).sum(dim=1), "member_weights": weights}
