"""Sweep workers on a PostgreSQL study (the many-machine storage), on a throwaway local server with password
authentication: two workers share one budget, and the password, given each supported way, leaves no trace in
any file of the sweep or on the console."""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

from sweeps.storage import load_study
from tests.test_sweep_adoption import race_for_orphans
from tests.test_sweeps import _worker

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("postgres")]   # with -n: one PostgreSQL server at a time

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PASSWORD = "Zq7-s3cr3t-pw"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def postgres(tmp_path):
    """(host:port, password) of a fresh server whose only user `postgres` needs the password (scram-sha-256)."""
    if not (PG_BIN / "postgres").exists() or shutil.which("runuser") is None or os.geteuid() != 0:
        pytest.skip("PostgreSQL 15 server binaries (or root to run them as the postgres user) are not on this "
                    "machine; .ci/run installs them")
    base = Path(tempfile.mkdtemp(prefix="vfm-pg-"))  # pytest's tmp_path is private to root; postgres needs its own
    base.chmod(0o755)
    data, pwfile = base / "data", base / "pw"
    data.mkdir()
    pwfile.write_text(PASSWORD + "\n")
    for path in (data, pwfile):
        shutil.chown(path, "postgres")
    as_pg = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_pg, str(PG_BIN / "initdb"), "-D", str(data), "-A", "scram-sha-256", "-U", "postgres",
                    f"--pwfile={pwfile}"], check=True, capture_output=True)
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
        subprocess.run([*as_pg, str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "optuna"], check=True,
                       env={**os.environ, "PGPASSWORD": PASSWORD})
        yield f"127.0.0.1:{port}", PASSWORD
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(base, ignore_errors=True)


def test_two_workers_on_postgres(tmp_path, postgres):
    address, password = postgres
    url = f"postgresql://postgres:{password}@{address}/optuna"
    subprocess.run([sys.executable, "-m", "sweeps.create_study", "task=toy",
                    f"hydra.searchpath=[file://{Path(__file__).parent / 'toy' / 'conf'}]", "sweeps=toy_lr",
                    f"hydra.sweeper.storage={url}"], check=True, cwd=Path(__file__).parents[1])
    workers = [_worker(tmp_path, f"pg{i}", ["hydra.sweeper.budget=3", f"hydra.sweeper.storage={url}"], popen=True)
               for i in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs
    trials = load_study(url, "toy_lr").trials
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) == 3
    assert not [t for t in trials if t.state == TrialState.RUNNING]


def _ways(address: str, password: str, tmp_path: Path) -> dict[str, tuple[list[str], dict]]:
    """Every supported way of giving the password: (command-line overrides, environment)."""
    with_pw, without_pw = f"postgresql://postgres:{password}@{address}/optuna", f"postgresql://postgres@{address}/optuna"
    host, port = address.split(":")
    pgpass = tmp_path / "pgpass"
    pgpass.write_text(f"{host}:{port}:optuna:postgres:{password}\n")
    pgpass.chmod(0o600)
    # wandb (offline) records the process arguments and the config: the first way goes through it too
    return {"url_on_command_line": ([f"hydra.sweeper.storage={with_pw}", "logger=wandb"], {"WANDB_MODE": "offline"}),
            "url_in_environment": ([], {"OPTUNA_STORAGE": with_pw}),
            "pgpassword": ([f"hydra.sweeper.storage={without_pw}"], {"PGPASSWORD": password}),
            "pgpass_file": ([], {"OPTUNA_STORAGE": without_pw, "PGPASSFILE": str(pgpass)})}


def _files_holding(root: Path, secret: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and secret in p.read_bytes()]


def test_password_leaves_no_trace(tmp_path, postgres):
    address, password = postgres
    for way, (overrides, env) in _ways(address, password, tmp_path).items():
        logs = tmp_path / way
        proc = _worker(logs, "w0", ["hydra.sweeper.budget=1", f"hydra.sweeper.study_name={way}", *overrides],
                       env=env)
        console = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{way}:\n{console[-3000:]}"
        assert f"study {way} in postgresql://postgres" in console  # the storage is named, without its password
        assert password not in console, way
        assert _files_holding(logs, password.encode()) == [], way
        trial_dir = logs / "logs" / "sweeps" / way / "trial-0"
        assert (trial_dir / ".hydra" / "hydra.yaml").is_file()
        assert (way != "url_on_command_line") or list(trial_dir.glob("wandb/offline-run-*/run-*.wandb"))
        url = f"postgresql://postgres:{password}@{address}/optuna"
        trials = load_study(url, way).trials
        assert [t.state for t in trials] == [TrialState.COMPLETE], way
        assert password not in repr([t.user_attrs for t in trials])


def test_two_workers_racing_for_orphans_on_postgres(postgres):
    """sweeps.ownership's compare-and-set (UPDATE ... WHERE owner = the one read) on PostgreSQL: of two workers
    adopting the same 30 orphaned trials at once, exactly one wins each."""
    address, password = postgres
    race_for_orphans(f"postgresql://postgres:{password}@{address}/optuna", None)
