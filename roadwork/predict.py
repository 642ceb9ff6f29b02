"""predictions.csv: image, probability in [0, 1], prediction (probability rounded at 0.5, as scored)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from common.atomic import atomic_path

THRESHOLD = 0.5  # the benchmark rounds the probability at 0.5 (FORMATS.md)


def write_predictions_csv(results: Iterable, path: Path) -> Path:
    names, probs = [], []
    for outputs, batch in results:
        names.extend(batch["image"])
        probs.append(outputs["prob"].detach().float().cpu().numpy().reshape(-1))
    prob = np.clip(np.concatenate(probs) if probs else np.zeros(0), 0.0, 1.0)
    if not np.isfinite(prob).all():
        raise ValueError(f"{path}: non-finite probabilities for {int((~np.isfinite(prob)).sum())} images")
    frame = pd.DataFrame({"image": names, "probability": prob, "prediction": (prob >= THRESHOLD).astype(int)})
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return path
