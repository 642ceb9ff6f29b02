"""Augmentations for artefacts of field photos: burnt-in camera timestamps / watermarks and light spots."""
from __future__ import annotations

from typing import Any

import albumentations as A
import cv2
import numpy as np


class TimestampOverlay(A.ImageOnlyTransform):
    """Draws a camera-style date-time string (orange or white, with a dark outline) in a random corner."""

    COLOURS = ((255, 140, 0), (255, 255, 255), (255, 220, 0))

    def __init__(self, font_scale: tuple[float, float] = (0.3, 0.6), p: float = 0.5):
        super().__init__(p=p)
        self.font_scale = tuple(font_scale)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        r = self.py_random
        text = (f"20{r.randint(10, 25):02d}/{r.randint(1, 12):02d}/{r.randint(1, 28):02d} "
                f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d}")
        return {"text": text, "scale": r.uniform(*self.font_scale), "corner": r.randint(0, 3),
                "colour": self.COLOURS[r.randint(0, len(self.COLOURS) - 1)]}

    def apply(self, img: np.ndarray, text: str = "", scale: float = 0.5, corner: int = 0,
              colour: tuple = (255, 255, 255), **params) -> np.ndarray:
        h, w = img.shape[:2]
        font = cv2.FONT_HERSHEY_SIMPLEX
        thickness = max(1, int(round(scale * 2)))
        (tw, th), base = cv2.getTextSize(text, font, scale, thickness)
        x = 4 if corner in (0, 2) else max(0, w - tw - 4)
        y = th + 4 if corner in (0, 1) else max(th, h - base - 4)
        out = np.ascontiguousarray(img.copy())
        cv2.putText(out, text, (x, y), font, scale, (0, 0, 0), thickness + 2, cv2.LINE_AA)
        cv2.putText(out, text, (x, y), font, scale, colour, thickness, cv2.LINE_AA)
        return out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("font_scale",)


class LightSpots(A.ImageOnlyTransform):
    """Brightens a few soft discs (sun flecks through a canopy, reflections): radius as a fraction of
    the image height, strength the fraction of the way to white at a spot's centre."""

    def __init__(self, num_spots: tuple[int, int] = (1, 4), radius: tuple[float, float] = (0.05, 0.2),
                 strength: tuple[float, float] = (0.2, 0.6), p: float = 0.5):
        super().__init__(p=p)
        self.num_spots, self.radius, self.strength = tuple(num_spots), tuple(radius), tuple(strength)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        r = self.py_random
        spots = [(r.uniform(0, w), r.uniform(0, h), r.uniform(*self.radius) * h, r.uniform(*self.strength))
                 for _ in range(r.randint(*self.num_spots))]
        return {"spots": spots}

    def apply(self, img: np.ndarray, spots: list = (), **params) -> np.ndarray:
        yy, xx = np.mgrid[0:img.shape[0], 0:img.shape[1]].astype(np.float32)
        light = np.zeros(img.shape[:2], np.float32)
        for cx, cy, radius, strength in spots:
            d2 = ((xx - cx) ** 2 + (yy - cy) ** 2) / max(radius, 1.0) ** 2
            light = np.maximum(light, strength * np.exp(-d2))
        out = img.astype(np.float32)
        out += (255.0 - out) * light[..., None]
        return np.clip(out, 0, 255).astype(img.dtype)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("num_spots", "radius", "strength")
