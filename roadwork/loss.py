"""Roadwork criterion: focal classification + multi-view consistency + auxiliary weather classification.

Terms are returned already weighted (they sum to the loss). The auxiliary weather target is the
weather index of the sidecar; samples with unknown weather (index 0) are masked out.
"""
from __future__ import annotations

from torch import Tensor, nn

from common.losses import focal_loss, view_consistency_kl


class RoadworkLoss(nn.Module):
    def __init__(self, focal_weight: float, consistency_weight: float, weather_weight: float, alpha: float,
                 gamma: float, label_smoothing: float, weather_label_smoothing: float):
        super().__init__()
        self.weights = {"focal": focal_weight, "consistency": consistency_weight, "weather": weather_weight}
        # alpha weights the roadwork class, 1 - alpha the other (the binary focal-loss convention).
        self.alpha = [1.0 - alpha, alpha]
        self.gamma = gamma
        self.label_smoothing = label_smoothing
        self.weather_label_smoothing = weather_label_smoothing

    def forward(self, outputs: dict[str, Tensor], batch: dict) -> dict[str, Tensor]:
        label = batch["label"].long()
        terms = {"focal": focal_loss(outputs["logits"], label, alpha=self.alpha, gamma=self.gamma,
                                     label_smoothing=self.label_smoothing, mask=label >= 0)}
        if self.weights["consistency"]:
            terms["consistency"] = view_consistency_kl(outputs["view_logits"])
        if self.weights["weather"]:
            weather = batch["weather"].long()
            known = weather > 0
            terms["weather"] = focal_loss(outputs["weather_logits"], (weather - 1).clamp_min(0), alpha=None,
                                          gamma=0.0, label_smoothing=self.weather_label_smoothing, mask=known)
        return {name: self.weights[name] * value for name, value in terms.items()}
