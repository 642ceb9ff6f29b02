"""Sclera criterion as in the reference deck: bce_weight * BCE + dice_weight * (1 - soft Dice), on the logits.

BCE is the mean over every pixel of the batch (binary_cross_entropy_with_logits). Soft Dice is taken over
the whole batch at once (the deck's sums run over every pixel i of the batch):
    Dice = (2 sum_i p_i y_i + eps) / (sum_i p_i + sum_i y_i + eps),  p = sigmoid(logits).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.cluster.distributed import global_sum


def batch_soft_dice(logits: Tensor, target: Tensor, eps: float) -> Tensor:
    """In a DDP training step the sums run over the global batch (global_sum), as in one process."""
    prob = torch.sigmoid(logits)
    sums = global_sum(torch.stack([(prob * target).sum(), prob.sum() + target.sum()]))
    return (2.0 * sums[0] + eps) / (sums[1] + eps)


class ScleraCriterion(nn.Module):
    """forward(outputs with "logits" (B,1,H,W), batch with "mask" (B,1,H,W) in {0,1}) -> {"bce", "dice"},
    the two weighted terms whose sum is the loss."""

    def __init__(self, bce_weight: float, dice_weight: float, dice_eps: float):
        super().__init__()
        self.bce_weight, self.dice_weight, self.dice_eps = float(bce_weight), float(dice_weight), float(dice_eps)

    def forward(self, outputs: dict[str, Tensor], batch: dict) -> dict[str, Tensor]:
        logits = outputs["logits"].float()
        target = batch["mask"].to(logits.dtype)
        if logits.shape != target.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and mask {tuple(target.shape)} differ in shape")
        bce = F.binary_cross_entropy_with_logits(logits, target)
        dice = 1.0 - batch_soft_dice(logits, target, self.dice_eps)
        return {"bce": self.bce_weight * bce, "dice": self.dice_weight * dice}
