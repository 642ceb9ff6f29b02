"""Per-view training augmentation: `data.augment`, a list of `{_target_: albumentations.X, ...}` nodes built into
one pipeline by common.data.augment.build_augment (so every probability and strength lives in config), applied to each
view on its own. The validator's challenge is roadwork.challenge.
"""
from __future__ import annotations

import albumentations as A
import numpy as np


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
