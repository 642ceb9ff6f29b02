"""Albumentations pipelines for the whole-image view (height x width kept at the image's 2:1 shape).

Eval: resize to `image_size`. Train: resize, then, with probability 1 - p_clean, the configured
augmentations in a fixed order (each with its own probability). The random crop keeps the output's
aspect ratio by construction (crop height drawn in [min_scale * H, H], width = height * W / H), so it
never falls back to a fixed centre crop. The resize is its own step (build_resize) and the random rest
another (build_augment), so datasets can cache the resized image (data.image_cache) and augment it after.
"""
from __future__ import annotations

from typing import Callable

import albumentations as A
import cv2
from omegaconf import DictConfig


def _crop(c, h: int, w: int) -> A.BasicTransform:
    return A.RandomSizedCrop(min_max_height=(max(1, int(round(c.min_scale * h))), h), size=(h, w),
                             w2h_ratio=w / h, p=c.p)


def _affine(c, h: int, w: int) -> A.BasicTransform:
    return A.Affine(scale=tuple(c.scale), translate_percent=(-c.translate, c.translate),
                    rotate=(-c.rotate, c.rotate), border_mode=cv2.BORDER_REFLECT_101, p=c.p)


def _color(c, h: int, w: int) -> A.BasicTransform:
    return A.ColorJitter(brightness=c.brightness, contrast=c.contrast, saturation=c.saturation,
                         hue=c.hue, p=c.p)


def _blur(c, h: int, w: int) -> A.BasicTransform:
    return A.GaussianBlur(sigma_limit=tuple(c.sigma), p=c.p)


def _noise(c, h: int, w: int) -> A.BasicTransform:
    return A.GaussNoise(std_range=tuple(c.std), p=c.p)


def _dropout(c, h: int, w: int) -> A.BasicTransform:
    return A.CoarseDropout(num_holes_range=tuple(c.holes), hole_height_range=tuple(c.size),
                           hole_width_range=tuple(c.size), fill=0, p=c.p)


def _overlay(c, h: int, w: int) -> A.BasicTransform:
    from biomass.overlays import TimestampOverlay
    return TimestampOverlay(font_scale=tuple(c.font_scale), p=c.p)


def _spots(c, h: int, w: int) -> A.BasicTransform:
    from biomass.overlays import LightSpots
    return LightSpots(num_spots=tuple(c.num), radius=tuple(c.radius), strength=tuple(c.strength), p=c.p)


BUILDERS = {"hflip": None, "vflip": None, "crop": _crop, "affine": _affine, "color": _color,
            "blur": _blur, "noise": _noise, "dropout": _dropout, "overlay": _overlay, "spots": _spots}


def build_resize(image_size) -> A.Resize:
    """The deterministic first step of every pipeline (what data.image_cache stores): to `image_size` [H, W]."""
    return A.Resize(height=int(image_size[0]), width=int(image_size[1]), interpolation=cv2.INTER_AREA)


def build_augment(aug: DictConfig | None, image_size) -> A.Compose | None:
    """The random rest of the training pipeline, on images already at `image_size`; None without `aug`."""
    if aug is None:
        return None
    h, w = int(image_size[0]), int(image_size[1])
    unknown = sorted(set(aug.keys()) - set(BUILDERS) - {"p_clean"})
    if unknown:
        raise ValueError(f"data.aug: unknown augmentation(s) {unknown}; known: {sorted(BUILDERS)} and p_clean")
    steps = []
    for name, build in BUILDERS.items():
        if name not in aug or aug[name] is None:
            continue
        if name == "hflip":
            steps.append(A.HorizontalFlip(p=float(aug.hflip)))
        elif name == "vflip":
            steps.append(A.VerticalFlip(p=float(aug.vflip)))
        elif float(aug[name].p) > 0:
            steps.append(build(aug[name], h, w))
    return A.Compose([A.Sequential(steps, p=1.0 - float(aug.p_clean))])


def build_transform(aug: DictConfig | None, image_size, train: bool) -> Callable:
    """The whole pipeline: resize, then (train) the augmentations. `image_size` is [height, width];
    `aug` holds p_clean and one entry per transform (see BUILDERS)."""
    augment = build_augment(aug, image_size) if train else None
    return A.Compose([build_resize(image_size), *(augment.transforms if augment is not None else [])])
