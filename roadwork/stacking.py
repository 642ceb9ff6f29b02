"""Stacking for roadwork: a logistic-regression meta-model on the logits of the members' probabilities.

Fit (sklearn) on the mode=cv out-of-fold probabilities of each member (one member per cv run directory,
rows joined on the image name), applied with torch at predict time on the members' `prob` outputs:
p = sigmoid(w . logit(p_members) + b).
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn

from common.inference.ensemble import align_oof
from roadwork.ensemble import member_batch

log = logging.getLogger(__name__)


def clipped_logit(prob: np.ndarray, eps: float) -> np.ndarray:
    """torch.logit with probabilities clamped to [eps, 1 - eps], as StackedEnsemble applies it."""
    return torch.logit(torch.as_tensor(prob, dtype=torch.float64), eps=eps).numpy()


def fit_meta_model(member_probs: np.ndarray, labels: np.ndarray, c: float, eps: float) -> LogisticRegression:
    """LogisticRegression(C=c) on logit(member_probs) (N, members) -> labels (N,) in {0, 1}."""
    if not np.isfinite(member_probs).all() or (member_probs < 0).any() or (member_probs > 1).any():
        raise ValueError("out-of-fold probabilities must be finite and in [0, 1]")
    if set(np.unique(labels)) != {0, 1}:
        raise ValueError(f"stacking needs both labels 0 and 1 in the out-of-fold files, got {sorted(set(labels))}")
    return LogisticRegression(C=c).fit(clipped_logit(member_probs, eps), labels.astype(int))


class StackedEnsemble(nn.Module):
    """forward(batch) -> (each member on its own inputs, roadwork.ensemble.member_batch) the first member's
    outputs with prob = sigmoid(w . logit(p_members) + b) and
    logits (B, 2) = [0, logit prob] (the same convention as the roadwork model's softmax)."""

    def __init__(self, members: Sequence[nn.Module], coef: Sequence[float], intercept: float, eps: float):
        super().__init__()
        if len(coef) != len(members):
            raise ValueError(f"{len(coef)} meta-model coefficients for {len(members)} members")
        self.members = nn.ModuleList(members)
        self.member_specs = [getattr(m, "input_spec", None) for m in members]   # each member's own inputs
        self.eps = float(eps)
        self.register_buffer("coef", torch.tensor([float(w) for w in coef], dtype=torch.float32))
        self.register_buffer("intercept", torch.tensor(float(intercept), dtype=torch.float32))

    def forward(self, batch: dict) -> dict:
        outputs = [member(member_batch(batch, k)) for k, member in enumerate(self.members)]
        probs = torch.stack([out["prob"].float() for out in outputs], dim=1)       # (B, members)
        z = torch.logit(probs, eps=self.eps) @ self.coef + self.intercept
        merged = dict(outputs[0])
        merged["prob"] = torch.sigmoid(z)
        merged["logits"] = torch.stack([torch.zeros_like(z), z], dim=-1)
        return merged

    def summary(self) -> dict:
        return {"coefficients": self.coef.tolist(), "intercept": float(self.intercept)}


def stack_members(members: Sequence[nn.Module], oof_frames: dict[str, pd.DataFrame], c: float,
                  eps: float) -> StackedEnsemble:
    """Fit the meta-model on the members' oof.csv (image, label, probability) and wrap the members
    (roadwork's inference.stack: c, eps from the config; members, oof_frames from common.inference.predictor)."""
    if len(oof_frames) != len(members):
        raise ValueError(f"{len(oof_frames)} out-of-fold files for {len(members)} members")
    _, probs, labels = align_oof(oof_frames, "image", "probability", "label")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"{next(iter(oof_frames))}: label {labels[~np.isin(labels, (0, 1))][0]} is not 0 or 1; "
                         f"expected the oof.csv of a roadwork mode=cv run")
    meta = fit_meta_model(probs, labels, c, eps)
    stacked = StackedEnsemble(members, meta.coef_[0].tolist(), float(meta.intercept_[0]), eps)
    terms = " ".join(f"{w:+.4f}*logit(p[{source}])" for w, source in zip(meta.coef_[0], oof_frames))
    log.info(f"[stack] meta-model on {len(labels)} out-of-fold rows: p = sigmoid({meta.intercept_[0]:+.4f} {terms})")
    return stacked
