"""Sclera metrics as the SSBC 2025 evaluator (evaluate_predictions.py, current since its commit ee13abc
"Fix F1 score computation", 2025-03-20) computes them, plus the suite's own.

The prediction of an image is first turned into the two files a submission holds (`benchmark_maps`):
the probability resized to the truth's size and stored as round(p * 255) ("Predictions") and the
binary mask p >= threshold stored as 0/255 ("Binarised"). Per image, then the mean over the images of
each set (`<set>/<name>`) and over all images pooled (`<name>`):

SSBC's numbers, under the names SSBC prints (sklearn's definitions, zero_division = 0):
- `Binary/F1`: `f1_score(gt, pred)`, the binary F1 of the sclera label (1) of the binarised mask,
  2 TP / (2 TP + FP + FN); 0 when truth and prediction are both empty.
- `Binary/IoU`: Jaccard index of the sclera label; 0 when truth and prediction are both empty.
- `Probabilistic/{F1,Precision,Recall}`: over the precision-recall curve of the stored probability
  map (one point per grey level present, plus the end point precision 1 / recall 0), of the points
  sharing a recall only the one of highest precision is kept; the first point of highest F1 (in
  increasing threshold order) gives the three values. An empty truth gives recall 1 at every grey
  level (sklearn), hence F1 0.

The suite's own, sclera label only (`sclera_f1`, `sclera_iou`, `sclera_precision`, `sclera_recall`):
an image whose truth and prediction are both empty scores 1; `mae` is the mean absolute error of the
stored probability map (the SSBC evaluator reports no MAE); `macro_f1` is the evaluator's Binary F1 before
ee13abc, (F1_background + F1_sclera) / 2 with a label absent from truth and prediction scoring 0.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from common.metric import Metric

SSBC_NAMES = ("Binary/F1", "Binary/IoU", "Probabilistic/F1", "Probabilistic/Precision", "Probabilistic/Recall")
SUITE_NAMES = ("sclera_f1", "sclera_iou", "sclera_precision", "sclera_recall", "mae", "macro_f1")
NAMES = SSBC_NAMES + SUITE_NAMES


def benchmark_maps(prob: Tensor, size: tuple[int, int], threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) probability -> (Predictions uint8 = round(p*255), Binarised uint8 in {0, 255}) at `size`:
    bilinear resize of the probability first, threshold after."""
    prob = prob.float()
    if tuple(prob.shape) != tuple(size):
        prob = F.interpolate(prob[None, None], size=tuple(size), mode="bilinear", align_corners=False)[0, 0]
    prob = prob.clamp(0, 1).cpu().numpy()
    pred = np.rint(prob * 255).astype(np.uint8)
    binary = np.where(prob >= threshold, 255, 0).astype(np.uint8)
    return pred, binary


def _ratio(num: float, den: float, empty: float) -> float:
    return float(num) / float(den) if den else empty


def probabilistic_scores(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float, float]:
    """SSBC's best-threshold (F1, precision, recall) of a uint8 probability map against a 0/1 truth."""
    truth = truth.astype(bool).ravel()
    levels = pred.ravel()
    pos = np.bincount(levels[truth], minlength=256)
    neg = np.bincount(levels[~truth], minlength=256)
    present = np.flatnonzero(pos + neg)                                   # thresholds, increasing
    tp = np.cumsum(pos[::-1])[::-1][present].astype(np.float64)           # pixels >= each threshold
    fp = np.cumsum(neg[::-1])[::-1][present].astype(np.float64)
    positives = float(truth.sum())
    precision = np.append(tp / (tp + fp), 1.0)
    recall = np.append(tp / positives if positives else np.ones_like(tp), 0.0)
    keep = np.ones(len(recall), bool)
    for value in np.unique(recall):                                       # one point per recall: best precision
        same = np.flatnonzero(recall == value)
        keep[same] = False
        keep[same[np.argmax(precision[same])]] = True
    precision, recall = precision[keep], recall[keep]
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    best = int(np.argmax(f1))
    return float(f1[best]), float(precision[best]), float(recall[best])


def image_scores(pred: np.ndarray, binary: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Scores of one image: `pred` uint8 probability map, `binary` uint8 0/255, `truth` 0/1 (same size)."""
    if pred.shape != truth.shape or binary.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} / {binary.shape} and truth {truth.shape} differ in size")
    t = truth.astype(bool)
    b = binary >= 255                                                     # SSBC reads value // 255
    tp, fp, fn = int((b & t).sum()), int((b & ~t).sum()), int((~b & t).sum())
    tn = t.size - tp - fp - fn
    f1_sclera = _ratio(2 * tp, 2 * tp + fp + fn, 0.0)
    f1_background = _ratio(2 * tn, 2 * tn + fp + fn, 0.0)
    prob_f1, prob_precision, prob_recall = probabilistic_scores(pred, truth)
    return {"Binary/F1": f1_sclera, "Binary/IoU": _ratio(tp, tp + fp + fn, 0.0),
            "Probabilistic/F1": prob_f1, "Probabilistic/Precision": prob_precision,
            "Probabilistic/Recall": prob_recall,
            "sclera_f1": _ratio(2 * tp, 2 * tp + fp + fn, 1.0), "sclera_iou": _ratio(tp, tp + fp + fn, 1.0),
            "sclera_precision": _ratio(tp, tp + fp, 1.0), "sclera_recall": _ratio(tp, tp + fn, 1.0),
            "mae": float(np.abs(pred.astype(np.float64) / 255.0 - t).mean()),
            "macro_f1": (f1_background + f1_sclera) / 2}


def batch_scores(logits: Tensor, batch: dict, threshold: float) -> list[dict[str, float]]:
    """Scores per image of a batch, against "mask_full" (own size) when present, else "mask"."""
    probs = torch.sigmoid(logits.detach().float())[:, 0]
    full = batch.get("mask_full")
    rows = []
    for i in range(probs.shape[0]):
        truth = np.asarray(full[i]) if full is not None else batch["mask"][i, 0].detach().cpu().numpy()
        rows.append(image_scores(*benchmark_maps(probs[i], truth.shape, threshold), truth))
    return rows


class ScleraMetric(Metric):
    """update(outputs with "logits" (B,1,H,W), batch with "mask" or "mask_full" and "set").

    With "mask_full" (eval stage) the scores are taken at the size of each truth mask as read from its
    file, exactly as the benchmark reads the submission; otherwise at the model's resolution.
    """

    def __init__(self, threshold: float):
        super().__init__()
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"metric.threshold={threshold}: expected a probability strictly between 0 and 1")
        self.threshold = float(threshold)

    def update(self, outputs: dict, batch: dict) -> None:
        rows = batch_scores(outputs["logits"], batch, self.threshold)
        self.add(set=list(batch["set"]), **{k: np.asarray([r[k] for r in rows], np.float64) for k in NAMES})

    def compute(self) -> dict[str, float]:
        data = self.gathered()
        if not data:
            return {}
        sets = data["set"].astype(str)
        values = {name: float(data[name].mean()) for name in NAMES}
        for set_name in sorted(set(sets.tolist())):
            chosen = sets == set_name
            values.update({f"{set_name}/{name}": float(data[name][chosen].mean()) for name in NAMES})
        return values
