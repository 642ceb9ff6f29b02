"""biomass test-time augmentation (inference.tta, conf/inference/tta/biomass.yaml): the views predictions are
averaged over.

Views: the image, its horizontal / vertical flips and rescalings (sides rounded to the patch size); or, with
`tiles`, the failure diagnosis' tiled inference (2.3.2): tiles of the backbone's input size (data.image_size) cut from
the ORIGINAL image resized to `tiles.scale` x data.image_size (the dataset's `image_hires`), a `tiles.grid` of
rows x cols spread from corner to corner plus (`tiles.centre`) the centre tile, each flipped as set; the tiles
replace the resized image, so the backbone reads the quadrat at `scale` x the resolution. Every view predicts the
same quadrat's grams (the heads average per-area densities), so the predictions are averaged. Averaging pred_g is averaging in component space: the
targets are linear in the components, so GDM = green + clover and Total = all three still hold.

`ViewTTA(model)` wraps a BiomassModel or BiomassEnsemble for eval / predict (ViewAveraged; both predict through
`forward_views(batch, tta)`); validation during training averages the same views inside the model (BiomassModel's
`tta`, see there).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn


def tile_starts(length: int, tile: int, count: int) -> list[int]:
    """`count` tile offsets along a side, evenly spread from 0 to length - tile."""
    if count == 1:
        return [(length - tile) // 2]
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def tiles_of(hires: Tensor, size: tuple[int, int], grid: Sequence[int], centre: bool) -> list[Tensor]:
    """Tiles of `size` (h, w) of the high-resolution image: a rows x cols grid from corner to corner, then the centre."""
    big_h, big_w = hires.shape[-2:]
    h, w = size
    if big_h < h or big_w < w:
        raise ValueError(f"inference.tta.tiles: the high-resolution image {big_h}x{big_w} is smaller than a tile {h}x{w}")
    starts = [(y, x) for y in tile_starts(big_h, h, grid[0]) for x in tile_starts(big_w, w, grid[1])]
    if centre:
        starts.append(((big_h - h) // 2, (big_w - w) // 2))
    return [hires[..., y:y + h, x:x + w] for y, x in starts]


def tta_views(images: Tensor, hflip: bool, vflip: bool, scales: Sequence[float], patch: int,
              tiles: dict | None = None, hires: Tensor | None = None) -> list[Tensor]:
    """The image (tiles: the tiles of `hires` at the image's size instead), their flips, the image's rescalings.
    Every view predicts the quadrat's grams (the heads read densities), so averaging their pred_g averages in
    component space."""
    if tiles:
        if hires is None:
            raise ValueError("inference.tta.tiles needs the original image at tiles.scale x data.image_size "
                             "(the batch's image_hires, which the biomass datasets add when tiles are set)")
        bases = tiles_of(hires, tuple(images.shape[-2:]), tiles["grid"], tiles["centre"])
    else:
        bases = [images]
    views = []
    for base in bases:
        views.append(base)
        if hflip:
            views.append(base.flip(-1))
        if vflip:
            views.append(base.flip(-2))
    h, w = images.shape[-2:]
    for scale in scales:
        size = (max(patch, round(h * scale / patch) * patch), max(patch, round(w * scale / patch) * patch))
        if size != (h, w):
            views.append(F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True))
    return views


def check_tiles(tiles) -> dict | None:
    """null (off) or {grid: [rows, cols], scale: >= 1, centre: bool}."""
    if tiles is None:
        return None
    if not isinstance(tiles, Mapping) or set(tiles) != {"grid", "scale", "centre"}:
        raise ValueError(f"inference.tta.tiles={tiles!r}: expected null or {{grid: [rows, cols], scale: >= 1, "
                         f"centre: true | false}}")
    grid, scale, centre = tiles["grid"], tiles["scale"], tiles["centre"]
    if isinstance(grid, (str, bytes)) or not isinstance(grid, Sequence) or len(grid) != 2 or not all(
            isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid):
        raise ValueError(f"inference.tta.tiles.grid={grid!r}: expected [rows, cols], positive integers")
    if not (_number(scale) and scale >= 1):
        raise ValueError(f"inference.tta.tiles.scale={scale!r}: expected a number >= 1 (the original image at this "
                         f"multiple of data.image_size)")
    if not isinstance(centre, bool):
        raise ValueError(f"inference.tta.tiles.centre={centre!r}: expected true or false")
    return {"grid": [int(g) for g in grid], "scale": float(scale), "centre": centre}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive(value) -> bool:
    return _number(value) and value > 0


class ViewTTA:
    """The TTA views of inference.tta: hflip, vflip, scales (e.g. [0.75, 1.25]) and tiles (null = off, else
    {grid, scale, centre}: see the module). No view selected (the default) = the image alone. Called on a model (or
    ensemble), returns it wrapped for eval / predict, or unchanged when no view is selected."""

    def __init__(self, hflip: bool = False, vflip: bool = False, scales: Sequence[float] = (), tiles=None):
        for name, value in (("hflip", hflip), ("vflip", vflip)):
            if not isinstance(value, bool):
                raise ValueError(f"inference.tta.{name}={value!r}: expected true or false")
        if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence) or not all(
                _positive(s) for s in scales):
            raise ValueError(f"inference.tta.scales={scales!r}: expected a list of positive numbers (e.g. [0.75, 1.25])")
        self.tiles = check_tiles(tiles)
        if self.tiles and scales:
            raise ValueError("inference.tta: scales rescale the resized image, tiles replace it: set one of them")
        self.hflip, self.vflip = hflip, vflip
        self.scales = [float(s) for s in scales]

    @property
    def active(self) -> bool:
        """Whether any view beyond the image is selected."""
        return self.hflip or self.vflip or bool(self.scales) or bool(self.tiles)

    @property
    def hires_scale(self) -> float | None:
        """The multiple of data.image_size the datasets must add the original image at (image_hires), or None."""
        return self.tiles["scale"] if self.tiles else None

    def views(self, batch: dict, patch: int) -> list[Tensor]:
        return tta_views(batch["image"], self.hflip, self.vflip, self.scales, patch, self.tiles,
                         batch.get("image_hires"))

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
