"""Grouped (optionally stratified) fold assignment for mode=cv and a task's validation split."""
from __future__ import annotations

import numpy as np
from sklearn.model_selection import GroupKFold


def assign_folds(groups: np.ndarray, n_folds: int, seed: int, splitter=None,
                 labels: np.ndarray | None = None) -> np.ndarray:
    """Fold id per item; a group never spans two folds; fold sizes balanced (sklearn GroupKFold unless the
    task's `splitter` is given, e.g. StratifiedGroupKFold with the items' `labels`)."""
    n_groups = len(np.unique(groups))
    if n_groups < n_folds:
        raise ValueError(f"cv.folds={n_folds} but the data has only {n_groups} groups; lower cv.folds")
    folds = np.empty(len(groups), dtype=int)
    splitter = splitter or GroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    y = np.zeros(len(groups)) if labels is None else np.asarray(labels)
    for fold, (_, val_idx) in enumerate(splitter.split(np.zeros(len(groups)), y, groups=groups)):
        folds[val_idx] = fold
    return folds
