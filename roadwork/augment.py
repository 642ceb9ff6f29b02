"""Image pipelines built from config: per-view training augmentation and the benchmark's transforms.

Pipelines are lists of albumentations transforms written in yaml as `{_target_: albumentations.X, ...}`,
so every probability and strength lives in config.
"""
from __future__ import annotations

import io
from typing import Sequence

import albumentations as A
import numpy as np
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image


def build_pipeline(specs: Sequence) -> A.Compose | None:
    """A list of `_target_` dicts -> A.Compose (None for an empty list)."""
    specs = OmegaConf.to_container(specs, resolve=True) if OmegaConf.is_config(specs) else list(specs or [])
    if not specs:
        return None
    return A.Compose([instantiate(spec, _convert_="all") for spec in specs])


def augment_views(views: list[np.ndarray], pipeline: A.Compose | None) -> list[np.ndarray]:
    """Apply the pipeline to each view independently (a fresh random draw per view)."""
    if pipeline is None:
        return views
    return [pipeline(image=v)["image"] for v in views]


def augment_views_and_masks(views: list[np.ndarray], masks: list[np.ndarray],
                            pipeline: A.Compose | None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """As augment_views, each view's (S, S) object mask transformed with the same draw: geometric
    transforms move it (nearest-neighbour resampling), pixel-level ones leave it unchanged."""
    if pipeline is None:
        return views, masks
    pairs = [pipeline(image=v, mask=m) for v, m in zip(views, masks, strict=True)]
    return [p["image"] for p in pairs], [p["mask"] for p in pairs]


def jpeg_roundtrip(image: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB"))


class BenchmarkTransform:
    """One of the benchmark's transform levels, then a JPEG round trip at `quality`.

    Each level pipeline must end at size x size (level 0: centre square resized; levels 1-3: rotation,
    square random resized crop, flips, then distortions), as configured in `data.benchmark.levels`.
    """

    def __init__(self, levels: Sequence, quality: int):
        self.levels = [build_pipeline(specs) for specs in levels]
        if any(p is None for p in self.levels):
            raise ValueError("data.benchmark.levels: every level needs at least one transform")
        self.quality = quality

    def set_random_seed(self, seed: int) -> None:
        """Seed every level's draws (common.data.reseed_augmentations: per worker and epoch)."""
        for i, pipeline in enumerate(self.levels):
            pipeline.set_random_seed(seed + i)

    def __call__(self, image: np.ndarray, level: int, seed: int | None = None) -> np.ndarray:
        """`seed` fixes the level's random draws (reproducible evaluation); None draws fresh ones."""
        pipeline = self.levels[level]
        if seed is not None:
            pipeline.set_random_seed(seed)
        return jpeg_roundtrip(pipeline(image=image)["image"], self.quality)
