"""Opening a SQLite study while another process creates its schema (the IntegrityError on alembic_version)."""
import subprocess
import sys

import optuna
import pytest
import sqlalchemy.exc

from sweeps import storage
from tests.cli import REPO

OPEN = "import sys; from sweeps.storage import make_storage; make_storage(sys.argv[1])"


@pytest.mark.slow
def test_concurrent_schema_creation_never_crashes_a_worker(tmp_path):
    for round_ in range(2):
        url = f"sqlite:///{tmp_path / f'race{round_}.db'}"
        procs = [subprocess.Popen([sys.executable, "-c", OPEN, url], cwd=REPO, stderr=subprocess.PIPE, text=True)
                 for _ in range(4)]
        errors = [p.communicate(timeout=300)[1] for p in procs]
        assert [p.returncode for p in procs] == [0] * 4, errors
        assert optuna.study.get_all_study_summaries(storage.make_storage(url)) == []


def test_schema_race_is_retried_and_other_errors_are_not(tmp_path, monkeypatch):
    real, calls = optuna.storages.RDBStorage, []

    def flaky(url, **kwargs):
        calls.append(url)
        if len(calls) == 1:
            raise sqlalchemy.exc.IntegrityError("INSERT INTO alembic_version", {},
                                                Exception("UNIQUE constraint failed: alembic_version.version_num"))
        return real(url, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", flaky)
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    url = f"sqlite:///{tmp_path / 'a.db'}"
    assert isinstance(storage.make_storage(url), real) and len(calls) == 2

    def broken(url, **kwargs):
        raise sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("disk I/O error"))

    monkeypatch.setattr(optuna.storages, "RDBStorage", broken)
    with pytest.raises(sqlalchemy.exc.OperationalError, match="disk I/O error"):
        storage.make_storage(url)
