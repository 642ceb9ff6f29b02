"""Shared Optuna studies: concurrent workers, failed and diverged trials, killed workers (SQLite, toy task)."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from sweeps.storage import creation_lock, load_study, make_storage
from tests.cli import REPO, TOY

BEAT = ["hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=3"]


def _worker(tmp_path, worker: str, extra: list[str], popen: bool = False, env: dict | None = None):
    logger = [] if any(arg.startswith("logger=") for arg in extra) else ["logger=none"]
    cmd = [sys.executable, str(REPO / "run.py"), "-m", *TOY, "sweeps=toy_lr", *logger,
           f"paths.log_dir={tmp_path / 'logs'}", f"paths.cache_dir={tmp_path / 'cache'}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SWEEP_WORKER_ID": worker, "WANDB_MODE": "disabled", **(env or {})}
    if popen:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _sweep_dir(tmp_path) -> Path:
    return tmp_path / "logs" / "sweeps" / "toy_lr"


def _study(tmp_path):
    """The study, read the way sweeps.report does (a plain optuna.load_study can lose the schema-creation race
    against a starting worker)."""
    return load_study(f"sqlite:///{_sweep_dir(tmp_path) / 'optuna.db'}", "toy_lr")


def _has_running_trial(tmp_path) -> bool:
    url = f"sqlite:///{_sweep_dir(tmp_path) / 'optuna.db'}"
    if not (_sweep_dir(tmp_path) / "optuna.db").exists():
        return False
    with creation_lock(url):
        storage = make_storage(url)
    if "toy_lr" not in [s.study_name for s in optuna.study.get_all_study_summaries(storage)]:
        return False
    return TrialState.RUNNING in [t.state for t in _study(tmp_path).trials]


def _wait_for(condition, what: str, timeout: float = 300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _states(trials) -> list[str]:
    return [t.state.name for t in trials]


@pytest.mark.slow
def test_two_workers_share_one_budget_and_a_rerun_adds_nothing(tmp_path):
    workers = [_worker(tmp_path, f"w{i}", ["hydra.sweeper.budget=4"], popen=True) for i in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs
    trials = _study(tmp_path).trials
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 4, _states(trials)
    assert all("run_dir" in t.user_attrs and "val/neg_mse" in t.user_attrs for t in complete)
    # one directory per trial, named after its number, never shared
    assert [Path(t.user_attrs["run_dir"]) for t in complete] == [_sweep_dir(tmp_path) / f"trial-{t.number}"
                                                                 for t in complete]
    assert {t.user_attrs["worker"] for t in complete} <= {"w0", "w1"}
    assert "setup plugin" not in "".join(outputs) and "\x1b[" not in "".join(outputs)
    # trials draw no curves.png (curves: sweep): each worker's end draws those missing, every trial's once at least
    drawn = [int(n) for n in re.findall(r"\[sweep\] curves\.png of (\d+) runs", "".join(outputs))]
    assert len(drawn) == 2 and sum(drawn) >= 4, drawn
    assert all((_sweep_dir(tmp_path) / f"trial-{t.number}" / "curves.png").is_file() for t in complete)

    listing = sorted(p.name for p in _sweep_dir(tmp_path).iterdir())
    again = _worker(tmp_path, "w2", ["hydra.sweeper.budget=4"])
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    finished = "toy_lr is finished: 4 complete and 0 pruned trials (budget 4 complete); nothing to run"
    assert finished in again.stdout + again.stderr
    assert len(_study(tmp_path).trials) == len(trials)
    assert sorted(p.name for p in _sweep_dir(tmp_path).iterdir()) == listing


@pytest.mark.slow
def test_diverged_trial_is_failed_with_its_reason_and_sweep_goes_on(tmp_path):
    # seed 7 (mixed with worker w0 and 0 trials so far) proposes poison_after 0 (diverges at once), then 1000, 1000
    proc = _worker(tmp_path, "w0", ["hydra.sweeper.sampler.seed=7", "hydra.sweeper.budget=2",
                                    "loss.poison_after=choice(0,1000)", "trainer.max_nonfinite_steps=0"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = _study(tmp_path).trials
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) == 2
    assert len(failed) == 1 and all(t.params["loss.poison_after"] == 0 for t in failed)
    for trial in failed:
        assert trial.user_attrs["fail_reason"].startswith("diverged: non-finite loss at step ")
        assert Path(trial.user_attrs["run_dir"]) == _sweep_dir(tmp_path) / f"trial-{trial.number}"


def _read_until(proc, text: str) -> str:
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"the worker ended without printing {text!r}:\n{''.join(seen)[-3000:]}")


@pytest.mark.slow
def test_dead_worker_never_blocks_the_budget_and_its_trial_is_resumed(tmp_path):
    """w1 finds w0's live trial filling the budget of 1 and waits; w0 is SIGKILLed after its first epoch; w1 does
    not count the dead trial against the budget nor fail it: once its heartbeat is older than grace_period, w1
    adopts it and resumes it from its last.pt (same number, parameters and directory)."""
    args = [*BEAT, "hydra.sweeper.budget=1", "trainer.max_epochs=3", "loss.sleep_s=1.0"]
    slow = _worker(tmp_path, "w0", args, popen=True)
    _wait_for(lambda: _has_running_trial(tmp_path), "a running trial")
    waiting = _worker(tmp_path, "w1", args, popen=True)
    head = _read_until(waiting, "waiting for them to finish")
    last_pt = _sweep_dir(tmp_path) / "trial-0" / "checkpoints" / "last.pt"
    _wait_for(last_pt.exists, "trial 0's last.pt after its first epoch")
    slow.send_signal(signal.SIGKILL)
    slow.wait()
    before = _study(tmp_path).trials
    tail = waiting.communicate(timeout=600)[0]
    assert waiting.returncode == 0, head + tail
    trials = _study(tmp_path).trials
    assert _states(trials) == ["COMPLETE"]
    assert "adopting trial 0 (its worker w0 sent no heartbeat for" in tail and f"from {last_pt}" in tail
    assert f"resumed from {last_pt}" in tail
    assert trials[0].params == before[0].params and trials[0].user_attrs["worker"] == "w1"
    assert trials[0].user_attrs["resumed"] == 1 and "fail_reason" not in trials[0].user_attrs
