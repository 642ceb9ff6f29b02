"""Biomass criterion: named, masked loss terms whose sum is the loss (so UW and PCGrad see each term).

Terms (a term with weight 0 is not computed):
- total:    Dry_Total_g in the target space
- ratio:    the (green, dead, clover) fractions of the prediction vs the labels, on images where all
            three components are measured and the total is > 0
- weighted: the five targets in the target space, weighted by the official weights (normalised to 1)
- height, ndvi: auxiliary regressions, standardised with the training split's mean / std unless named in
            aux_raw (then in the table's own units: height in cm, as the CSIRO write-up 2.2.3); state: cross-entropy
            (soft labels when mixed)
Target spaces: "norm_gm2" (per-target standardised g/m2, training-split statistics), "log1p" (log1p
grams), "grams". Kind "tweedie" needs space "grams" (the mean is the predicted grams); kind "zig" (zero-inflated
Gamma NLL, biomass.zig) needs space "grams" and model.param=zig; "log_cosh" works in any space.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from biomass.constants import TARGETS, official_weight_vector
from biomass.labels import labels_of, state_targets
from biomass.zig import masked_zig_loss
from common.training.losses import as_bool_mask, masked_mean, masked_regression_loss
from common.training.mtl import UncertaintyWeighting

SPACES = ("norm_gm2", "log1p", "grams")
GRAM_KINDS = ("tweedie", "zig")     # likelihoods of the grams themselves
TERMS = ("total", "ratio", "weighted", "height", "ndvi", "state")
TOTAL = TARGETS.index("Dry_Total_g")


def _inverse_softplus(x: Tensor) -> Tensor:
    x = x.clamp_min(1e-6)
    return x + torch.log(-torch.expm1(-x))


class BiomassCriterion(nn.Module):
    def __init__(self, stats: dict, space: str, kind: str, delta: float, tweedie_p: float,
                 weights: dict, balancing: str, uw_init_log_var: float, uw_divide: bool, aux_raw: list):
        super().__init__()
        if space not in SPACES:
            raise ValueError(f"loss.space={space!r}: expected one of {SPACES}")
        if kind in GRAM_KINDS and space != "grams":
            raise ValueError(f"loss.kind={kind} needs loss.space=grams (its mean is the predicted grams)")
        unknown = sorted(set(weights) - set(TERMS))
        if unknown:
            raise ValueError(f"loss.weights: unknown term(s) {unknown}; expected a subset of {TERMS}")
        if balancing not in ("fixed", "uw"):
            raise ValueError(f"loss.balancing={balancing!r}: expected 'fixed' or 'uw'")
        if set(aux_raw) - {"height", "ndvi"}:
            raise ValueError(f"loss.aux_raw={list(aux_raw)}: expected a subset of ['height', 'ndvi']")
        self.aux_raw = set(aux_raw)
        self.space, self.kind, self.delta, self.tweedie_p = space, kind, float(delta), float(tweedie_p)
        self.weights = {name: float(w) for name, w in weights.items() if float(w) > 0}
        self.stats = stats
        w = torch.tensor(official_weight_vector())
        self.register_buffer("official", w / w.sum(), persistent=False)
        self.register_buffer("gm2_mean", torch.tensor(stats["gm2_mean"]), persistent=False)
        self.register_buffer("gm2_std", torch.tensor(stats["gm2_std"]), persistent=False)
        self.uw = UncertaintyWeighting(list(self.weights), uw_init_log_var, bool(uw_divide)) \
            if balancing == "uw" else None

    def epoch_log(self) -> dict[str, float]:
        """Logged by the trainer once per epoch: the uncertainty-weighting log-variances and weights."""
        return self.uw.epoch_log() if self.uw is not None else {}

    def to_space(self, grams: Tensor) -> Tensor:
        if self.space == "norm_gm2":
            return (grams / self.stats["quadrat_area"] - self.gm2_mean) / self.gm2_std
        if self.space == "log1p":
            return torch.log1p(grams.clamp_min(0))
        return grams

    def _regression(self, outputs: dict, true_g: Tensor, mask: Tensor) -> Tensor:
        """Per-target loss (5,) in the target space, masked."""
        pred_g = outputs["pred_g"].float()
        if self.kind == "zig":
            if "zig_pi" not in outputs:
                raise ValueError("loss.kind=zig needs the zero-inflated Gamma outputs: set model.param=zig")
            return torch.stack([masked_zig_loss(outputs["zig_pi"][:, j], outputs["zig_mu_g"][:, j],
                                                outputs["zig_shape"][:, j], true_g[:, j], mask[:, j])
                                for j in range(pred_g.shape[1])])
        pred = _inverse_softplus(pred_g) if self.kind == "tweedie" else self.to_space(pred_g)
        true = true_g if self.kind == "tweedie" else self.to_space(torch.nan_to_num(true_g))
        return torch.stack([masked_regression_loss(pred[:, j], true[:, j], mask[:, j], kind=self.kind,
                                                   delta=self.delta, tweedie_p=self.tweedie_p)
                            for j in range(pred.shape[1])])

    def _ratio(self, pred_g: Tensor, true_g: Tensor, mask: Tensor) -> Tensor:
        comp_pred = pred_g[:, :3] / pred_g[:, :3].sum(-1, keepdim=True).clamp_min(1e-6)
        comp_true = torch.nan_to_num(true_g[:, :3])
        total = comp_true.sum(-1, keepdim=True)
        ok = (mask[:, :3].min(dim=-1, keepdim=True).values > 0) & (total > 0)
        return masked_regression_loss(comp_pred, comp_true / total.clamp_min(1e-6), ok.float().expand(-1, 3))

    def _aux(self, name: str, outputs: dict, batch: dict) -> Tensor:
        if name == "state":
            if "state_soft" in batch:
                target, mask = batch["state_soft"], batch["state_mask"]
            else:
                target, mask = state_targets(batch["state"], self.stats["states"], outputs["state_logits"].device)
            ce = -(target * torch.log_softmax(outputs["state_logits"].float(), -1)).sum(-1)
            return masked_mean(ce, as_bool_mask(mask, ce.shape, "state_mask"))
        mean, std = (0.0, 1.0) if name in self.aux_raw else (self.stats[f"{name}_mean"], self.stats[f"{name}_std"])
        target = (torch.nan_to_num(batch[name].float()) - mean) / std
        return masked_regression_loss(outputs[name], target, batch[f"{name}_mask"])

    def forward(self, outputs: dict, batch: dict) -> dict[str, Tensor]:
        batch = labels_of(outputs, batch)
        pred_g, true_g, mask = outputs["pred_g"].float(), batch["targets_g"].float(), batch["target_mask"]
        per_target = self._regression(outputs, true_g, mask) if {"total", "weighted"} & set(self.weights) else None
        losses = {}
        for name in self.weights:
            if name == "total":
                losses[name] = per_target[TOTAL]
            elif name == "weighted":
                losses[name] = (per_target * self.official).sum()
            elif name == "ratio":
                losses[name] = self._ratio(pred_g, true_g, mask)
            else:
                losses[name] = self._aux(name, outputs, batch)
        losses = {name: self.weights[name] * value for name, value in losses.items()}
        return self.uw(losses) if self.uw is not None else losses
