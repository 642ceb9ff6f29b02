"""The validation images logged per epoch (ScleraTask.log_media): the image with the prediction and the truth
tinted over it."""
from __future__ import annotations

import numpy as np
import torch


def overlay(image: torch.Tensor, pred: np.ndarray, truth: np.ndarray | None) -> np.ndarray:
    """HxWx3 uint8: prediction tinted red, truth tinted green (both: yellow)."""
    rgb = (image.permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype(np.float32)
    tint = np.zeros_like(rgb)
    tint[..., 0] = pred * 255
    if truth is not None:
        tint[..., 1] = truth * 255
    shown = (pred > 0) | (truth > 0 if truth is not None else False)
    rgb[shown] = 0.55 * rgb[shown] + 0.45 * tint[shown]
    return rgb.astype(np.uint8)
