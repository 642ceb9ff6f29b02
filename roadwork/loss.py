"""Roadwork criterion: focal classification + multi-view consistency + auxiliary weather classification
(+ auxiliary roadwork-object segmentation when the model has a seg head).

Terms are returned already weighted (they sum to the loss). The auxiliary weather target is the
weather index of the sidecar; samples with unknown weather (index 0) are masked out.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from common.training.losses import as_bool_mask, focal_loss, masked_mean, view_consistency_kl
from roadwork.view_fusion import gather_views


def seg_loss(outputs: dict[str, Tensor], batch: dict) -> Tensor:
    """BCE-with-logits between the patch-grid logits and the object masks area-averaged to that grid (each
    patch's object fraction: soft targets), mean per item, then mean over items with `mask_known` (0 with
    zero gradient when there are none). Logits of only some views (`seg_views`) meet those views' masks."""
    if "seg_target" not in batch:
        raise ValueError("model.seg_head=true needs object masks in the batch (seg_target): set data.masks, or "
                         "model.seg_head=false or loss.seg_weight=0")
    logits, target = outputs["seg_logits"].float(), batch["seg_target"].float()
    if "seg_views" in outputs:
        target = gather_views(target, outputs["seg_views"])
    grid = F.adaptive_avg_pool2d(target.flatten(0, 1), logits.shape[-2:]).view_as(logits)
    per_item = F.binary_cross_entropy_with_logits(logits, grid, reduction="none").flatten(1).mean(1)
    return masked_mean(per_item, as_bool_mask(batch["mask_known"], per_item.shape, "mask_known"))


ALPHA_MODES = ("class", "scalar")


def scalar_alpha_focal(logits: Tensor, label: Tensor, alpha: float, gamma: float, label_smoothing: float) -> Tensor:
    """The plan's focal loss, its steps as written: CE with label smoothing, p = softmax(logits)[true class],
    alpha * (1 - p)^gamma * CE; mean over samples with a label (label >= 0), 0 with zero gradient when none."""
    valid = label >= 0
    target = label.clamp_min(0)
    ce = F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing, reduction="none")
    p_true = logits.float().softmax(-1).gather(1, target[:, None])[:, 0]
    per_sample = alpha * (1.0 - p_true).pow(gamma) * ce
    return (per_sample * valid).sum() / valid.sum().clamp_min(1)


class RoadworkLoss(nn.Module):
    def __init__(self, focal_weight: float, consistency_weight: float, weather_weight: float, alpha: float,
                 gamma: float, label_smoothing: float, weather_label_smoothing: float, seg_weight: float = 0.0,
                 alpha_mode: str = "class", consistency_reduction: str = "mean"):
        super().__init__()
        if alpha_mode not in ALPHA_MODES:
            raise ValueError(f"loss.alpha_mode={alpha_mode!r}: expected one of {ALPHA_MODES}")
        if consistency_reduction not in ("mean", "sum"):
            raise ValueError(f"loss.consistency_reduction={consistency_reduction!r}: expected 'mean' or 'sum'")
        self.weights = {"focal": focal_weight, "consistency": consistency_weight, "weather": weather_weight,
                        "seg": seg_weight}
        # class: alpha weights the roadwork class, 1 - alpha the other (the binary focal-loss convention);
        # scalar: alpha multiplies every sample's focal term (the plan).
        self.alpha_mode, self.alpha_value = alpha_mode, float(alpha)
        self.alpha = [1.0 - alpha, alpha]
        self.gamma = gamma
        self.label_smoothing = label_smoothing
        self.weather_label_smoothing = weather_label_smoothing
        self.consistency_reduction = consistency_reduction

    def _focal(self, logits: Tensor, label: Tensor) -> Tensor:
        if self.alpha_mode == "scalar":
            return scalar_alpha_focal(logits, label, self.alpha_value, self.gamma, self.label_smoothing)
        return focal_loss(logits, label, alpha=self.alpha, gamma=self.gamma, label_smoothing=self.label_smoothing,
                          mask=label >= 0)

    def forward(self, outputs: dict[str, Tensor], batch: dict) -> dict[str, Tensor]:
        label = batch["label"].long()
        terms = {"focal": self._focal(outputs["logits"], label)}
        if self.weights["consistency"]:
            terms["consistency"] = view_consistency_kl(outputs["view_logits"], reduction=self.consistency_reduction)
        if self.weights["weather"]:
            weather = batch["weather"].long()
            known = weather > 0
            terms["weather"] = focal_loss(outputs["weather_logits"], (weather - 1).clamp_min(0), alpha=None,
                                          gamma=0.0, label_smoothing=self.weather_label_smoothing, mask=known)
        if self.weights["seg"] and "seg_logits" in outputs:
            terms["seg"] = seg_loss(outputs, batch)
        return {name: self.weights[name] * value for name, value in terms.items()}
