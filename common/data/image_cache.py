"""Decoded and resized images cached on disk (`data.image_cache`), so that after the first epoch the data
workers skip JPEG decoding and resizing: the deterministic part of a pipeline, before random augmentation.

One .npy file per (image content, preparation) under `dir`, shared by workers, runs and processes, written
atomically; the operating system's page cache keeps the hot files in memory. The preparation id (for
example "views=global,center|size=224|lanczos") must name everything that decides the array.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from common.data.feature_cache import image_key
from common.utils.atomic import atomic_path, atomic_write_text


def through(cache: Optional["ImageCache"], image: str | Path, preparation: str,
            compute: Callable[[], np.ndarray]) -> np.ndarray:
    """`compute()` through the cache when there is one (datasets hold None when data.image_cache is off)."""
    return compute() if cache is None else cache.get(image, preparation, compute)


class ImageCache:
    """Beside the arrays, `<dir>/layouts/<preparation key>.json` records the dtype, number of dimensions and
    channels that preparation produces (written on a miss); a hit that differs is named, never returned."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.layouts: dict[str, dict | None] = {}     # preparation -> its recorded layout (None: none recorded)

    @classmethod
    def from_config(cls, section) -> Optional["ImageCache"]:
        """data.image_cache: {enabled, dir} -> a cache, or None when disabled."""
        if section is None or not section.enabled:
            return None
        if not section.dir:
            raise ValueError("data.image_cache.enabled=true needs data.image_cache.dir (a writable folder)")
        return cls(section.dir)

    def path(self, image: str | Path, preparation: str) -> Path:
        key = image_key(image, preparation)
        return self.folder / key[:2] / f"{key}.npy"

    def get(self, image: str | Path, preparation: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """The cached array of `image` prepared as `preparation`, computed and stored on a miss."""
        path = self.path(image, preparation)
        if path.is_file():
            try:
                cached = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as err:
                raise ValueError(f"image cache file {path} (of {image}) is unreadable ({err}); delete it, or the "
                                 f"folder data.image_cache.dir={self.folder}, to rebuild it") from err
            self._check(cached, self._layout(preparation), path, image)
            return cached
        array = np.ascontiguousarray(compute())
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as handle:
                np.save(handle, array, allow_pickle=False)
        except OSError as err:
            raise OSError(f"image cache: cannot write {path} (of {image}): {err}; data.image_cache.dir="
                          f"{self.folder} must be a writable folder with free space") from err
        self._record_layout(preparation, array)
        return array

    def _layout_path(self, preparation: str) -> Path:
        return self.folder / "layouts" / f"{hashlib.sha256(preparation.encode()).hexdigest()[:32]}.json"

    def _layout(self, preparation: str) -> dict | None:
        if preparation not in self.layouts:
            path = self._layout_path(preparation)
            try:
                self.layouts[preparation] = json.loads(path.read_text()) if path.is_file() else None
            except (OSError, ValueError) as err:
                raise ValueError(f"image cache layout file {path} is unreadable ({err}); delete it, or the folder "
                                 f"data.image_cache.dir={self.folder}, to rebuild it") from err
        return self.layouts[preparation]

    def _record_layout(self, preparation: str, array: np.ndarray) -> None:
        layout = {"preparation": preparation, "dtype": str(array.dtype), "ndim": array.ndim,
                  "channels": array.shape[-1] if array.ndim else None}
        if self._layout(preparation) is None:
            try:
                atomic_write_text(self._layout_path(preparation), json.dumps(layout))
            except OSError as err:
                raise OSError(f"image cache: cannot write {self._layout_path(preparation)}: {err}; data.image_cache"
                              f".dir={self.folder} must be a writable folder with free space") from err
            self.layouts[preparation] = layout

    def _check(self, cached: np.ndarray, layout: dict | None, path: Path, image) -> None:
        """The array of a hit against the layout its preparation produces (none recorded: not checked)."""
        if layout is None:
            return
        got = {"dtype": str(cached.dtype), "ndim": cached.ndim, "channels": cached.shape[-1] if cached.ndim else None}
        if any(got[key] != layout[key] for key in got):
            raise ValueError(f"image cache file {path} (of {image}) holds a {cached.dtype} array of shape "
                             f"{cached.shape}; its preparation gives {layout['dtype']} arrays of {layout['ndim']} "
                             f"dimensions, {layout['channels']} in the last. Delete it, or the folder "
                             f"data.image_cache.dir={self.folder}, to rebuild it")
