"""submission.csv (docs/FORMATS.md): header sample_id,target; one row per test.csv row, same order,
non-negative grams; written atomically. Scoring a submission against a solution file (demo)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from biomass.constants import ID_SEP, TARGETS
from biomass.metric import biomass_scores
from biomass.table import read_csv_checked
from common.utils.atomic import atomic_path, atomic_write_text


def collect_predictions(results: Iterable[tuple[dict, dict]]) -> dict[str, np.ndarray]:
    """(outputs, batch) pairs -> {image_id: (5,) predicted grams in TARGETS order}."""
    preds: dict[str, np.ndarray] = {}
    for outputs, batch in results:
        values = outputs["pred_g"].float().numpy()
        for image_id, row in zip(batch["image_id"], values):
            preds[str(image_id)] = row
    return preds


def write_submission(test_rows: pd.DataFrame, preds: dict[str, np.ndarray], path: Path) -> Path:
    index = {name: j for j, name in enumerate(TARGETS)}
    missing = sorted(set(test_rows["image_id"]) - set(preds))
    if missing:
        raise ValueError(f"no prediction for {len(missing)} test image(s), e.g. {missing[:3]}")
    values = np.array([preds[i][index[t]] for i, t in zip(test_rows["image_id"], test_rows["target_name"])],
                      dtype=np.float64)
    if not np.isfinite(values).all():
        bad = test_rows["sample_id"].iloc[int(np.flatnonzero(~np.isfinite(values))[0])]
        raise ValueError(f"non-finite prediction for {bad}")
    out = pd.DataFrame({"sample_id": test_rows["sample_id"].to_numpy(), "target": np.clip(values, 0.0, None)})
    with atomic_path(path) as tmp:
        out.to_csv(tmp, index=False, float_format="%.6f")
    return Path(path)


def _wide(df: pd.DataFrame, column: str) -> pd.DataFrame:
    parts = df["sample_id"].str.split(ID_SEP, n=1, regex=False)
    frame = pd.DataFrame({"image_id": parts.str[0], "target_name": parts.str[1], column: df[column]})
    return frame.pivot(index="image_id", columns="target_name", values=column).reindex(columns=list(TARGETS))


def score_submission(submission: Path, solution: Path, out_json: Path | None = None) -> dict[str, float]:
    """Official metrics of a submission.csv against a solution file (sample_id,target)."""
    sub = read_csv_checked(submission, ("sample_id", "target"))
    sol = read_csv_checked(solution, ("sample_id", "target"))
    missing = sorted(set(sol["sample_id"]) - set(sub["sample_id"]))
    if missing:
        raise ValueError(f"{submission}: {len(missing)} sample_id(s) of {solution} missing, e.g. {missing[:3]}")
    true = _wide(sol, "target")
    pred = _wide(sub.rename(columns={"target": "pred"}), "pred").reindex(true.index)
    scores = biomass_scores(np.nan_to_num(true.to_numpy(float)), np.nan_to_num(pred.to_numpy(float)),
                            true.notna().to_numpy(float))
    if out_json is not None:
        atomic_write_text(out_json, json.dumps(scores, indent=2) + "\n")
    return scores
