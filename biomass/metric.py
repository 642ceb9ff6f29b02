"""Official CSIRO metric: one globally weighted R2 over all (image, target) rows, on grams.

R2_w = 1 - sum_i w_i (y_i - yhat_i)^2 / sum_i w_i (y_i - ybar_w)^2, ybar_w the weighted mean of y,
each row weighted by its target's official weight. Also per-target R2 and the per-target R2 in
log1p space averaged with the official weights. Only measured (mask 1) rows count.
"""
from __future__ import annotations

import numpy as np

from biomass.constants import OFFICIAL_WEIGHTS, TARGETS, official_weight_vector
from common.metric import Metric


def weighted_r2(y: np.ndarray, yhat: np.ndarray, w: np.ndarray) -> float:
    y, yhat, w = (np.asarray(a, dtype=np.float64).ravel() for a in (y, yhat, w))
    ybar = np.sum(w * y) / np.sum(w)
    den = np.sum(w * (y - ybar) ** 2)
    if den <= 0:
        return float("nan")
    return float(1.0 - np.sum(w * (y - yhat) ** 2) / den)


def biomass_scores(true: np.ndarray, pred: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """true, pred, mask: (N, 5) in TARGETS order (grams)."""
    observed = mask > 0
    w = np.broadcast_to(np.asarray(official_weight_vector()), true.shape)
    out = {"r2_weighted": weighted_r2(true[observed], pred[observed], w[observed])}
    log_r2 = []
    for j, name in enumerate(TARGETS):
        sel = observed[:, j]
        ones = np.ones(sel.sum())
        out[f"r2/{name}"] = weighted_r2(true[sel, j], pred[sel, j], ones)
        log_r2.append(weighted_r2(np.log1p(true[sel, j]), np.log1p(np.clip(pred[sel, j], 0, None)), ones))
    weights = np.array([OFFICIAL_WEIGHTS[t] for t in TARGETS])
    log_r2 = np.array(log_r2)
    ok = ~np.isnan(log_r2)
    out["r2_log1p_weighted"] = float(np.sum(weights[ok] * log_r2[ok]) / np.sum(weights[ok])) if ok.any() \
        else float("nan")
    return out


class BiomassMetric(Metric):
    def update(self, outputs: dict, batch: dict) -> None:
        self.add(pred=outputs["pred_g"], true=batch["targets_g"], mask=batch["target_mask"])

    def compute(self) -> dict[str, float]:
        data = self.gathered()
        return biomass_scores(np.nan_to_num(data["true"]), data["pred"], data["mask"])
