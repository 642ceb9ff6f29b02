"""predictions.csv: one row per input image, in input order.

Columns: image, probability in [0, 1], prediction (the validator's rounding: np.round, so 0.5 -> 0),
predicted (1, or 0 for an image that data.skip_bad skipped: probability and prediction empty) and
skip_reason (why it was skipped; empty otherwise).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from common.utils.atomic import atomic_path
from roadwork.validator import validator_round

COLUMNS = ["image", "probability", "prediction", "predicted", "skip_reason"]


def _predicted_frame(results: Iterable) -> pd.DataFrame:
    names, probs = [], []
    for outputs, batch in results:
        names.extend(batch["image"])
        probs.append(outputs["prob"].detach().float().cpu().numpy().reshape(-1))
    prob = np.clip(np.concatenate(probs) if probs else np.zeros(0), 0.0, 1.0)
    if not np.isfinite(prob).all():
        raise ValueError(f"non-finite probabilities for {int((~np.isfinite(prob)).sum())} images")
    return pd.DataFrame({"image": names, "probability": prob, "prediction": validator_round(prob),
                         "predicted": 1, "skip_reason": ""})


def write_predictions_csv(results: Iterable, path: Path, inputs: Sequence[str] | None = None,
                          skipped: Sequence[tuple[str, str]] = ()) -> Path:
    """`inputs`: every input image's name in input order (None = the predicted ones, as they come);
    `skipped`: (name, reason) of the images data.skip_bad left out, each written as a not-predicted row."""
    try:
        frame = _predicted_frame(results)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    if skipped:
        missing = {"image": [n for n, _ in skipped], "probability": [np.nan] * len(skipped),
                   "prediction": [-1] * len(skipped), "predicted": [0] * len(skipped),
                   "skip_reason": [r for _, r in skipped]}
        frame = pd.DataFrame({k: list(frame[k]) + missing[k] for k in COLUMNS})
    if inputs is not None:
        position = {name: i for i, name in enumerate(inputs)}
        unknown = [n for n in frame["image"] if n not in position]
        if unknown or len(frame) != len(inputs):
            raise ValueError(f"{path}: {len(frame)} rows for {len(inputs)} inputs (not among the inputs: "
                             f"{unknown[:3]})")
        frame = frame.iloc[np.argsort([position[n] for n in frame["image"]], kind="stable")]
    frame["prediction"] = frame["prediction"].astype("Int64").where(frame["predicted"] == 1)   # empty when skipped
    with atomic_path(path) as tmp:
        frame[COLUMNS].to_csv(tmp, index=False)
    return path
