"""What a launcher other than Hydra's basic one (submitit: Slurm or local) writes to disk must hold no password.

submitit pickles each job's config and overrides into `<sweep dir>/.submitit/<job>/*_submitted.pkl` (and the
Slurm script), so a password given on the command line (`hydra.sweeper.storage=postgresql://u:pw@h/db`) would be
written there in plaintext. Such a launch is refused before anything is written, pointing to OPTUNA_STORAGE (an
environment variable: the job inherits it, the pickled config holds only `${oc.env:OPTUNA_STORAGE,...}`) or
~/.pgpass; and the submitting process writes the job files with mode 0600 (umask 077).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from omegaconf import DictConfig

from common.utils.secrets import redact, url_password


def writes_job_files(launcher) -> bool:
    """False for Hydra's BasicLauncher (runs jobs in this process), True for launchers that pickle jobs."""
    return type(launcher).__name__ != "BasicLauncher"


def command_line_passwords(config: DictConfig) -> list[str]:
    """The command line's overrides (redacted) that hold a URL with a password."""
    overrides = [*config.hydra.overrides.get("hydra", []), *config.hydra.overrides.get("task", [])]
    return [redact(str(item)) for item in overrides if url_password(str(item).partition("=")[2])]


def check_launch(config: DictConfig, launcher) -> None:
    found = command_line_passwords(config) if writes_job_files(launcher) else []
    if found:
        raise ValueError(f"{', '.join(found)}: a password on the command line would be written in plaintext into "
                         f"the job files of {type(launcher).__name__} (.submitit/*.pkl, the Slurm script). Pass the "
                         f"URL in the environment instead (export OPTUNA_STORAGE=postgresql://user:...@host/db, and "
                         f"drop hydra.sweeper.storage=), or leave the password out of the URL and put it in "
                         f"~/.pgpass (host:port:db:user:password, mode 0600)")


@contextmanager
def private_job_files(launcher) -> Iterator[None]:
    """Files the launcher writes in this block are readable by their owner only (umask 077)."""
    if not writes_job_files(launcher):
        yield
        return
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)
