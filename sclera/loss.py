"""Sclera criterion: Dice + BCE on the logits (one weighted term)."""
from __future__ import annotations

from torch import Tensor, nn

from common.losses import dice_bce_loss


class ScleraCriterion(nn.Module):
    """forward(outputs with "logits" (B,1,H,W), batch with "mask" (B,1,H,W)) -> {"dice_bce": loss}."""

    def __init__(self, dice_weight: float, bce_weight: float, smooth: float):
        super().__init__()
        self.dice_weight, self.bce_weight, self.smooth = float(dice_weight), float(bce_weight), float(smooth)

    def forward(self, outputs: dict[str, Tensor], batch: dict) -> dict[str, Tensor]:
        loss = dice_bce_loss(outputs["logits"], batch["mask"], dice_weight=self.dice_weight,
                             bce_weight=self.bce_weight, smooth=self.smooth)
        return {"dice_bce": loss}
