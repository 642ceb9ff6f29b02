"""Predicted-vs-true scatter per target, drawn with PIL (no plotting dependency): one panel per target
side by side, axes from 0 to the panel's largest value, the y = x diagonal in grey, points in red."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from biomass.constants import TARGETS


def panel_xy(value: np.ndarray, top: float, size: int, margin: int) -> np.ndarray:
    """Grams -> pixel offset along an axis of a panel (0 at the margin, `top` at size - margin)."""
    return margin + value / top * (size - 2 * margin)


def scatter_image(true: np.ndarray, pred: np.ndarray, mask: np.ndarray, size: int = 160,
                  margin: int = 12) -> np.ndarray:
    """true, pred, mask (N, 5) -> RGB uint8 image (size, 5 * size, 3)."""
    image = Image.new("RGB", (size * len(TARGETS), size), "white")
    draw = ImageDraw.Draw(image)
    for j, name in enumerate(TARGETS):
        x0 = j * size
        sel = mask[:, j] > 0
        top = float(max(np.max(true[sel, j], initial=0.0), np.max(pred[sel, j], initial=0.0), 1e-6))
        draw.rectangle([x0, 0, x0 + size - 1, size - 1], outline="black")
        draw.line([x0 + margin, size - margin, x0 + size - margin, margin], fill=(170, 170, 170))
        draw.text((x0 + margin, 1), name, fill="black")
        for t, p in zip(true[sel, j], pred[sel, j]):
            x = x0 + panel_xy(t, top, size, margin)
            y = size - panel_xy(p, top, size, margin)
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(220, 30, 30))
    return np.asarray(image)
