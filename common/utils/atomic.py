"""Safe file writes between processes: atomic replacement and an exclusive lock.

An atomic write goes to a temp file beside the target and is renamed over it when done (removed on failure):
readers never see a partial file, and a failed write leaves the previous file as it was.
"""
from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temp path in `path`'s folder; it replaces `path` when the block ends, or is removed if it raises.

    Writers that infer a format from the file suffix (PIL) must name the format: the temp file ends in .tmp.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise write_error(path, err) from err
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs and shared caches must be readable by others
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in FIXES:
            raise write_error(path, err) from err
        raise


# errno -> what to do, for a write that failed
FIXES = {errno.ENOSPC: "free space on that disk, or write elsewhere (hydra.run.dir=..., paths.cache_dir=...)",
         errno.EDQUOT: "free space within your disk quota, or write elsewhere (hydra.run.dir=..., paths.cache_dir=...)",
         errno.EACCES: "make the folder writable for this user, or write elsewhere (hydra.run.dir=..., "
                       "paths.cache_dir=...)",
         errno.EROFS: "the file system is read-only: write elsewhere (hydra.run.dir=..., paths.cache_dir=...)",
         errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path (hydra.run.dir=..., "
                        "paths.cache_dir=...)"}


def write_error(path: Path, err: OSError) -> OSError:
    """`err` of writing `path`, said with the path and the fix; same errno and type."""
    fix = FIXES.get(err.errno, "check that the folder exists and is writable")
    return type(err)(err.errno, f"cannot write {path}: {os.strerror(err.errno) if err.errno else err}; {fix}")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def finite(value):
    """Copy of a plain container with every non-finite float (nan, inf) replaced by None (JSON null)."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def atomic_write_json(path: str | os.PathLike, value) -> None:
    """Strict JSON (non-finite numbers as null, never NaN / Infinity), written atomically."""
    atomic_write_text(path, json.dumps(finite(value), indent=2, allow_nan=False) + "\n")


@contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Holds an exclusive lock on `path` (created if needed) for the block: one process of a machine at a time."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
