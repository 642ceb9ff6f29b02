"""Sclera metrics as the SSBC benchmark computes them: per image, then the mean over images of each
set and over all images pooled.

The prediction of an image is first turned into the two files a submission holds (`benchmark_maps`):
the probability resized to the image's size and stored as round(p * 255) ("Predictions") and the
binary mask p >= threshold stored as 0/255 ("Binarised"). F1, IoU, precision and recall compare the
binarised mask with the ground truth; MAE and the best-threshold F1 (over the precision-recall curve
of the 256 grey levels) use the stored probability map. An image whose truth and prediction are
both empty scores 1 (sklearn's zero_division=1.0).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from common.metric import Metric

NAMES = ("f1", "iou", "precision", "recall", "mae", "f1_best")


def benchmark_maps(prob: Tensor, size: tuple[int, int], threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) probability -> (Predictions uint8 = round(p*255), Binarised uint8 in {0, 255}) at `size`."""
    prob = prob.float()
    if tuple(prob.shape) != tuple(size):
        prob = F.interpolate(prob[None, None], size=tuple(size), mode="bilinear", align_corners=False)[0, 0]
    prob = prob.clamp(0, 1).cpu().numpy()
    pred = np.rint(prob * 255).astype(np.uint8)
    binary = np.where(prob >= threshold, 255, 0).astype(np.uint8)
    return pred, binary


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else 1.0


def best_threshold_f1(pred: np.ndarray, truth: np.ndarray) -> float:
    """max over thresholds t of F1(pred >= t) for a uint8 map; 1.0 when the truth is empty."""
    truth = truth.astype(bool).ravel()
    pred = pred.ravel()
    positives = int(truth.sum())
    if positives == 0:
        return 1.0
    tp = np.cumsum(np.bincount(pred[truth], minlength=256)[::-1])          # tp at thresholds 255..0
    fp = np.cumsum(np.bincount(pred[~truth], minlength=256)[::-1])
    f1 = 2 * tp / (2 * tp + fp + (positives - tp))
    return float(f1.max())


def image_scores(pred: np.ndarray, binary: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Scores of one image: `pred` uint8 probability map, `binary` uint8 0/255, `truth` 0/1."""
    t = truth.astype(bool)
    b = binary > 0
    tp, fp, fn = int((b & t).sum()), int((b & ~t).sum()), int((~b & t).sum())
    return {"f1": _ratio(2 * tp, 2 * tp + fp + fn), "iou": _ratio(tp, tp + fp + fn),
            "precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn),
            "mae": float(np.abs(pred.astype(np.float64) / 255.0 - t).mean()),
            "f1_best": best_threshold_f1(pred, t)}


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

    With "mask_full" (eval stage) the scores are taken at each image's own size, exactly as the
    benchmark reads the submission; otherwise at the model's resolution.
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
