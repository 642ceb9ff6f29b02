"""Run directories and diverged runs: one live run per directory, stale temporaries removed, unwritable
folders refused by config key, a never-finite monitor fails the run, metrics.json is strict JSON."""
import json
import os
import socket
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from common.runs.run_dir import (LOCK_NAME, RunDirectoryBusy, check_run_folders, remove_stale_temporaries,
                                 run_directory_lock)
from common.training.divergence import Diverged
from common.utils.atomic import atomic_write_json
from tests.cli import REPO, TOY, run_cli

HOLDER = ("import sys, time; from common.runs.run_dir import run_directory_lock\n"
          "with run_directory_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(float(sys.argv[2]))\n")


def _holder(run_dir, seconds):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), str(seconds)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _strict_json(path):
    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}: not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_second_live_run_is_refused_with_the_holders_pid(tmp_path):
    holder = _holder(tmp_path / "run", 60)
    try:
        with pytest.raises(RunDirectoryBusy, match=rf"in use by process {holder.pid} on {socket.gethostname()}"):
            with run_directory_lock(tmp_path / "run"):
                pass
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / "run" / LOCK_NAME).is_file()     # SIGKILL: the lock stays behind, naming a dead pid
    with run_directory_lock(tmp_path / "run") as lock:  # ... and is taken over
        assert lock.read_text().split()[:2] == [socket.gethostname(), str(os.getpid())]
    assert not lock.exists()                             # released at exit


def test_lock_is_released_when_the_holder_exits(tmp_path):
    holder = _holder(tmp_path / "run", 0)
    assert holder.wait() == 0
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_requeued_slurm_job_takes_over_its_own_lock(tmp_path, monkeypatch):
    (tmp_path / LOCK_NAME).write_text("another-node 4242 777\n")
    monkeypatch.setenv("SLURM_JOB_ID", "778")
    with pytest.raises(RunDirectoryBusy, match=r"process 4242 on another-node \(Slurm job 777\)"):
        with run_directory_lock(tmp_path):
            pass
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    with run_directory_lock(tmp_path):
        pass


@pytest.mark.slow
def test_cli_run_into_a_busy_directory_fails_naming_the_pid(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text(f"{socket.gethostname()} {os.getpid()}\n")   # this live test process
    proc = run_cli([*TOY], run, tmp_path / "cache", check=False)
    assert proc.returncode != 0 and f"in use by process {os.getpid()}" in proc.stderr
    assert not (run / "metrics.jsonl").exists()


def test_stale_temporaries_are_removed_and_others_kept(tmp_path):
    names = [".best.pt.k2j3.tmp", "checkpoints/.last.pt.x1.tmp", "fold_0/checkpoints/.best.pt.y.tmp",
             ".metrics.json.z.tmp"]
    kept = ["checkpoints/best.pt", "notes.tmp", "wandb/.x.tmp"]
    for name in names + kept:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(str(p.relative_to(tmp_path)) for p in removed) == sorted(names)
    assert all((tmp_path / name).exists() for name in kept)


def _toy_cfg(tmp_path, overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=[*TOY, "logger=none", "trainer.progress=off",
                                                        f"paths.root_dir={tmp_path}",
                                                        f"paths.output_dir={tmp_path / 'run'}", *overrides])


@pytest.mark.parametrize("key,override", [
    ("paths.cache_dir", "paths.cache_dir={blocker}/cache"),
    ("data.image_cache.dir", "+data.image_cache={{enabled: true, dir: {blocker}/decoded}}"),
    ("hydra.run.dir", "paths.output_dir={blocker}/run"),
])
def test_unwritable_folder_fails_at_start_naming_the_key(tmp_path, key, override):
    blocker = tmp_path / "a_file"          # a folder below a regular file cannot be made, even by root
    blocker.write_text("")
    cfg = _toy_cfg(tmp_path, [override.format(blocker=blocker)])
    with pytest.raises(PermissionError, match=rf"{key}={blocker}/\w+ is not a writable folder"):
        check_run_folders(cfg, blocker / "run" if key == "hydra.run.dir" else tmp_path / "run")


@pytest.mark.slow
def test_cli_unwritable_cache_fails_before_training(tmp_path):
    (tmp_path / "a_file").write_text("")
    proc = run_cli([*TOY], tmp_path / "run", tmp_path / "a_file" / "cache", check=False)
    assert proc.returncode != 0 and f"paths.cache_dir={tmp_path / 'a_file' / 'cache'} is not a writable" in proc.stderr


def test_never_finite_monitor_fails_the_run_and_metrics_json_is_strict(tmp_path, monkeypatch):
    from common.runs.app import run
    from tests.toy import task as toy
    monkeypatch.setattr(toy.ToyMetric, "compute", lambda self: {"neg_mse": float("-inf")})
    cfg = _toy_cfg(tmp_path, ["trainer.max_epochs=2"])
    with pytest.raises(Diverged, match=r"val/neg_mse was not finite in any of 2 epochs .*Lower trainer\.optim\.lr"):
        run(cfg)
    summary = _strict_json(tmp_path / "run" / "metrics.json")
    assert summary["best_value"] is None and summary["last"]["val/neg_mse"] is None
    assert summary["checkpoints"] == {"last": str(tmp_path / "run" / "checkpoints" / "last.pt")}
    assert not (tmp_path / "run" / "checkpoints" / "best.pt").exists()
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_atomic_write_json_turns_non_finite_into_null(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"a": float("nan"), "b": [1.5, float("inf"), -float("inf")], "c": "x"})
    assert _strict_json(tmp_path / "m.json") == {"a": None, "b": [1.5, None, None], "c": "x"}


@pytest.mark.slow
def test_two_runs_started_together_one_gets_the_directory(tmp_path):
    """Two holders started together: exactly one gets the directory."""
    procs = [subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), "3"], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=60) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes[0] == 0 and codes[1] != 0, results
    assert "RunDirectoryBusy" in "".join(err for _, err in results)
