"""Roadwork metrics: MCC (primary), accuracy, F1, ROC AUC at 0.5 and at the MCC-best threshold,
optional breakdown by weather / daytime / scene / GPS region, and the benchmark reward."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef, roc_auc_score, roc_curve

from common.metric import Metric
from roadwork.regions import nearest_region


def mcc_from_counts(tp, fp, tn, fn) -> np.ndarray:
    tp, fp, tn, fn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, tn, fn))
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return np.where(denom > 0, (tp * tn - fp * fn) / np.where(denom > 0, denom, 1.0), 0.0)


def best_threshold(label: np.ndarray, prob: np.ndarray) -> tuple[float, float]:
    """(threshold, MCC) maximising MCC of `prob >= threshold` over every distinct threshold."""
    fpr, tpr, thresholds = roc_curve(label, prob)
    pos, neg = label.sum(), (1 - label).sum()
    tp, fp = tpr * pos, fpr * neg
    mcc = mcc_from_counts(tp, fp, neg - fp, pos - tp)
    finite = np.isfinite(thresholds)
    i = int(np.argmax(np.where(finite, mcc, -np.inf)))
    return float(min(thresholds[i], 1.0)), float(mcc[i])


def scores_at(label: np.ndarray, prob: np.ndarray, threshold: float) -> dict[str, float]:
    pred = (prob >= threshold).astype(int)
    return {"mcc": float(matthews_corrcoef(label, pred)), "accuracy": float(accuracy_score(label, pred)),
            "f1": float(f1_score(label, pred, zero_division=0))}


def classification_scores(label: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    out = scores_at(label, prob, 0.5)
    both = 0 < label.sum() < len(label)
    out["auc"] = float(roc_auc_score(label, prob)) if both else float("nan")
    if both:
        threshold, _ = best_threshold(label, prob)
        out.update({f"{k}_best": v for k, v in scores_at(label, prob, threshold).items()})
        out["threshold_best"] = threshold
    return out


def breakdown_rows(metrics: dict[str, float]) -> list[list]:
    """[field, value, n, mcc, accuracy] per group, from keys "[val/]<field>/<value>/<stat>" of compute()."""
    groups: dict[tuple[str, str], dict[str, float]] = {}
    for key, number in metrics.items():
        parts = key.split("/")
        parts = parts[1:] if parts[0] in ("val", "eval") else parts
        if len(parts) == 3 and parts[2] in ("n", "mcc", "accuracy"):
            groups.setdefault((parts[0], parts[1]), {})[parts[2]] = number
    return [[field, value, int(g.get("n", 0)), g.get("mcc"), g.get("accuracy")]
            for (field, value), g in sorted(groups.items())]


def benchmark_reward(mcc: float, accuracy: float) -> float:
    """The live benchmark's score: (0.5 max(MCC, 0) + 0.5 accuracy) ** 3."""
    return float((0.5 * max(mcc, 0.0) + 0.5 * accuracy) ** 3)


class RoadworkMetric(Metric):
    def __init__(self, breakdown: bool, vocabularies: dict, regions: dict, min_group_size: int,
                 benchmark: bool = False):
        super().__init__()
        self.breakdown = breakdown
        self.vocabularies = {k: list(v) for k, v in vocabularies.items()}
        self.regions = {k: tuple(v) for k, v in regions.items()}
        self.min_group_size = min_group_size
        self.benchmark = benchmark

    def update(self, outputs: dict, batch: dict) -> None:
        arrays = {"prob": outputs["prob"], "label": batch["label"]}
        if self.breakdown:
            arrays.update({k: batch[k] for k in self.vocabularies if k in batch})
            arrays.update(gps=batch["gps"], gps_known=batch["gps_known"])
        self.add(**arrays)

    def _groups(self, data: dict) -> dict[str, np.ndarray]:
        groups = {}
        for field, vocab in self.vocabularies.items():
            if field in data:
                names = ["unknown"] + vocab
                groups[field] = np.array([names[int(i)] for i in data[field]])
        if self.regions:
            groups["region"] = nearest_region(data["gps"], data["gps_known"] > 0.5, self.regions)
        return groups

    def _breakdown(self, data: dict, label: np.ndarray, prob: np.ndarray) -> dict[str, float]:
        out = {}
        for field, values in self._groups(data).items():
            for value in np.unique(values):
                sel = values == value
                if sel.sum() >= self.min_group_size:
                    scores = scores_at(label[sel], prob[sel], 0.5)
                    out[f"{field}/{value}/mcc"] = scores["mcc"]
                    out[f"{field}/{value}/accuracy"] = scores["accuracy"]
                    out[f"{field}/{value}/n"] = float(sel.sum())
        return out

    def compute(self) -> dict[str, float]:
        data = self.gathered()
        keep = data["label"] >= 0
        data = {k: v[keep] for k, v in data.items()}
        label, prob = data["label"].astype(int), data["prob"].astype(np.float64)
        out = classification_scores(label, prob)
        if self.benchmark:
            out["reward"] = benchmark_reward(out["mcc"], out["accuracy"])
        if self.breakdown:
            out.update(self._breakdown(data, label, prob))
        return out
