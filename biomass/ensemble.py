"""Predict-time test-time augmentation and ensembling of several trained biomass models.

TTA views: the image, its horizontal / vertical flips, rescalings (sides rounded to the patch
size) and tiles (four corners + centre, the failure diagnosis' tiled inference). Every view predicts the same quadrat's grams (the heads average per-area densities), so the
predictions are averaged. Averaging pred_g is averaging in component space: the targets are linear
in the components, so GDM = green + clover and Total = all three still hold.
Ensemble members (e.g. the fold models of mode=cv) are averaged per image, either equally or with
MC-dropout weights: K stochastic passes of the head alone (its dropout on) on backbone features computed
once per image and view, weight 1 / (variance of the predicted total + eps), normalised over the members.
Per-member predictions can be cached on disk (data.ensemble.cache_dir).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.checkpoint import atomic_torch_save


def tiles_of(images: Tensor, fraction: float, patch: int) -> list[Tensor]:
    """Tiled inference: the four corner crops and the centre crop, each `fraction` of the height and width
    (rounded to the patch size), at their own resolution."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"data.tta.tiles={fraction}: expected 0 (off) or a side fraction in (0, 1)")
    h, w = images.shape[-2:]
    th, tw = (max(patch, int(side * fraction) // patch * patch) for side in (h, w))
    starts = [(0, 0), (0, w - tw), (h - th, 0), (h - th, w - tw), ((h - th) // 2, (w - tw) // 2)]
    return [images[..., y:y + th, x:x + tw] for y, x in starts]


def tta_views(images: Tensor, hflip: bool, vflip: bool, scales: Sequence[float], patch: int,
              tiles: float = 0.0) -> list[Tensor]:
    """The image, its flips, its rescalings and (tiles > 0) its five tiles. Every view predicts the quadrat's
    grams (the heads read densities), so averaging their pred_g averages in component space."""
    views = [images]
    if hflip:
        views.append(images.flip(-1))
    if vflip:
        views.append(images.flip(-2))
    h, w = images.shape[-2:]
    for scale in scales:
        size = (max(patch, round(h * scale / patch) * patch), max(patch, round(w * scale / patch) * patch))
        if size != (h, w):
            views.append(F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True))
    if tiles:
        views += tiles_of(images, float(tiles), patch)
    return views


def _view_features(model: nn.Module, batch: dict, hflip: bool, vflip: bool, scales: Sequence[float],
                   tiles: float = 0.0) -> list:
    """Backbone (+ fusion) features of every TTA view: the backbone runs once per view."""
    views = tta_views(batch["image"], hflip, vflip, scales, model.backbone.patch_size, tiles)
    return [model.encode({**batch, "image": view}) for view in views]


def _decoded_mean(model: nn.Module, feats: list) -> Tensor:
    """pred_g (B, 5) of the head on precomputed view features, averaged over the views."""
    return torch.stack([model.decode(f)["pred_g"].float() for f in feats]).mean(dim=0)


def predict_tta(model: nn.Module, batch: dict, hflip: bool, vflip: bool, scales: Sequence[float],
                tiles: float = 0.0) -> Tensor:
    """Mean pred_g (B, 5) of `model` over the TTA views of batch["image"]."""
    return _decoded_mean(model, _view_features(model, batch, hflip, vflip, scales, tiles))


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
    """The checkpoint a member came from (`checkpoint_id`, set by common.inference.load_for_inference), else a digest
    of its whole state (models built in code)."""
    checkpoint = getattr(model, "checkpoint_id", None)
    if checkpoint is not None:
        return _digest("checkpoint", checkpoint)
    return _digest(*[f"{k}" for k in model.state_dict()], *model.state_dict().values())


class BiomassEnsemble(nn.Module):
    """forward(batch) -> pred_g (B, 5): members' TTA predictions averaged per image (equal weights, or
    MC-dropout inverse-variance weights when mc_passes >= 2: the head alone rerun on features computed once per
    image and view), each times the member's fixed `prior` weight (ensemble.weighting=metric), renormalised per
    image; plus member_weights (B, M). cache_dir: per-member predictions stored on disk, keyed by the member's
    checkpoint and the input (pixels, ids, TTA and MC settings), so rerunning an ensemble skips known members."""

    def __init__(self, members: Sequence[nn.Module], hflip: bool, vflip: bool, scales: Sequence[float],
                 mc_passes: int, mc_eps: float, prior: Sequence[float] | None = None,
                 cache_dir: str | Path | None = None, tiles: float = 0.0):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one model")
        if mc_passes == 1:
            raise ValueError("mc_passes must be 0 (equal weights) or >= 2 (a variance needs two passes)")
        self.members = nn.ModuleList(members)
        self.hflip, self.vflip, self.scales = bool(hflip), bool(vflip), [float(s) for s in scales]
        self.tiles = float(tiles)
        self.mc_passes, self.mc_eps = int(mc_passes), float(mc_eps)
        self.backbone = members[0].backbone   # the Task contract's attribute (parameter tags, device moves)
        self.register_buffer("prior", torch.tensor([1.0] * len(members) if prior is None else list(prior)))
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self._keys: dict[int, str] = {}

    def _member(self, index: int, batch: dict) -> tuple[Tensor, Tensor | None]:
        """(pred_g (B, 5), MC variance (B,) or None) of one member, from the cache when it has them."""
        model = self.members[index].eval()
        path = None
        if self.cache_dir is not None:
            if index not in self._keys:
                self._keys[index] = member_key(model)
            inputs = _digest(batch["image"], list(batch.get("image_id", [])),
                             [self.hflip, self.vflip, self.scales, self.tiles, self.mc_passes])
            path = self.cache_dir / self._keys[index] / f"{inputs}.pt"
            if path.is_file():
                cached = torch.load(path, map_location=batch["image"].device)
                return cached["pred"], cached["var"]
        feats = _view_features(model, batch, self.hflip, self.vflip, self.scales, self.tiles)
        pred = _decoded_mean(model, feats)
        var = head_mc_variance(model, feats, self.mc_passes) if self.mc_passes >= 2 else None
        if path is not None:
            atomic_torch_save({"pred": pred.cpu(), "var": None if var is None else var.cpu()}, path)
        return pred, var

    @torch.no_grad()
    def forward(self, batch: dict) -> dict[str, Tensor]:
        results = [self._member(i, batch) for i in range(len(self.members))]
        preds = torch.stack([pred for pred, _ in results], dim=1)                   # (B, M, 5)
        if self.mc_passes >= 2:
            weights = 1.0 / (torch.stack([var for _, var in results], dim=1) + self.mc_eps)
        else:
            weights = preds.new_ones(preds.shape[:2])
        weights = weights * self.prior.to(weights)
        weights = weights / weights.sum(dim=1, keepdim=True)
        return {"pred_g": (weights.unsqueeze(-1) * preds).sum(dim=1), "member_weights": weights}
