"""Albumentations pipelines for the whole-image view (height x width kept at the image's 2:1 shape).

Eval: resize to `image_size`. Train: resize, then, with probability 1 - p_clean, the configured
augmentations in a fixed order (each with its own probability), then the `extra` list: any
albumentations transform, as {_target_: albumentations.GridDistortion, p: 0.3, ...} or
{name: GridDistortion, p: 0.3, ...}. Both random crops keep the output's aspect ratio by construction
("crop": side in [min_scale, 1]; "resized_crop": area in `area`, RandomResizedCrop with the image's own
aspect ratio), so they never fall back to a fixed centre crop. The resize is its own step (build_resize) and the random rest
another (build_augment), so datasets can cache the resized image (data.image_cache) and augment it after.
"""
from __future__ import annotations

from typing import Callable

import albumentations as A
import cv2
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf


def _crop(c, h: int, w: int) -> A.BasicTransform:
    return A.RandomSizedCrop(min_max_height=(max(1, int(round(c.min_scale * h))), h), size=(h, w),
                             w2h_ratio=w / h, p=c.p)


def _resized_crop(c, h: int, w: int) -> A.BasicTransform:
    return A.RandomResizedCrop(size=(h, w), scale=tuple(c.area), ratio=(w / h, w / h), p=c.p)


def _affine(c, h: int, w: int) -> A.BasicTransform:
    return A.Affine(scale=tuple(c.scale), translate_percent=(-c.translate, c.translate),
                    rotate=(-c.rotate, c.rotate), shear=(-c.shear, c.shear), border_mode=cv2.BORDER_REFLECT_101,
                    p=c.p)


def _color(c, h: int, w: int) -> A.BasicTransform:
    return A.ColorJitter(brightness=c.brightness, contrast=c.contrast, saturation=c.saturation,
                         hue=c.hue, p=c.p)


def _blur(c, h: int, w: int) -> A.BasicTransform:
    return A.GaussianBlur(blur_limit=tuple(c.kernel), sigma_limit=tuple(c.sigma), p=c.p)


def _noise(c, h: int, w: int) -> A.BasicTransform:
    return A.GaussNoise(std_range=tuple(c.std), p=c.p)


def _dropout(c, h: int, w: int) -> A.BasicTransform:
    return A.CoarseDropout(num_holes_range=tuple(c.holes), hole_height_range=tuple(c.size),
                           hole_width_range=tuple(c.size), fill=0, p=c.p)


def _erasing(c, h: int, w: int) -> A.BasicTransform:
    return A.Erasing(scale=tuple(c.area), ratio=tuple(c.ratio), fill=c.fill, p=c.p)


def _overlay(c, h: int, w: int) -> A.BasicTransform:
    from biomass.overlays import TimestampOverlay
    return TimestampOverlay(font_scale=tuple(c.font_scale), p=c.p)


def _spots(c, h: int, w: int) -> A.BasicTransform:
    from biomass.overlays import LightSpots
    return LightSpots(num_spots=tuple(c.num), radius=tuple(c.radius), strength=tuple(c.strength), p=c.p)


BUILDERS = {"hflip": None, "vflip": None, "crop": _crop, "resized_crop": _resized_crop, "affine": _affine,
            "color": _color, "blur": _blur, "noise": _noise, "dropout": _dropout, "erasing": _erasing,
            "overlay": _overlay, "spots": _spots}


def build_extra(entry, index: int) -> A.BasicTransform:
    """One `data.aug.extra` entry -> an albumentations transform (by _target_ or by name, with its arguments)."""
    spec = OmegaConf.to_container(entry, resolve=True) if isinstance(entry, DictConfig) else dict(entry)
    where = f"data.aug.extra[{index}]"
    if "_target_" in spec:
        if not str(spec["_target_"]).startswith("albumentations."):
            raise ValueError(f"{where}: _target_={spec['_target_']!r} is not an albumentations transform")
        transform = instantiate(spec)
    elif "name" in spec:
        name = spec.pop("name")
        if not isinstance(getattr(A, str(name), None), type):
            raise ValueError(f"{where}: albumentations has no transform named {name!r}")
        transform = getattr(A, name)(**spec)
    else:
        raise ValueError(f"{where}: expected {{_target_: albumentations.<Transform>, ...}} or "
                         f"{{name: <Transform>, ...}}, got keys {sorted(spec)}")
    if not isinstance(transform, A.BasicTransform):
        raise ValueError(f"{where}: {type(transform).__name__} is not an albumentations transform")
    return transform


def build_resize(image_size) -> A.Resize:
    """The deterministic first step of every pipeline (what data.image_cache stores): to `image_size` [H, W]."""
    return A.Resize(height=int(image_size[0]), width=int(image_size[1]), interpolation=cv2.INTER_AREA)


def build_augment(aug: DictConfig | None, image_size) -> A.Compose | None:
    """The random rest of the training pipeline, on images already at `image_size`; None without `aug`."""
    if aug is None:
        return None
    h, w = int(image_size[0]), int(image_size[1])
    unknown = sorted(set(aug.keys()) - set(BUILDERS) - {"p_clean", "extra"})
    if unknown:
        raise ValueError(f"data.aug: unknown augmentation(s) {unknown}; known: {sorted(BUILDERS)}, p_clean "
                         f"and extra (a list of any albumentations transforms)")
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
    steps += [build_extra(entry, i) for i, entry in enumerate(aug.get("extra") or [])]
    return A.Compose([A.Sequential(steps, p=1.0 - float(aug.p_clean))])


def build_transform(aug: DictConfig | None, image_size, train: bool) -> Callable:
    """The whole pipeline: resize, then (train) the augmentations. `image_size` is [height, width];
    `aug` holds p_clean and one entry per transform (see BUILDERS)."""
    augment = build_augment(aug, image_size) if train else None
    return A.Compose([build_resize(image_size), *(augment.transforms if augment is not None else [])])
