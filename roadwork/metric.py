"""Roadwork metrics: MCC (primary), accuracy, F1, ROC AUC with the validator's rounding (p = 0.5 is "no
roadwork", roadwork.validator) and at the MCC-best threshold, optional breakdown by weather / daytime /
scene / GPS cluster of the evaluated set, and with `benchmark` the validator's windowed reward."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef, roc_auc_score, roc_curve

from common.metric import Metric
from roadwork.gps_sampling import region_centres
from roadwork.regions import nearest_region
from roadwork.validator import validator_round, validator_scores


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


def scores_of(label: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    return {"mcc": float(matthews_corrcoef(label, pred)), "accuracy": float(accuracy_score(label, pred)),
            "f1": float(f1_score(label, pred, zero_division=0))}


def scores_at(label: np.ndarray, prob: np.ndarray, threshold: float) -> dict[str, float]:
    return scores_of(label, (prob >= threshold).astype(int))


def classification_scores(label: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    """Headline scores of the validator's rounded predictions; `*_best` at the MCC-best threshold."""
    out = scores_of(label, validator_round(prob))
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
    """One window pair's score: (0.5 max(MCC, 0) + 0.5 accuracy) ** 3 (roadwork.validator for the stream)."""
    return float((0.5 * max(mcc, 0.0) + 0.5 * accuracy) ** 3)


def gps_clusters(gps: np.ndarray, known: np.ndarray, clusters: int, seed: int) -> np.ndarray:
    """Per image, the centre "lat,lon" of its k-means cluster over the evaluated set's known GPS
    (at most `clusters`); "unknown" where the GPS is unknown."""
    if clusters <= 0 or not known.any():
        return np.full(len(gps), "unknown", dtype=object)
    centres = region_centres(np.asarray(gps, np.float64)[known], clusters, seed)
    return nearest_region(gps, known, {f"{lat:.2f},{lon:.2f}": (lat, lon) for lat, lon in centres})


class RoadworkMetric(Metric):
    def __init__(self, breakdown: bool, vocabularies: dict, gps_clusters: int, min_group_size: int,
                 validator: dict, errors: dict, seed: int = 0, benchmark: bool = False):
        super().__init__()
        self.breakdown = breakdown
        self.vocabularies = {k: list(v) for k, v in vocabularies.items()}
        self.gps_clusters = int(gps_clusters)
        self.min_group_size = min_group_size
        self.validator = validator          # the live validator's windows (roadwork.validator)
        self.errors = errors                # error-analysis settings, read by roadwork.errors at eval
        self.seed = seed
        self.benchmark = benchmark
        self.curve: dict[str, np.ndarray] | None = None   # the last compute()'s per-step validator curve

    def tables(self, values: dict[str, float]) -> dict[str, tuple[list[str], list[list]]]:
        """The breakdown by weather / daytime / scene / region (keys <split>/<field>/<value>/<stat>)."""
        rows = breakdown_rows(values)
        return {"breakdown": (["field", "value", "n", "mcc", "accuracy"], rows)} if rows else {}

    def update(self, outputs: dict, batch: dict) -> None:
        arrays = {"prob": outputs["prob"], "label": batch["label"], "image": batch["image"]}
        arrays.update({k: batch[k] for k in self.vocabularies if k in batch})
        if "gps" in batch:
            arrays.update(gps=batch["gps"], gps_known=batch["gps_known"])
        self.add(**arrays)

    def groups(self, data: dict) -> dict[str, np.ndarray]:
        """Group name per image for every breakdown field (weather, daytime, scene, gps_cluster)."""
        groups = {}
        for field, vocab in self.vocabularies.items():
            if field in data:
                names = ["unknown"] + vocab
                groups[field] = np.array([names[int(i)] for i in data[field]])
        if "gps" in data:
            groups["gps_cluster"] = gps_clusters(data["gps"], data["gps_known"] > 0.5, self.gps_clusters,
                                                 self.seed)
        return groups

    def _breakdown(self, data: dict, label: np.ndarray, prob: np.ndarray) -> dict[str, float]:
        out = {}
        for field, values in self.groups(data).items():
            for value in np.unique(values):
                sel = values == value
                if sel.sum() >= self.min_group_size:
                    scores = scores_of(label[sel], validator_round(prob[sel]))
                    out[f"{field}/{value}/mcc"] = scores["mcc"]
                    out[f"{field}/{value}/accuracy"] = scores["accuracy"]
                    out[f"{field}/{value}/n"] = float(sel.sum())
        return out

    def labelled(self) -> dict[str, np.ndarray]:
        """Everything recorded, restricted to labelled images (label >= 0)."""
        data = self.gathered()
        keep = data["label"] >= 0
        return {k: v[keep] for k, v in data.items()}

    def compute(self) -> dict[str, float]:
        data = self.labelled()
        label, prob = data["label"].astype(int), data["prob"].astype(np.float64)
        out = classification_scores(label, prob)
        if self.benchmark:
            summary, self.curve = validator_scores(label, prob, self.validator)
            out.update(summary)
        if self.breakdown:
            out.update(self._breakdown(data, label, prob))
        return out
