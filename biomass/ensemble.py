"""Ensembling of several trained biomass models (inference.ensemble, conf/inference/biomass.yaml).

Ensemble members (e.g. the fold models of mode=cv) are averaged per image over the test-time augmentation views
(biomass/tta.py), either equally or with MC-dropout weights: K stochastic passes of the head alone (its dropout on)
on backbone features computed once per image and view, weight 1 / (variance of the predicted total + eps),
normalised over the members. Per-member predictions can be cached on disk (inference.ensemble.cache_dir).
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
    return [model.encode({**batch, "image": view}) for view in tta.views(batch["image"], model.backbone.patch_size)]


def _decoded_mean(model: nn.Module, feats: list) -> Tensor:
    """pred_g (B, 5) of the head on precomputed view features, averaged over the views."""
    return torch.stack([model.decode(f)["pred_g"].float() for f in feats]).mean(dim=0)


def predict_tta(model: nn.Module, batch: dict, hflip: bool, vflip: bool, scales: Sequence[float],
                tiles: float = 0.0) -> Tensor:
    """Mean pred_g (B, 5) of `model` over the TTA views of batch["image"]."""
    return _decoded_mean(model, _view_features(model, batch, ViewTTA(hflip, vflip, scales, tiles)))


def _dropouts(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.head.modules() if isinstance(m, nn.Dropout) and m.p > 0]


@torch.no_grad()
def head_mc_variance(model: nn.Module, feats: list, passes: int) -> Tensor:
    """Per-image variance (B,) of the predicted total grams over `passes` runs of the HEAD ONLY (its dropout
    on) on features computed once: the backbone is not rerun per pass."""
    dropouts = _dropouts(model)
    if not dropouts:
        raise ValueError("MC-dropout weighting needs dropout in the head (model.head.dropout > 0)")
    for m in dropouts:
        m.train()
    try:
        totals = torch.stack([_decoded_mean(model, feats)[:, -1] for _ in range(passes)])
    finally:
        for m in dropouts:
            m.eval()
    return totals.var(dim=0, unbiased=True)


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


class BiomassEnsemble(nn.Module):
    """forward_views(batch, tta) -> pred_g (B, 5): members' predictions averaged over the TTA views, then per image
    over the members (equal weights, or MC-dropout inverse-variance weights when mc_passes >= 2: the head alone
    rerun on features computed once per image and view), each times the member's fixed weight (`weights`:
    inference.weighting=metric), renormalised per image; plus member_weights (B, M). forward(batch): the image
    alone; ViewTTA(ensemble) averages its views. cache_dir: per-member predictions stored on disk, keyed by the
    member's checkpoint and the input (pixels, ids, TTA and MC settings), so rerunning an ensemble skips known
    members."""

    def __init__(self, members: Sequence[nn.Module], weights: Sequence[float] | None = None, *, mc_passes: int,
                 mc_eps: float, cache_dir: str | Path | None = None):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one model")
        if mc_passes == 1:
            raise ValueError("mc_passes must be 0 (equal weights) or >= 2 (a variance needs two passes)")
        self.members = nn.ModuleList(members)
        self.mc_passes, self.mc_eps = int(mc_passes), float(mc_eps)
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
            inputs = _digest(batch["image"], list(batch.get("image_id", [])), [*tta.key(), self.mc_passes])
            path = self.cache_dir / self._keys[index] / f"{inputs}.pt"
            if path.is_file():
                return _cached_prediction(path, len(batch["image"]), self.mc_passes >= 2, batch["image"].device)
        feats = _view_features(model, batch, tta)
        pred = _decoded_mean(model, feats)
        var = head_mc_variance(model, feats, self.mc_passes) if self.mc_passes >= 2 else None
        if path is not None:
            atomic_torch_save({"pred": pred.cpu(), "var": None if var is None else var.cpu()}, path)
        return pred, var

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
