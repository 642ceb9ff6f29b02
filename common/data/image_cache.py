"""Decoded and resized images cached on disk (`data.image_cache`), so that after the first epoch the data
workers skip JPEG decoding and resizing: the deterministic part of a pipeline, before random augmentation.

One .npy file per (image content, preparation) under `dir`, shared by workers, runs and processes, written
atomically; the operating system's page cache keeps the hot files in memory. The preparation id (for
example "views=global,center|size=224|lanczos") must name everything that decides the array.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np

from common.data.feature_cache import image_key
from common.utils.atomic import atomic_path


def through(cache: Optional["ImageCache"], image: str | Path, preparation: str,
            compute: Callable[[], np.ndarray]) -> np.ndarray:
    """`compute()` through the cache when there is one (datasets hold None when data.image_cache is off)."""
    return compute() if cache is None else cache.get(image, preparation, compute)


class ImageCache:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

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
                return np.load(path, allow_pickle=False)
            except (OSError, ValueError) as err:
                raise ValueError(f"image cache file {path} (of {image}) is unreadable ({err}); delete it, or the "
                                 f"folder data.image_cache.dir={self.folder}, to rebuild it") from err
        array = np.ascontiguousarray(compute())
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as handle:
                np.save(handle, array, allow_pickle=False)
        except OSError as err:
            raise OSError(f"image cache: cannot write {path} (of {image}): {err}; data.image_cache.dir="
                          f"{self.folder} must be a writable folder with free space") from err
        return array
