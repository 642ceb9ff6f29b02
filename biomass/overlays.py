"""Field-photo artefacts as `data.augment` transforms, drawn as the CSIRO write-up's repository draws them
(src/data/augmentations.py, RandomWatermark and RandomLightSpot in blend mode "composite"; configs/train.yaml
sets the values, conf/experiment/biomass_csiro_vitdet.yaml carries them):

- TextWatermark: a random upper-case / digit string (length in `text_length`) or, with probability
  `timestamp_prob`, a date-time in `timestamp_format` between 2010 and 2030; font size a fraction `font_size` of the
  image's shorter side (at least `min_font_px`), colour one of `colours` jittered by +-`colour_jitter` per channel,
  opacity `alpha` (0-255), a dark drop shadow (opacity `shadow_alpha`, offset `shadow_offset` x font size), in a
  corner drawn from `positions` / `position_probs` at a margin `margin` x the shorter side.
- LightSpot: one disc of radius `radius` x the shorter side at a uniform random pixel, mask value `alpha` (0-1),
  Gaussian-blurred with radius max(1, int(blur_frac x r)) (PIL's GaussianBlur; no blur when blur_frac = 0), and
  the image blended towards `colour` by the mask: out = img (1 - m) + colour m.
"""
from __future__ import annotations

import string
from datetime import datetime, timedelta
from typing import Any, Sequence

import albumentations as A
import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

CORNERS = ("bottom_right", "bottom_left", "top_right", "top_left")
CHARSET = string.ascii_uppercase + string.digits


def _range(values, name: str, cast=float) -> tuple:
    if len(values) != 2 or cast(values[0]) > cast(values[1]):
        raise ValueError(f"{name}={list(values)}: expected [low, high] with low <= high")
    return cast(values[0]), cast(values[1])


class TextWatermark(A.ImageOnlyTransform):
    def __init__(self, timestamp_prob: float, timestamp_format: str, text_length: Sequence[int],
                 font_size: Sequence[float], min_font_px: int, alpha: Sequence[int], colours: Sequence[Sequence[int]],
                 colour_jitter: int, positions: Sequence[str], position_probs: Sequence[float],
                 margin: Sequence[float], shadow_alpha: Sequence[int], shadow_offset: Sequence[float], p: float = 0.3):
        super().__init__(p=p)
        unknown = sorted(set(positions) - set(CORNERS))
        if unknown or len(position_probs) != len(positions):
            raise ValueError(f"TextWatermark: positions {list(positions)} must be among {CORNERS}, one probability each "
                             f"(position_probs {list(position_probs)})")
        self.timestamp_prob, self.timestamp_format = float(timestamp_prob), str(timestamp_format)
        self.text_length = _range(text_length, "TextWatermark.text_length", int)
        self.font_size, self.min_font_px = _range(font_size, "TextWatermark.font_size"), int(min_font_px)
        self.alpha = _range(alpha, "TextWatermark.alpha", int)
        self.colours, self.colour_jitter = [tuple(int(c) for c in colour) for colour in colours], int(colour_jitter)
        self.positions, self.position_probs = list(positions), [float(q) for q in position_probs]
        self.margin = _range(margin, "TextWatermark.margin")
        self.shadow_alpha = _range(shadow_alpha, "TextWatermark.shadow_alpha", int)
        self.shadow_offset = _range(shadow_offset, "TextWatermark.shadow_offset")

    def _text(self, r) -> str:
        if r.random() < self.timestamp_prob:
            when = datetime(2010, 1, 1) + timedelta(seconds=r.randint(0, 20 * 365 * 24 * 3600))
            return when.strftime(self.timestamp_format)
        return "".join(r.choices(CHARSET, k=r.randint(*self.text_length)))

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        r = self.py_random
        text = self._text(r)
        size = max(self.min_font_px, int(min(h, w) * r.uniform(*self.font_size)))
        colour = tuple(min(255, max(0, c + r.randint(-self.colour_jitter, self.colour_jitter)))
                       for c in self.colours[r.randint(0, len(self.colours) - 1)])
        return {"text": text, "size": size, "colour": colour, "alpha": r.randint(*self.alpha),
                "corner": r.choices(self.positions, weights=self.position_probs, k=1)[0],
                "margin": int(round(min(h, w) * r.uniform(*self.margin))),
                "shadow": (max(1, int(round(size * r.uniform(*self.shadow_offset)))), r.randint(*self.shadow_alpha))}

    def apply(self, img: np.ndarray, text: str = "", size: int = 12, colour: tuple = (255, 255, 255),
              alpha: int = 255, corner: str = "bottom_right", margin: int = 0, shadow: tuple = (1, 255),
              **params) -> np.ndarray:
        h, w = img.shape[:2]
        font = ImageFont.load_default(size=size)
        overlay = Image.new("RGBA", (w, h), (0, 0, 0, 0))
        draw = ImageDraw.Draw(overlay)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        x0 = margin if corner.endswith("left") else max(0, w - (right - left) - margin)
        y0 = margin if corner.startswith("top") else max(0, h - (bottom - top) - margin)
        x, y = x0 - left, y0 - top
        offset, shadow_alpha = shadow
        draw.text((x + offset, y + offset), text, font=font, fill=(0, 0, 0, shadow_alpha))
        draw.text((x, y), text, font=font, fill=(*colour, alpha))
        out = Image.alpha_composite(Image.fromarray(img).convert("RGBA"), overlay)
        return np.asarray(out.convert("RGB"))

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("timestamp_prob", "timestamp_format", "text_length", "font_size", "min_font_px", "alpha", "colours",
                "colour_jitter", "positions", "position_probs", "margin", "shadow_alpha", "shadow_offset")


class LightSpot(A.ImageOnlyTransform):
    def __init__(self, radius: Sequence[float], alpha: Sequence[float], colour: Sequence[int], blur_frac: float,
                 p: float = 0.3):
        super().__init__(p=p)
        self.radius, self.alpha = _range(radius, "LightSpot.radius"), _range(alpha, "LightSpot.alpha")
        self.colour, self.blur_frac = tuple(int(c) for c in colour), float(blur_frac)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        r = self.py_random
        return {"r": int(min(h, w) * r.uniform(*self.radius)), "cx": r.randint(0, w - 1), "cy": r.randint(0, h - 1),
                "mask_value": int(255 * r.uniform(*self.alpha))}

    def mask(self, h: int, w: int, r: int, cx: int, cy: int, mask_value: int) -> np.ndarray:
        """(h, w) blend weights in [0, 1]."""
        mask = Image.new("L", (w, h), 0)
        ImageDraw.Draw(mask).ellipse([cx - r, cy - r, cx + r, cy + r], fill=mask_value)
        if r > 0 and self.blur_frac > 0:
            mask = mask.filter(ImageFilter.GaussianBlur(radius=max(1, int(r * self.blur_frac))))
        return np.asarray(mask, dtype=np.float32) / 255.0

    def apply(self, img: np.ndarray, r: int = 0, cx: int = 0, cy: int = 0, mask_value: int = 0,
              **params) -> np.ndarray:
        m = self.mask(img.shape[0], img.shape[1], r, cx, cy, mask_value)[..., None]
        out = img.astype(np.float32) * (1.0 - m) + np.asarray(self.colour, np.float32) * m
        return np.clip(np.round(out), 0, 255).astype(img.dtype)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("radius", "alpha", "colour", "blur_frac")
