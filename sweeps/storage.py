"""Opening a study's storage: SQLite on one machine, PostgreSQL (or any SQLAlchemy URL) for many.

Passwords: give them by environment (OPTUNA_STORAGE=postgresql://user:pw@host/db) or leave them out of the URL
(postgresql://user@host/db) and let libpq read PGPASSWORD or ~/.pgpass (PGPASSFILE). Every line that names a
storage goes through common.utils.secrets.redact.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path

import optuna
import sqlalchemy.exc

from common.utils.atomic import file_lock
from common.utils.secrets import redact

log = logging.getLogger(__name__)
SCHEMA_RETRIES = 5  # another process creating the schema at the same instant makes ours fail once


def with_driver(url: str) -> str:
    """`postgresql://...` with psycopg2 named: SQLAlchemy 1.4 (the stable line) defaults to psycopg2, 2.1 (the modern
    line) to psycopg 3, which the suite does not install; psycopg2-binary is in both dependency sets."""
    return "postgresql+psycopg2://" + url[len("postgresql://"):] if url.startswith("postgresql://") else url


def sqlite_path(url: str) -> Path | None:
    return Path(url[len("sqlite:///"):]) if url.startswith("sqlite:///") else None


def _rdb_storage(url: str) -> optuna.storages.RDBStorage:
    """RDBStorage, retried while another process (a worker, `optuna trials`, a notebook) creates the schema:
    the loser of that race gets an IntegrityError on alembic_version or 'table already exists'."""
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(SCHEMA_RETRIES):
        try:
            return optuna.storages.RDBStorage(with_driver(url), engine_kwargs=engine_kwargs)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError) as err:
            if attempt == SCHEMA_RETRIES - 1 or not _is_schema_race(err):
                raise
            log.info(f"storage {redact(url)}: schema being created by another process, retrying")
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def _is_schema_race(err: Exception) -> bool:
    text = str(err).lower()
    return "alembic_version" in text or "already exists" in text or "unique constraint" in text


def journal_storage(path: Path):
    """journal:///shared/path/study.log: a study in an append-only file on a shared filesystem, no database
    server (optuna >= 3.1; the suite's pinned optuna 2.10 has none, see README "Modern Optuna")."""
    backend = getattr(getattr(optuna.storages, "journal", None), "JournalFileBackend", None)
    if backend is None:
        raise ValueError(f"storage journal://{path}: JournalStorage needs optuna >= 4 (installed: "
                         f"{optuna.__version__}); use sqlite:/// on one machine or postgresql:// for many")
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(backend(str(path)))


def make_storage(url: str):
    if not url:
        raise ValueError("hydra.sweeper.storage is empty: a shared study needs a database URL "
                         "(sqlite:///path/study.db on one machine, postgresql://... for many; or OPTUNA_STORAGE)")
    if url.startswith("journal:///"):
        return journal_storage(Path(url[len("journal://"):]))
    path = sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    return _rdb_storage(url)


@contextmanager
def creation_lock(url: str):
    """Serialise schema and study creation between processes of one machine (SQLite); other databases rely on
    the retry in _rdb_storage and on `python -m sweeps.create_study` before the workers."""
    path = sqlite_path(url)
    if path is None:
        yield
        return
    with file_lock(str(path) + ".lock"):
        yield


def open_study(url: str, study_name: str, directions: list[str], sampler=None) -> optuna.Study:
    with creation_lock(url):
        storage = make_storage(url)
        return optuna.create_study(study_name=study_name, storage=storage, sampler=sampler,
                                   directions=directions, load_if_exists=True)


def load_study(url: str, study_name: str, sampler=None, pruner=None) -> optuna.Study:
    """An existing study (a clear error naming the storage and its studies when there is none). pruner None: none
    (optuna's own default would be MedianPruner)."""
    with creation_lock(url):
        storage = make_storage(url)
    names = [s.study_name for s in optuna.study.get_all_study_summaries(storage)]
    if study_name not in names:
        raise SystemExit(f"no study {study_name!r} in {redact(url)}; it holds: {', '.join(names) or 'no study'}")
    return optuna.load_study(study_name=study_name, storage=storage, sampler=sampler,
                             pruner=pruner or optuna.pruners.NopPruner())
