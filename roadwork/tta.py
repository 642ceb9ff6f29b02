"""Test-time augmentation filtered by feature distance (inference/tta=roadwork, for eval and predict).

Every variant (a mirror / centre zoom / brightness change of all the views of a batch, done on tensors so it
runs on the model's device) goes through the wrapped model. Per sample, the variants whose fused feature lies
closest to the training feature distribution stored in the checkpoint (roadwork.feature_stats) are kept and
their probabilities averaged with weights softmax(-distance / temperature): augmented copies that push an
image away from what the model was trained on are trusted less, or dropped.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from roadwork.feature_stats import FeatureStats

FIELDS = ("hflip", "zoom", "brightness")
PROB_EPS = 1e-6  # logits = [0, logit(prob)] with prob clamped to [eps, 1 - eps] so they stay finite


@dataclass(frozen=True)
class Variant:
    hflip: bool         # mirror every view left-right (each view on its own: tiles keep their places)
    zoom: float         # >= 1: centre crop of 1/zoom of the side, resized back to the view size
    brightness: float   # pixel factor, the result clamped to [0, 1]

    def apply(self, views: Tensor) -> Tensor:
        """(..., 3, S, S) in [0, 1] -> the same shape: mirror, then centre zoom, then brightness."""
        out = views.flip(-1) if self.hflip else views
        if self.zoom != 1.0:
            out = centre_zoom(out, self.zoom)
        if self.brightness != 1.0:
            out = (out * self.brightness).clamp(0.0, 1.0)
        return out


def centre_zoom(images: Tensor, zoom: float) -> Tensor:
    """(..., C, H, W): the centred (H/zoom, W/zoom) crop resized back to (H, W), bilinear with antialiasing."""
    h, w = images.shape[-2:]
    ch, cw = max(1, round(h / zoom)), max(1, round(w / zoom))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = images[..., top:top + ch, left:left + cw]
    flat = crop.reshape(-1, *crop.shape[-3:])
    resized = F.interpolate(flat, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return resized.reshape(images.shape)


def _number(value, where: str, low: float, low_inclusive: bool) -> float:
    bound = f">= {low}" if low_inclusive else f"> {low}"
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
        value >= low if low_inclusive else value > low)
    if not ok:
        raise ValueError(f"{where}={value!r}: expected a finite number {bound}")
    return float(value)


def parse_variant(raw, index: int) -> Variant:
    where = f"inference.tta.variants[{index}]"
    if not isinstance(raw, Mapping) or set(raw) != set(FIELDS):
        keys = sorted(raw) if isinstance(raw, Mapping) else raw
        raise ValueError(f"{where}: got {keys!r}, expected a mapping with exactly the keys {list(FIELDS)}")
    if not isinstance(raw["hflip"], bool):
        raise ValueError(f"{where}.hflip={raw['hflip']!r}: expected true or false")
    return Variant(hflip=raw["hflip"], zoom=_number(raw["zoom"], f"{where}.zoom", 1.0, True),
                   brightness=_number(raw["brightness"], f"{where}.brightness", 0.0, False))


def parse_variants(raw) -> list[Variant]:
    if isinstance(raw, (str, Mapping)) or not isinstance(raw, Sequence) or not raw:
        raise ValueError(f"inference.tta.variants={raw!r}: expected a non-empty list of {{hflip, zoom, brightness}}")
    return [parse_variant(item, i) for i, item in enumerate(raw)]


def kept_softmax(distance: Tensor, keep: int, temperature: float) -> Tensor:
    """(B, T) distances -> (B, T) weights: softmax(-distance / temperature) over each row's `keep` smallest
    distances, 0 for the others."""
    kept = distance.topk(keep, dim=1, largest=False).indices
    mask = torch.zeros_like(distance, dtype=torch.bool).scatter_(1, kept, True)
    return (-distance / temperature).masked_fill(~mask, float("-inf")).softmax(1)


class FilteredTTA(nn.Module):
    """Wraps a model returning `prob` (B,) and `features` (B, D): a RoadworkModel or an ensemble of them.

    stats: the training feature distribution the distances are measured to. One model: its `feature_stats`.
    An ensemble: the first member's (feature_stats_of). StackedEnsemble passes the first member's `features`
    on, so that is exact; WeightedEnsemble's `features` are the members' weighted mean, so the distance is
    only an approximation when the members' feature spaces differ (separately trained fold models).
    The wrapped model applies its own `logit_shift` calibration in eval mode, so its `prob` is used as is.
    stats=None: feature_stats_of(model) (conf/inference/tta/roadwork.yaml builds FilteredTTA(model) so).
    An ensemble whose members read different inputs is refused: the variants augment only the first member's views.
    """

    def __init__(self, model: nn.Module, variants: Sequence[Mapping], keep_fraction: float, temperature: float,
                 stats: FeatureStats | None = None):
        super().__init__()
        specs = getattr(model, "member_specs", None)
        if specs and any(spec != specs[0] for spec in specs):
            raise ValueError("inference.tta with ensemble members of different inputs: the test-time variants "
                             "augment only the first member's views; set inference.tta=null")
        stats = feature_stats_of(model) if stats is None else stats
        if not isinstance(stats, FeatureStats):
            raise TypeError(f"FilteredTTA stats: expected a roadwork.feature_stats.FeatureStats, got {type(stats)}")
        if not (isinstance(keep_fraction, (int, float)) and 0.0 < keep_fraction <= 1.0):
            raise ValueError(f"inference.tta.keep_fraction={keep_fraction!r}: expected a number in (0, 1]")
        self.temperature = _number(temperature, "inference.tta.temperature", 0.0, False)
        self.model, self.stats = model, stats
        self.member_specs = specs           # the eval / predict datasets feed the wrapped ensemble's members
        self.variants = parse_variants(variants)
        # round() first: 0.1 * 30 is 3.0000000000000004 in floating point
        self.keep = math.ceil(round(keep_fraction * len(self.variants), 9))

    def forward(self, batch: dict) -> dict[str, Tensor]:
        if "cache_key" in batch:
            raise ValueError("inference.tta: the batch carries cached backbone features (cache_key), which cannot be "
                             "augmented; set data.cache_features=false for eval / predict with tta")
        if self.training:
            raise RuntimeError("FilteredTTA is for inference (it would feed augmented features to the training "
                               "feature statistics): call .eval() first")
        outputs = [self.model({**batch, "views": v.apply(batch["views"])}) for v in self.variants]
        probs = torch.stack([out["prob"].float() for out in outputs], 1)         # (B, T)
        features = torch.stack([out["features"].float() for out in outputs], 1)  # (B, T, D)
        distance = self.stats.distance(features)                                 # (B, T)
        weights = kept_softmax(distance, self.keep, self.temperature)
        prob = (weights * probs).sum(1)
        logit = torch.logit(prob, eps=PROB_EPS)
        return {"prob": prob, "logits": torch.stack([torch.zeros_like(logit), logit], 1),
                "features": (weights[..., None] * features).sum(1), "tta_weights": weights,
                "tta_distance": distance}


def feature_stats_of(model: nn.Module) -> FeatureStats:
    """model.feature_stats, or for an ensemble (`members`) its first member's (see FilteredTTA)."""
    first = model
    while hasattr(first, "members"):                 # ensembles of ensembles (stacked fold ensembles)
        first = first.members[0]
    stats = getattr(first, "feature_stats", None)
    if not isinstance(stats, FeatureStats):
        raise ValueError(f"inference.tta needs the model's training feature statistics (feature_stats); "
                         f"{type(first).__name__} has none")
    return stats
