"""Official CSIRO metric: one globally weighted R2 over all (image, target) rows, on grams.

R2_w = 1 - sum_i w_i (y_i - yhat_i)^2 / sum_i w_i (y_i - ybar_w)^2, ybar_w the weighted mean of y,
each row weighted by its target's official weight. Also per-target R2 on grams and, in log1p space
(the CSIRO write-up's section 2.3):
- r2_log1p_weighted: per-target R2 averaged with the official weights (baseline = the split's mean);
- r2_log1p_global: one globally weighted R2 over all rows, as the official metric but on log1p grams;
- r2_log1p_global_baseline (when the full dataset's mean grams are given): per-target R2 whose SS_tot
  baseline is log1p(mean grams of the full dataset) instead of the split's own mean, averaged with the
  official weights, so folds with different target distributions compare.
Only measured (mask 1) rows count.
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import r2_score

from biomass.constants import OFFICIAL_WEIGHTS, TARGETS, official_weight_vector
from common.metric import Metric


def weighted_r2(y: np.ndarray, yhat: np.ndarray, w: np.ndarray) -> float:
    """sklearn's weighted R2 (the competition's metric over its long rows); nan where it is undefined (fewer
    than two rows, or a constant target), never sklearn's finite stand-in."""
    y, yhat, w = (np.asarray(a, dtype=np.float64).ravel() for a in (y, yhat, w))
    if y.size < 2:
        return float("nan")
    with np.errstate(divide="ignore", invalid="ignore"):     # a constant target divides by zero: nan below
        score = r2_score(y, yhat, sample_weight=w, force_finite=False)
    return float(score) if np.isfinite(score) else float("nan")


def baseline_r2(y: np.ndarray, yhat: np.ndarray, baseline: float) -> float:
    """1 - SS_res / SS_tot with SS_tot taken around a given `baseline` instead of the mean of y."""
    y, yhat = np.asarray(y, dtype=np.float64), np.asarray(yhat, dtype=np.float64)
    den = np.sum((y - baseline) ** 2)
    return float(1.0 - np.sum((y - yhat) ** 2) / den) if den > 0 else float("nan")


def _official_mean(values: list[float]) -> float:
    weights, values = np.array([OFFICIAL_WEIGHTS[t] for t in TARGETS]), np.array(values)
    ok = ~np.isnan(values)
    return float(np.sum(weights[ok] * values[ok]) / np.sum(weights[ok])) if ok.any() else float("nan")


def biomass_scores(true: np.ndarray, pred: np.ndarray, mask: np.ndarray,
                   baseline_g: list[float] | None = None) -> dict[str, float]:
    """true, pred, mask: (N, 5) in TARGETS order (grams); baseline_g: the full dataset's mean grams per target."""
    observed = mask > 0
    w = np.broadcast_to(np.asarray(official_weight_vector()), true.shape)
    log_true, log_pred = np.log1p(np.clip(true, 0, None)), np.log1p(np.clip(pred, 0, None))
    out = {"r2_weighted": weighted_r2(true[observed], pred[observed], w[observed]),
           "r2_log1p_global": weighted_r2(log_true[observed], log_pred[observed], w[observed])}
    log_r2, global_r2 = [], []
    for j, name in enumerate(TARGETS):
        sel = observed[:, j]
        out[f"r2/{name}"] = weighted_r2(true[sel, j], pred[sel, j], np.ones(sel.sum()))
        log_r2.append(weighted_r2(log_true[sel, j], log_pred[sel, j], np.ones(sel.sum())))
        if baseline_g is not None:
            global_r2.append(baseline_r2(log_true[sel, j], log_pred[sel, j], float(np.log1p(baseline_g[j]))))
    out["r2_log1p_weighted"] = _official_mean(log_r2)
    if baseline_g is not None:
        out["r2_log1p_global_baseline"] = _official_mean(global_r2)
    return out


class BiomassMetric(Metric):
    """baseline_g: mean grams per target of the full labelled dataset (the task's stats["baseline_g"]),
    for r2_log1p_global_baseline; None leaves that variant out."""

    def __init__(self, baseline_g: list[float] | None = None):
        super().__init__()
        self.baseline_g = None if baseline_g is None else [float(v) for v in baseline_g]

    def update(self, outputs: dict, batch: dict) -> None:
        self.add(pred=outputs["pred_g"], true=batch["targets_g"], mask=batch["target_mask"])

    def compute(self) -> dict[str, float]:
        data = self.gathered()
        return biomass_scores(np.nan_to_num(data["true"]), data["pred"], data["mask"], self.baseline_g)
