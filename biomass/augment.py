"""Biomass's own transforms for `data.augment` (built by common.data.augment.build_augment), and the resize before it.

The default list (conf/data/biomass/csiro.yaml) is one common.data.augment.SequentialOrClean: with probability p_clean
the resized image trains as it is, otherwise flips, crop, affine, colour, blur, noise, dropout, timestamp overlay and
light spots run in that order, each with its own probability. The resize is its own step (build_resize), done by the
dataset before the augmentation, so it can cache the resized image (data.image_cache): the transforms get images at
data.image_size, and the crops here take their geometry from the image they get. Both crops keep the image's
aspect ratio by construction (AspectCrop: side in [min_scale, 1]; AspectResizedCrop: area in `area`), so they never
fall back to a fixed centre crop. Artefacts of field photos: burnt-in camera timestamps (TimestampOverlay, here)
and light spots (common.data.augment.GaussianHighlights with relative_to: height, size_is: radius, min_size: 1).
"""
from __future__ import annotations

from typing import Any, Callable

import albumentations as A
import cv2
import numpy as np

from common.data.augment import build_augment


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


class AspectCrop(A.RandomSizedCrop):
    """A random crop with the image's own aspect ratio, its height drawn from [round(min_scale * H), H] pixels
    (at least 1), resized back to the image's size H x W: RandomSizedCrop sized by the image it gets."""

    def __init__(self, min_scale: float = 0.85, p: float = 1.0):
        super().__init__(min_max_height=(1, 1), size=(1, 1), p=p)      # set per image below
        self.min_scale = float(min_scale)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        self.min_max_height, self.size, self.w2h_ratio = (max(1, int(round(self.min_scale * h))), h), (h, w), w / h
        return super().get_params_dependent_on_data(params, data)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("min_scale",)


class AspectResizedCrop(A.RandomResizedCrop):
    """RandomResizedCrop with the image's own aspect ratio: a crop of a share of the image's area drawn from
    `area`, resized back to the image's size."""

    def __init__(self, area: tuple[float, float] = (0.8, 1.0), p: float = 1.0):
        super().__init__(size=(1, 1), scale=tuple(area), ratio=(1.0, 1.0), p=p)   # size, ratio: per image below
        self.area = self.scale

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        self.size, self.ratio = (h, w), (w / h, w / h)
        return super().get_params_dependent_on_data(params, data)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("area",)


def build_resize(image_size) -> A.Resize:
    """The deterministic first step of every pipeline (what data.image_cache stores): to `image_size` [H, W]."""
    return A.Resize(height=int(image_size[0]), width=int(image_size[1]), interpolation=cv2.INTER_AREA)


def build_transform(augment, image_size, train: bool) -> Callable:
    """One item's whole pipeline as one Compose: resize to `image_size` [height, width], then (train) the
    `data.augment` list (the dataset runs the same two steps apart, build_resize then build_augment)."""
    steps = build_augment(augment) if train else None
    return A.Compose([build_resize(image_size), *(steps.transforms if steps is not None else [])])
