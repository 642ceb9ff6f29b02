"""biomass test-time augmentation (inference.tta, conf/inference/tta/biomass.yaml): the views predictions are
averaged over.

Views: the image, its horizontal / vertical flips, rescalings (sides rounded to the patch size) and tiles (four
corners + centre, the failure diagnosis' tiled inference). Every view predicts the same quadrat's grams (the heads
average per-area densities), so the predictions are averaged. Averaging pred_g is averaging in component space: the
targets are linear in the components, so GDM = green + clover and Total = all three still hold.

`ViewTTA(model)` wraps a BiomassModel or BiomassEnsemble for eval / predict (ViewAveraged; both predict through
`forward_views(batch, tta)`); validation during training averages the same views inside the model (BiomassModel's
`tta`, see there).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


def tiles_of(images: Tensor, fraction: float, patch: int) -> list[Tensor]:
    """Tiled inference: the four corner crops and the centre crop, each `fraction` of the height and width
    (rounded to the patch size), at their own resolution."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"inference.tta.tiles={fraction}: expected 0 (off) or a side fraction in (0, 1)")
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


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive(value) -> bool:
    return _number(value) and value > 0


class ViewTTA:
    """The TTA views of inference.tta: hflip, vflip, scales (e.g. [0.75, 1.25]) and tiles (0 = off, else the side
    fraction of the five tiles). No view selected (the default) = the image alone. Called on a model (or
    ensemble), returns it wrapped for eval / predict, or unchanged when no view is selected."""

    def __init__(self, hflip: bool = False, vflip: bool = False, scales: Sequence[float] = (), tiles: float = 0.0):
        for name, value in (("hflip", hflip), ("vflip", vflip)):
            if not isinstance(value, bool):
                raise ValueError(f"inference.tta.{name}={value!r}: expected true or false")
        if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence) or not all(
                _positive(s) for s in scales):
            raise ValueError(f"inference.tta.scales={scales!r}: expected a list of positive numbers (e.g. [0.75, 1.25])")
        if not (_number(tiles) and (tiles == 0 or 0.0 < tiles < 1.0)):
            raise ValueError(f"inference.tta.tiles={tiles!r}: expected 0 (off) or a side fraction in (0, 1)")
        self.hflip, self.vflip = hflip, vflip
        self.scales, self.tiles = [float(s) for s in scales], float(tiles)

    @property
    def active(self) -> bool:
        """Whether any view beyond the image is selected."""
        return self.hflip or self.vflip or bool(self.scales) or bool(self.tiles)

    def views(self, images: Tensor, patch: int) -> list[Tensor]:
        return tta_views(images, self.hflip, self.vflip, self.scales, patch, self.tiles)

    def key(self) -> list:
        """The settings as plain values (BiomassEnsemble's prediction-cache key)."""
        return [self.hflip, self.vflip, self.scales, self.tiles]

    def __call__(self, model: nn.Module) -> nn.Module:
        return ViewAveraged(model, self) if self.active else model

    def __eq__(self, other) -> bool:
        return isinstance(other, ViewTTA) and self.key() == other.key()

    def __repr__(self) -> str:
        return f"ViewTTA(hflip={self.hflip}, vflip={self.vflip}, scales={self.scales}, tiles={self.tiles})"


NO_VIEWS = ViewTTA()   # the image alone


class ViewAveraged(nn.Module):
    """eval / predict: `model`'s predictions averaged over the views of `tta` (model.forward_views(batch, tta):
    a BiomassModel averages every output; a BiomassEnsemble its members' pred_g, MC passes on shared features)."""

    def __init__(self, model: nn.Module, tta: ViewTTA):
        super().__init__()
        self.model, self.tta = model, tta
        self.train(model.training)       # in the wrapped model's mode

    def forward(self, batch: dict) -> dict[str, Tensor]:
        if self.training:
            raise RuntimeError("ViewAveraged is for eval / predict (training validation averages the views inside "
                               "the model): call .eval() first")
        return self.model.forward_views(batch, self.tta)
