"""Every image and mask of a dataset fully decoded once, when the dataset is indexed (config `image_check`).

Opening a file or `Image.verify()` reads only the header and structure: a truncated JPEG passes both and fails
mid-epoch inside a data worker. Here each file is decoded in full (`Image.load()`), by `image_check.workers`
threads in parallel (Pillow releases the GIL while decoding), so a broken file is named before training, with
its row or file, by the task's indexing (or skipped and counted with `data.skip_bad=true`).

Cache: with `image_check.cache=true` a file that decoded is remembered as an empty marker file
`<paths.cache_dir>/image_check/<key[:2]>/<key>`, where key = sha1 of the file's size, modification time and its
first and last 64 KiB. A later run (any run sharing the cache folder) skips the decode of an unchanged file;
truncating, extending, rewriting or touching a file changes the key, so it is checked again. A change of the
middle bytes that keeps size and mtime is not seen (delete the folder to recheck everything). Broken files are
never cached, so they are reported on every run.

Library calls outside a run (no `configure`) decode with one thread and no cache.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from PIL import Image

EDGE_BYTES = 64 * 1024
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclass(frozen=True)
class CheckSettings:
    workers: int
    cache_dir: Optional[Path]


_settings = CheckSettings(workers=1, cache_dir=None)


def configure(cfg) -> CheckSettings:
    """Settings of this run: `image_check.workers` threads, markers under paths.cache_dir when image_check.cache."""
    global _settings
    workers = cfg.image_check.workers
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"image_check.workers={workers!r}: expected a whole number >= 1")
    if not isinstance(cfg.image_check.cache, bool):
        raise ValueError(f"image_check.cache={cfg.image_check.cache!r}: expected true or false")
    cache = Path(str(cfg.paths.cache_dir)) / "image_check" if cfg.image_check.cache else None
    _settings = CheckSettings(workers=workers, cache_dir=cache)
    return _settings


def content_key(path: Path) -> str:
    """sha1 of size, mtime and the first and last EDGE_BYTES of the file."""
    stat = os.stat(path)
    digest = hashlib.sha1(f"{stat.st_size}|{stat.st_mtime_ns}|".encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(EDGE_BYTES))
        if stat.st_size > EDGE_BYTES:
            handle.seek(max(EDGE_BYTES, stat.st_size - EDGE_BYTES))
            digest.update(handle.read(EDGE_BYTES))
    return digest.hexdigest()


def decode_error(path: Path) -> Optional[str]:
    """None when the whole image decodes, else why it does not."""
    try:
        with Image.open(path) as image:
            image.load()
    except DECODE_ERRORS as err:
        return f"{path}: cannot decode image ({type(err).__name__}: {err})"
    return None


def _check(path: Path, cache: Optional[Path]) -> Optional[str]:
    if not path.is_file():
        return f"{path}: image file not found"
    marker = None
    if cache is not None:
        key = content_key(path)
        marker = cache / key[:2] / key
        if marker.exists():
            return None
    error = decode_error(path)
    if error is None and marker is not None:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    return error


def broken_images(paths: Iterable[Path], settings: Optional[CheckSettings] = None) -> dict[Path, str]:
    """{path: reason} of the files that are missing or do not decode in full; good files are left out."""
    settings = settings or _settings
    unique = list(dict.fromkeys(Path(p) for p in paths))
    if settings.workers == 1 or len(unique) < 2:
        errors = [_check(p, settings.cache_dir) for p in unique]
    else:
        with ThreadPoolExecutor(settings.workers) as pool:
            errors = list(pool.map(lambda p: _check(p, settings.cache_dir), unique))
    return {path: error for path, error in zip(unique, errors) if error is not None}


def raise_if_broken(paths: Iterable[Path], what: str) -> None:
    """ValueError naming the first broken file of `paths` (and how many more), for sets without skip_bad."""
    broken = broken_images(paths)
    if broken:
        first = next(iter(broken.values()))
        more = f" (and {len(broken) - 1} more broken {what})" if len(broken) > 1 else ""
        raise ValueError(f"{first}{more}")
