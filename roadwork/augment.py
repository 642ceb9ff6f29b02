"""Per-view training augmentation: `data.augment`, a list of `{_target_: albumentations.X, ...}` nodes built into
one pipeline by common.data.augment.build_augment (so every probability and strength lives in config), applied to each
view on its own. The validator's challenge is roadwork.challenge.
"""
from __future__ import annotations

from typing import Optional

import albumentations as A
import numpy as np


def scale_probabilities(specs: Optional[list], scale: float) -> Optional[list]:
    """data.augment_scale: every top-level transform's probability `p` times `scale`, capped at 1 (the plan's
    ensemble members: x1.5 heavier, x0.75 lighter). Nested transforms (inside OneOf) keep theirs: the
    container's p decides how often the block runs."""
    if scale < 0:
        raise ValueError(f"data.augment_scale={scale}: expected a factor >= 0")
    if not specs or scale == 1.0:
        return specs
    missing = [spec["_target_"] for spec in specs if "p" not in spec]
    if missing:
        raise ValueError(f"data.augment_scale={scale} scales each transform's p, but {missing} in data.augment set "
                         f"none: give them an explicit p")
    return [{**spec, "p": min(1.0, float(spec["p"]) * scale)} for spec in specs]


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
