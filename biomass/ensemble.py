"""Ensembling of several trained biomass models (inference.ensemble, conf/inference/biomass.yaml).

Ensemble members (e.g. the fold models of mode=cv) are averaged per image over the test-time augmentation views
(biomass/tta.py), either equally or with MC-dropout weights: K stochastic passes of the head alone (its dropout on)
on backbone features computed once per image and view, weight 1 / (u + eps) normalised over the members, with u
- mc_var=absolute: the variance of the predicted total grams (unbiased over the passes);
- mc_var=relative (the CSIRO write-up's repository, src/inference/pipeline.py and configs/ensemble.json):
  var(total) / (mean(total)^2 + eps) + mc_ratio_weight * the mean over green / dead / clover of the variance of
  the (fused) ratio logits, population variances over the passes, u clipped to mc_clip ([0, 1000] there): a member
  predicting a small total is not favoured for its small absolute variance. Per-member predictions can be cached on disk (inference.ensemble.cache_dir).
"""
from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from biomass.tta import NO_VIEWS, ViewTTA
from common.training.checkpoint import atomic_torch_save


def _view_features(model: nn.Module, batch: dict, tta: ViewTTA) -> list:
    """Backbone (+ fusion) features of every TTA view: the backbone runs once per view."""
    return [model.encode({**batch, "image": view}) for view in tta.views(batch, model.backbone.patch_size)]


def _decoded_views(model: nn.Module, feats: list, keys: Sequence[str]) -> dict[str, Tensor]:
    """outputs[key] of ONE decode of each precomputed view's features, averaged over the views."""
    outs = [model.decode(f) for f in feats]
    return {key: torch.stack([o[key].float() for o in outs]).mean(dim=0) for key in keys}


def _decoded_mean(model: nn.Module, feats: list) -> Tensor:
    """pred_g (B, 5) of the head on precomputed view features, averaged over the views."""
    return _decoded_views(model, feats, ["pred_g"])["pred_g"]


def predict_tta(model: nn.Module, batch: dict, hflip: bool, vflip: bool, scales: Sequence[float],
                tiles: dict | None = None) -> Tensor:
    """Mean pred_g (B, 5) of `model` over the TTA views of batch["image"]."""
    return _decoded_mean(model, _view_features(model, batch, ViewTTA(hflip, vflip, scales, tiles)))


def _dropouts(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.head.modules() if isinstance(m, nn.Dropout) and m.p > 0]


@torch.no_grad()
def head_mc_samples(model: nn.Module, feats: list, passes: int, keys: Sequence[str]) -> dict[str, Tensor]:
    """outputs[key] of `passes` runs of the HEAD ONLY (its dropout on) on features computed once, each averaged
    over the views: (passes, B, ...) per key; the backbone is not rerun per pass."""
    dropouts = _dropouts(model)
    if not dropouts:
        raise ValueError("MC-dropout weighting needs dropout in the head (model.head.dropout > 0)")
    for m in dropouts:
        m.train()
    try:
        runs = [_decoded_views(model, feats, keys) for _ in range(passes)]
    finally:
        for m in dropouts:
            m.eval()
    return {key: torch.stack([run[key] for run in runs]) for key in keys}


def head_mc_variance(model: nn.Module, feats: list, passes: int) -> Tensor:
    """Per-image variance (B,) of the predicted total grams over `passes` head-only MC-dropout runs (unbiased)."""
    return head_mc_samples(model, feats, passes, ["pred_g"])["pred_g"][..., -1].var(dim=0, unbiased=True)


def relative_mc_uncertainty(samples: dict[str, Tensor], ratio_weight: float, eps: float,
                            clip: Sequence[float]) -> Tensor:
    """u (B,) = var(total) / (mean(total)^2 + eps) + ratio_weight * mean_c var(ratio logit c), clipped to `clip`
    (population variances over the passes, as the CSIRO repository)."""
    totals = samples["pred_g"][..., -1]
    u = totals.var(dim=0, unbiased=False) / (totals.mean(dim=0).clamp_min(0).pow(2) + eps)
    if ratio_weight > 0:
        u = u + ratio_weight * samples["ratio_logits"].var(dim=0, unbiased=False).mean(dim=-1)
    return u.clamp(float(clip[0]), float(clip[1]))


@torch.no_grad()
def mc_dropout_variance(model: nn.Module, batch: dict, passes: int) -> Tensor:
    """head_mc_variance on the un-augmented image."""
    return head_mc_variance(model.eval(), [model.encode(batch)], passes)


def _digest(*parts) -> str:
    sha = hashlib.sha1()
    for part in parts:
        if isinstance(part, Tensor):
            part = part.detach().cpu().contiguous()
            sha.update(str((tuple(part.shape), str(part.dtype))).encode())
            sha.update(part.view(torch.uint8).numpy().tobytes() if part.numel() else b"")
        else:
            sha.update(json.dumps(part, sort_keys=True, default=str).encode())
    return sha.hexdigest()[:20]


def member_key(model: nn.Module) -> str:
    """The checkpoint a member came from (`checkpoint_id`, set by common.inference.predictor.load_for_inference), else a digest
    of its whole state (models built in code)."""
    checkpoint = getattr(model, "checkpoint_id", None)
    if checkpoint is not None:
        return _digest("checkpoint", checkpoint)
    return _digest(*[f"{k}" for k in model.state_dict()], *model.state_dict().values())


def _cached_prediction(path: Path, items: int, with_variance: bool, device) -> tuple[Tensor, Tensor | None]:
    """A member's cached (pred (B, 5), var (B,) or None), checked: a file of another shape, dtype or content is
    named (inference.ensemble.cache_dir), never used."""
    try:
        cached = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as err:
        raise ValueError(f"prediction cache file {path} is unreadable ({type(err).__name__}: {err}); delete it to "
                         f"recompute") from err
    pred, var = (cached.get("pred"), cached.get("var")) if isinstance(cached, dict) else (None, None)
    fits = isinstance(pred, Tensor) and pred.is_floating_point() and tuple(pred.shape) == (items, 5) and (
        (isinstance(var, Tensor) and var.is_floating_point() and tuple(var.shape) == (items,)) if with_variance
        else var is None)
    if not fits:
        raise ValueError(f"prediction cache file {path} does not hold {{'pred': float ({items}, 5), 'var': "
                         f"{f'float ({items},)' if with_variance else 'None'}}}; delete it to recompute")
    return pred, var


MC_VARS = ("absolute", "relative")


class BiomassEnsemble(nn.Module):
    """forward_views(batch, tta) -> pred_g (B, 5): members' predictions averaged over the TTA views, then per image
    over the members (equal weights, or MC-dropout inverse-variance weights when mc_passes >= 2: the head alone
    rerun on features computed once per image and view), each times the member's fixed weight (`weights`:
    inference.weighting=metric), renormalised per image; plus member_weights (B, M). forward(batch): the image
    alone; ViewTTA(ensemble) averages its views. cache_dir: per-member predictions stored on disk, keyed by the
    member's checkpoint and the input (pixels, ids, TTA and MC settings), so rerunning an ensemble skips known
    members."""

    def __init__(self, members: Sequence[nn.Module], weights: Sequence[float] | None = None, *, mc_passes: int,
                 mc_eps: float, cache_dir: str | Path | None = None, mc_var: str = "absolute",
                 mc_ratio_weight: float = 0.0, mc_clip: Sequence[float] | None = None):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one model")
        if mc_passes == 1:
            raise ValueError("mc_passes must be 0 (equal weights) or >= 2 (a variance needs two passes)")
        if mc_var not in MC_VARS:
            raise ValueError(f"inference.ensemble.mc_var={mc_var!r}: expected one of {MC_VARS}")
        if mc_var == "relative" and (mc_clip is None or len(mc_clip) != 2):
            raise ValueError(f"inference.ensemble.mc_clip={mc_clip}: mc_var=relative needs [low, high]")
        self.members = nn.ModuleList(members)
        self.mc_passes, self.mc_eps = int(mc_passes), float(mc_eps)
        self.mc_var, self.mc_ratio_weight = mc_var, float(mc_ratio_weight)
        self.mc_clip = None if mc_clip is None else [float(c) for c in mc_clip]
        self.backbone = members[0].backbone   # the Task contract's attribute (parameter tags, device moves)
        self.register_buffer("prior", torch.tensor([1.0] * len(members) if weights is None else list(weights)))
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self._keys: dict[int, str] = {}

    def _member(self, index: int, batch: dict, tta: ViewTTA) -> tuple[Tensor, Tensor | None]:
        """(pred_g (B, 5), MC variance (B,) or None) of one member, from the cache when it has them."""
        model = self.members[index].eval()
        path = None
        if self.cache_dir is not None:
            if index not in self._keys:
                self._keys[index] = member_key(model)
            inputs = _digest(batch["image"], list(batch.get("image_id", [])),
                             [*tta.key(), self.mc_passes, self.mc_var, self.mc_ratio_weight, self.mc_clip])
            path = self.cache_dir / self._keys[index] / f"{inputs}.pt"
            if path.is_file():
                return _cached_prediction(path, len(batch["image"]), self.mc_passes >= 2, batch["image"].device)
        feats = _view_features(model, batch, tta)
        pred = _decoded_mean(model, feats)
        var = self._uncertainty(model, feats) if self.mc_passes >= 2 else None
        if path is not None:
            atomic_torch_save({"pred": pred.cpu(), "var": None if var is None else var.cpu()}, path)
        return pred, var

    def _uncertainty(self, model: nn.Module, feats: list) -> Tensor:
        if self.mc_var == "absolute":
            return head_mc_variance(model, feats, self.mc_passes)
        if self.mc_ratio_weight > 0 and model.param.name != "total_ratio":
            raise ValueError(f"inference.ensemble.mc_ratio_weight={self.mc_ratio_weight} needs ratio logits "
                             f"(model.param=total_ratio), got model.param={model.param.name}")
        keys = ["pred_g", "ratio_logits"] if self.mc_ratio_weight > 0 else ["pred_g"]
        samples = head_mc_samples(model, feats, self.mc_passes, keys)
        return relative_mc_uncertainty(samples, self.mc_ratio_weight, self.mc_eps, self.mc_clip)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        return self.forward_views(batch, NO_VIEWS)

    @torch.no_grad()
    def forward_views(self, batch: dict, tta: ViewTTA) -> dict[str, Tensor]:
        results = [self._member(i, batch, tta) for i in range(len(self.members))]
        preds = torch.stack([pred for pred, _ in results], dim=1)                   # (B, M, 5)
        if self.mc_passes >= 2:
            weights = 1.0 / (torch.stack([var for _, var in results], dim=1) + self.mc_eps)
        else:
            weights = preds.new_ones(preds.shape[:2])
        weights = weights * self.prior.to(weights)
        weights = weights / weights.sum(dim=1, keepdim=True)
        return {"pred_g": (weights.unsqueeze(-1) * preds).sum(dim=1), "member_weights": weights}
