"""Image pipelines built from config: per-view training augmentation (the validator's challenge: roadwork.challenge).

Pipelines are lists of albumentations transforms written in yaml as `{_target_: albumentations.X, ...}`,
so every probability and strength lives in config.
"""
from __future__ import annotations

from typing import Sequence

import albumentations as A
import numpy as np
from hydra.utils import instantiate
from omegaconf import OmegaConf


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
