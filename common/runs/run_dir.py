"""A run directory belongs to one live run: a lock file naming its process, stale temporaries removed at
start, and the folders a run writes checked for write access before any work (naming their config key).

The lock is `<run dir>/.run.lock`, created exclusively and holding `host pid [slurm job id]`. A second run
into the same directory is refused with the holder's process id while the holder lives. The lock is removed
when the run ends; one left by a killed process is taken over when its process is gone (same host) or when
it was written by an earlier attempt of this Slurm job (a requeued job keeps its SLURM_JOB_ID).
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from common.utils.atomic import file_lock

log = logging.getLogger(__name__)

LOCK_NAME = ".run.lock"


class RunDirectoryBusy(RuntimeError):
    """Another live run writes into this run directory."""


def _identity() -> list[str]:
    job = os.environ.get("SLURM_JOB_ID")
    return [socket.gethostname(), str(os.getpid())] + ([job] if job else [])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:       # a live process of another user
        return True
    return True


def _stale(holder: list[str]) -> bool:
    """True when the process that wrote the lock is known to be gone."""
    if len(holder) < 2 or not holder[1].isdigit():
        return True                                   # not a lock this module wrote (empty, torn)
    host, pid, job = holder[0], int(holder[1]), holder[2] if len(holder) > 2 else None
    if job is not None and job == os.environ.get("SLURM_JOB_ID"):
        return True                                   # an earlier attempt of this (requeued) job
    return host == socket.gethostname() and not _alive(pid)


def _holder(lock: Path) -> list[str] | None:
    try:
        return lock.read_text().split()
    except FileNotFoundError:
        return None


def _claim(lock: Path) -> None:
    with file_lock(lock.with_name(LOCK_NAME + ".guard")):   # one claimant at a time decides on a stale lock
        holder = _holder(lock)
        if holder is not None:
            if not _stale(holder):
                raise RunDirectoryBusy(
                    f"run directory {lock.parent} is in use by process {holder[1]} on {holder[0]}"
                    + (f" (Slurm job {holder[2]})" if len(holder) > 2 else "")
                    + f"; pass another hydra.run.dir, or delete {lock} if that process is gone")
            log.info(f"[run] taking over the stale lock {lock} of process {' '.join(holder)}")
            lock.unlink()
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as handle:
            handle.write(" ".join(_identity()) + "\n")


def live_holder_here(run_dir) -> str | None:
    """"process P on H" when a live process of this host holds `run_dir`; None when nothing does, the lock is
    stale, or another host holds it (whose processes this host cannot see)."""
    holder = _holder(Path(run_dir) / LOCK_NAME)
    if holder is None or _stale(holder) or holder[0] != socket.gethostname():
        return None
    return f"process {holder[1]} on {holder[0]}"


def drop_lock_of(run_dir, host: str, pid: int) -> bool:
    """Remove `run_dir`'s lock if process `pid` of `host` wrote it, as a sweep does on adopting a trial whose worker
    it presumes dead (no heartbeat for grace_period): a process of another host that `_stale` cannot see is gone.
    A lock of any other process stays. True when it was removed."""
    lock = Path(run_dir) / LOCK_NAME
    if not lock.exists():
        return False
    with file_lock(lock.with_name(LOCK_NAME + ".guard")):
        if (_holder(lock) or [])[:2] != [host, str(pid)]:
            return False
        lock.unlink()
    log.info(f"[run] removed the lock {lock} of process {pid} on {host}, presumed dead")
    return True


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Temp files of atomic writes (`.<name>.<random>.tmp`) that a killed run left in the run directory and
    its checkpoint folders; only called while holding the run directory's lock."""
    stale = [p for pattern in (".*.tmp", "checkpoints/.*.tmp", "fold_*/checkpoints/.*.tmp", "fold_*/.*.tmp")
             for p in run_dir.glob(pattern) if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log.info(f"[run] removed {len(stale)} stale temporary file(s) of an interrupted run, e.g. {stale[0]}")
    return stale


@contextmanager
def run_directory_lock(run_dir: Path) -> Iterator[Path]:
    """Holds `run_dir` for this process; stale temporaries are removed once the lock is held."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_NAME
    _claim(lock)
    try:
        remove_stale_temporaries(run_dir)
        yield lock
    finally:
        if lock.is_file() and lock.read_text().split()[:2] == _identity()[:2]:
            lock.unlink()


def check_writable(folder, key: str) -> Path:
    """Creates `folder` and a file in it, or raises naming the config key that chose the folder."""
    folder = Path(str(folder)).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check.", suffix=".tmp"):
            pass
    except OSError as err:
        raise PermissionError(f"{key}={folder} is not a writable folder ({type(err).__name__}: {err}); "
                              f"set {key} to a folder this user can write") from err
    return folder


class CheckRunFolder(Callback):
    """Registered in conf/config.yaml (hydra.callbacks): hydra.run.dir (hydra.sweep.dir under -m) is checked
    before Hydra creates it and writes .hydra/ there, so an unwritable one is named with its key and the fix.
    Hydra turns a callback's exception into a warning: the process exits here instead, as run.py does."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir, "hydra.sweep.dir")

    @staticmethod
    def _check(folder, key: str) -> None:
        try:
            check_writable(folder, key)
        except PermissionError as err:
            sys.exit(f"error: {err}")


def run_dir_key() -> str:
    """The config key that chose this run's directory: hydra.sweep.dir under -m, else hydra.run.dir."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return "hydra.sweep.dir"
    return "hydra.run.dir"


def check_run_folders(cfg, run_dir: Path) -> None:
    """The run directory and the caches this run writes, before any work is done."""
    check_writable(run_dir, run_dir_key())
    check_writable(cfg.paths.cache_dir, "paths.cache_dir")
    image_cache = cfg.data.image_cache
    if image_cache.enabled and image_cache.dir:
        check_writable(image_cache.dir, "data.image_cache.dir")
