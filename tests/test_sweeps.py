"""Shared Optuna studies: concurrent workers, failed and diverged trials, killed workers (SQLite, toy task)."""
import os
import signal
import subprocess
import sys
import time

import optuna
from optuna.trial import TrialState

from tests.cli import REPO, TOY


def _worker(tmp_path, worker: str, extra: list[str], popen: bool = False):
    cmd = [sys.executable, str(REPO / "run.py"), "-m", *TOY, "sweeps=toy_lr", "logger=none",
           f"paths.log_dir={tmp_path / 'logs'}", f"paths.cache_dir={tmp_path / 'cache'}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SWEEP_WORKER_ID": worker, "WANDB_MODE": "disabled"}
    if popen:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _study(tmp_path):
    url = f"sqlite:///{tmp_path / 'logs' / 'sweeps' / 'toy_lr' / 'optuna.db'}"
    return optuna.load_study(study_name="toy_lr", storage=url)


def test_two_workers_share_one_budget(tmp_path):
    workers = [_worker(tmp_path, f"w{i}", ["hydra.sweeper.budget=4"], popen=True) for i in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs
    trials = _study(tmp_path).trials
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 4
    assert len({t.number for t in trials}) == len(trials)
    assert all("run_dir" in t.user_attrs and "val/neg_mse" in t.user_attrs for t in complete)
    run_dirs = [t.user_attrs["run_dir"] for t in complete]
    assert len(set(run_dirs)) == 4 and {os.path.basename(os.path.dirname(d)) for d in run_dirs} <= {"w0", "w1"}


def test_diverged_trial_is_failed_and_sweep_goes_on(tmp_path):
    # sampler seed 0 proposes poison_after 1000, then 0 (diverges at once), then 1000
    proc = _worker(tmp_path, "w0", ["hydra.sweeper.sampler.seed=0", "hydra.sweeper.budget=2", "loss.poison_after=choice(0,1000)",
                                    "trainer.max_nonfinite_steps=0"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = _study(tmp_path).trials
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) == 2
    assert len(failed) == 1 and all("NonFiniteLossError" in t.user_attrs["fail_reason"] for t in failed)
    assert all(t.params["loss.poison_after"] == 0 for t in failed)


def test_killed_worker_trial_is_failed_by_the_next(tmp_path):
    beat = ["hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=2"]
    slow = _worker(tmp_path, "w0", [*beat, "hydra.sweeper.budget=2", "trainer.max_epochs=1000"], popen=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        db = tmp_path / "logs" / "sweeps" / "toy_lr" / "optuna.db"
        if db.exists() and any(t.state == TrialState.RUNNING for t in _study(tmp_path).trials):
            break
        time.sleep(1)
    time.sleep(2)
    slow.send_signal(signal.SIGKILL)
    slow.wait()
    time.sleep(3)  # longer than the grace period: the killed trial's heartbeat is stale
    proc = _worker(tmp_path, "w1", [*beat, "hydra.sweeper.budget=2"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = _study(tmp_path).trials
    assert trials[0].state == TrialState.FAIL
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) == 2
    assert not [t for t in trials if t.state == TrialState.RUNNING]
