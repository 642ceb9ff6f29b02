"""A storage password on the command line never reaches a submitit pickle or Slurm script (issue 30): with a
launcher that writes job files the launch is refused before anything is written, pointing to OPTUNA_STORAGE or
~/.pgpass; the job files such a launcher writes are readable by their owner only."""
from __future__ import annotations

import stat

import pytest
from omegaconf import OmegaConf

from sweeps.launch_secrets import check_launch, private_job_files
from tests.test_sweeps import BEAT, _sweep_dir, _worker

PASSWORD = "s3cret-pw"
STORAGE = f"postgresql://user:{PASSWORD}@localhost:1/db"


class LocalLauncher:       # the class names of hydra-submitit-launcher's launchers and of Hydra's basic one
    pass


class BasicLauncher:
    pass


def _config(overrides):
    return OmegaConf.create({"hydra": {"overrides": {"hydra": overrides, "task": ["task=toy"]}}})


def test_a_password_on_the_command_line_is_refused_for_a_launcher_that_writes_job_files():
    config = _config([f"hydra.sweeper.storage={STORAGE}", "hydra/launcher=submitit_local"])
    with pytest.raises(ValueError, match=r"hydra\.sweeper\.storage=postgresql://user:\*\*\*@localhost:1/db: a "
                                         r"password on the command line .*OPTUNA_STORAGE.*~/\.pgpass") as err:
        check_launch(config, LocalLauncher())
    assert PASSWORD not in str(err.value)
    check_launch(config, BasicLauncher())                                   # runs in this process: allowed
    check_launch(_config(["hydra.sweeper.storage=postgresql://user@host/db"]), LocalLauncher())   # .pgpass


def test_job_files_are_private(tmp_path):
    with private_job_files(LocalLauncher()):
        (tmp_path / "job_submitted.pkl").write_bytes(b"x")
    (tmp_path / "after.txt").write_text("x")
    assert stat.S_IMODE((tmp_path / "job_submitted.pkl").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "after.txt").stat().st_mode) & 0o044      # the umask is back


def _files_holding(root, text: str) -> list:
    return [p for p in root.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


@pytest.mark.slow
def test_cli_submitit_worker_with_a_command_line_password_writes_it_nowhere(tmp_path):
    proc = _worker(tmp_path, "w1", [*BEAT, "hydra/launcher=submitit_local", f"hydra.sweeper.storage={STORAGE}"])
    assert proc.returncode != 0 and "OPTUNA_STORAGE" in proc.stderr + proc.stdout
    assert PASSWORD not in proc.stderr + proc.stdout
    assert _files_holding(tmp_path, PASSWORD) == []
    assert not (_sweep_dir(tmp_path) / ".submitit").exists()


@pytest.mark.slow
def test_cli_submitit_job_files_are_private(tmp_path):
    """A real submitit launch (the local executor): every file it writes under .submitit/ is mode 0600."""
    proc = _worker(tmp_path, "w1", [*BEAT, "hydra/launcher=submitit_local", "hydra.sweeper.budget=1"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    job_files = [p for p in (_sweep_dir(tmp_path) / ".submitit").rglob("*") if p.is_file()]
    assert any(p.name.endswith("_submitted.pkl") for p in job_files)
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in job_files} == \
        {p.name: oct(0o600) for p in job_files}
