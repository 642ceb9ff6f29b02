"""View geometry: which boxes of an image become the model's views, and cutting them out.

View names:
- "global": the whole image (aspect ratio not kept);
- "center": the largest centred square (the benchmark's transform level 0);
- "right":  the largest square flush with the right edge;
- "tile_<r><c>": one square of a 3x3 grid (row r, column c). The tile side is a third of the image
  width (capped by the height) and neighbouring tiles overlap by 25 % of the side; the grid is centred,
  and when it does not fit along an axis the tiles along that axis are spread evenly from edge to edge
  (the overlap then grows).
Every view is resized to the view size with LANCZOS (object masks: NEAREST, so they stay binary).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

PRESETS = {
    "single": ["center"],
    "global": ["global"],
    "highres12": ["global"] + [f"tile_{r}{c}" for r in range(3) for c in range(3)] + ["center", "right"],
}

Box = tuple[int, int, int, int]  # left, top, right, bottom (right/bottom exclusive)


def resolve_views(views) -> list[str]:
    """A preset name or an explicit list of view names -> list of view names (validated)."""
    names = PRESETS.get(views) if isinstance(views, str) else list(views)
    if names is None:
        raise ValueError(f"data.views={views!r}: expected one of {sorted(PRESETS)} or a list of view names")
    for name in names:
        view_box(name, 400, 300)  # raises on unknown names
    if not names:
        raise ValueError("data.views is empty: give at least one view")
    return names


def _starts(length: int, side: int, count: int, overlap: float) -> list[int]:
    stride = side * (1.0 - overlap)
    span = side + (count - 1) * stride
    if span <= length:
        first = (length - span) / 2.0
        return [int(round(first + i * stride)) for i in range(count)]
    return [int(round(v)) for v in np.linspace(0, length - side, count)]


def tile_boxes(width: int, height: int, grid: int = 3, side_fraction: float = 1 / 3,
               overlap: float = 0.25) -> list[Box]:
    """Boxes of the grid x grid square tiles, row-major."""
    side = min(int(round(width * side_fraction)), height)
    xs = _starts(width, side, grid, overlap)
    ys = _starts(height, side, grid, overlap)
    return [(x, y, x + side, y + side) for y in ys for x in xs]


def view_box(name: str, width: int, height: int) -> Box:
    side = min(width, height)
    if name == "global":
        return 0, 0, width, height
    if name == "center":
        left, top = (width - side) // 2, (height - side) // 2
        return left, top, left + side, top + side
    if name == "right":
        top = (height - side) // 2
        return width - side, top, width, top + side
    if name.startswith("tile_") and len(name) == 7 and name[5] in "012" and name[6] in "012":
        return tile_boxes(width, height)[int(name[5]) * 3 + int(name[6])]
    raise ValueError(f"unknown view {name!r}: expected global, center, right or tile_<row><col> "
                     f"with row and col in 0..2")


def cut_views(image: Image.Image, names: Sequence[str], size: int,
              resample: Image.Resampling = Image.LANCZOS) -> list[np.ndarray]:
    """Each named view as a (size, size, 3) uint8 array ((size, size) for a single-channel mask)."""
    width, height = image.size
    return [np.asarray(image.crop(view_box(name, width, height)).resize((size, size), resample))
            for name in names]
