"""Two sweep workers on one PostgreSQL study (the many-machine storage), on a throwaway local server."""
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.test_sweeps import _worker

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def postgres_url(tmp_path):
    if not (PG_BIN / "postgres").exists() or shutil.which("runuser") is None or os.geteuid() != 0:
        pytest.skip("PostgreSQL 15 server binaries (or root to run them as the postgres user) are not on this "
                    "machine; .ci/run installs them")
    base = Path(tempfile.mkdtemp(prefix="vfm-pg-"))  # pytest's tmp_path is private to root; postgres needs its own
    base.chmod(0o755)
    data = base / "data"
    data.mkdir()
    shutil.chown(data, "postgres")
    as_pg = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_pg, str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)
    port = _free_port()
    server = subprocess.Popen([*as_pg, str(PG_BIN / "postgres"), "-D", str(data), "-p", str(port), "-k", str(data),
                               "-c", "listen_addresses=127.0.0.1"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if subprocess.run([*as_pg, str(PG_BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                              capture_output=True).returncode == 0:
                break
            time.sleep(0.2)
        subprocess.run([*as_pg, str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "optuna"], check=True)
        yield f"postgresql://postgres@127.0.0.1:{port}/optuna"
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(base, ignore_errors=True)


def test_two_workers_on_postgres(tmp_path, postgres_url):
    subprocess.run([os.sys.executable, "-m", "sweeps.create_study", "task=toy",
                    f"hydra.searchpath=[file://{Path(__file__).parent / 'toy' / 'conf'}]", "sweeps=toy_lr",
                    f"hydra.sweeper.storage={postgres_url}"], check=True, cwd=Path(__file__).parents[1])
    workers = [_worker(tmp_path, f"pg{i}", ["hydra.sweeper.budget=3", f"hydra.sweeper.storage={postgres_url}"],
                       popen=True) for i in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs
    trials = optuna.load_study(study_name="toy_lr", storage=postgres_url).trials
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) == 3
    assert not [t for t in trials if t.state == TrialState.RUNNING]
