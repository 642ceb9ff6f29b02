"""Orphaned trials are adopted and resumed, never failed for silence (sweeps.ownership, the shared-study loop):
fast tests with a fake launcher (no training) and heartbeats aged by hand in place of a clock."""
import multiprocessing
import os
import socket
import time

import optuna
import pytest
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf
from optuna.trial import TrialState

from common.runs.run_dir import LOCK_NAME, drop_lock_of, run_directory_lock
from sweeps import ownership
from sweeps.shared_study import SharedStudySweeper
from sweeps.storage import load_study, open_study

GRACE = 5
RELEASED_W0 = ownership.RELEASED + "w0 host 1 1.0"


class FakeLauncher:
    """Records each launch; raises SystemExit(code) on the launch numbered `stop_at` (a preempted job)."""

    def __init__(self, stop_at=None, code=0):
        self.launches, self.stop_at, self.code = [], stop_at, code

    def launch(self, job_overrides, initial_job_idx):
        self.launches.append((initial_job_idx, list(job_overrides[0])))
        if len(self.launches) == self.stop_at:
            raise SystemExit(self.code)
        lr = float(next(o for o in job_overrides[0] if o.startswith("lr=")).partition("=")[2])
        return [JobReturn(status=JobStatus.COMPLETED, _return_value=lr, cfg=OmegaConf.create({}))]


WAIT = 2


def test_a_worker_waiting_on_other_workers_looks_again_every_wait_interval(tmp_path, monkeypatch):
    """hydra.sweeper.wait_interval, not the heartbeat interval, paces a worker whose budget is full of others' trials."""
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    sweeper = _sweeper(tmp_path, monkeypatch, "w0", launcher=None)
    sweeper._wait_for_running(None, complete=1, live=2)
    sweeper._wait_for_running(None, complete=1, live=2)
    assert slept == [WAIT, WAIT]


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_wait_interval_must_be_positive_seconds(tmp_path, monkeypatch, bad):
    with pytest.raises(ValueError, match="hydra.sweeper.wait_interval"):
        _sweeper(tmp_path, monkeypatch, "w0", launcher=None, wait=bad)


def _sweeper(tmp_path, monkeypatch, worker, launcher, budget=3, wait=WAIT):
    for name in ("SLURM_ARRAY_JOB_ID", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SWEEP_WORKER_ID", worker)
    sweeper = SharedStudySweeper(
        sampler=OmegaConf.create({"_target_": "optuna.samplers.RandomSampler", "seed": 0}), direction="maximize",
        storage=f"sqlite:///{tmp_path / 'optuna.db'}", study_name="s", budget=budget, n_jobs=1,
        max_failure_rate=0.5, heartbeat_interval=1, grace_period=GRACE, wait_interval=wait,
        params=OmegaConf.create({"lr": "interval(0.1, 1.0)"}))
    sweeper.config = OmegaConf.create({"optimized_metric": "val/x", "hydra": {
        "sweep": {"dir": str(tmp_path), "subdir": "trial-${hydra.job.num}"}, "job": {"num": 0}}})
    sweeper.launcher = launcher
    return sweeper


def _study(tmp_path) -> optuna.Study:
    return load_study(f"sqlite:///{tmp_path / 'optuna.db'}", "s")


def _states(tmp_path) -> list[str]:
    return [t.state.name for t in _study(tmp_path).trials]


def _age(tmp_path, number: int, seconds: float) -> None:
    """Make trial `number`'s last heartbeat `seconds` old (a clock moved on by that much)."""
    study = _study(tmp_path)
    study._storage.set_trial_system_attr(study.trials[number]._trial_id, ownership.HEARTBEAT, time.time() - seconds)


def test_a_preempted_trial_is_released_and_resumed_by_another_worker_with_its_number_and_params(tmp_path, monkeypatch):
    first = FakeLauncher(stop_at=2)                      # trial 1's job is preempted (requeued: exit 0)
    with pytest.raises(SystemExit):
        _sweeper(tmp_path, monkeypatch, "w0", first).sweep([])
    before = _study(tmp_path).trials
    assert _states(tmp_path) == ["COMPLETE", "RUNNING"]
    assert before[1].user_attrs["preempted"].startswith("worker w0 stopped (requeued)")
    assert before[1].system_attrs["owner"].startswith("released w0 ")

    second = FakeLauncher()
    _sweeper(tmp_path, monkeypatch, "w1", second).sweep([])   # at once: a released trial needs no grace_period
    number, overrides = second.launches[0]
    assert number == 1 and "trainer.resume=true" in overrides
    assert overrides[0] == f"lr={before[1].params['lr']}"
    trials = _study(tmp_path).trials
    assert _states(tmp_path) == ["COMPLETE", "COMPLETE", "COMPLETE"]          # the budget, exactly; nothing FAIL
    assert trials[1].params == before[1].params and trials[1].user_attrs["resumed"] == 1
    assert trials[1].user_attrs["worker"] == "w1" and trials[1].value == before[1].params["lr"]
    assert trials[1].user_attrs["run_dir"] == str(tmp_path / "trial-1")
    assert [n for n, _ in second.launches] == [1, 2]


def test_b_a_silent_trial_is_waited_for_then_adopted_after_grace_period_never_failed(tmp_path, monkeypatch):
    dead = FakeLauncher(stop_at=1, code=9)               # SIGKILL-like: an exit that releases nothing
    with pytest.raises(SystemExit):
        _sweeper(tmp_path, monkeypatch, "w0", dead, budget=1).sweep([])
    assert _study(tmp_path).trials[0].system_attrs["owner"].startswith("w0 ")  # not released: presumed alive
    waits = []

    def clock_moves_on(study, complete, live):           # each wait: the silent trial gets 3 s older
        waits.append((complete, live))
        assert len(waits) < 5, "the silent trial was never adopted"
        _age(tmp_path, 0, 3 * len(waits))

    other = _sweeper(tmp_path, monkeypatch, "w1", FakeLauncher(), budget=1)
    other._wait_for_running = clock_moves_on
    other.sweep([])
    assert waits == [(0, 1), (0, 1)]                     # silent 3 s, then 6 s > grace_period 5 s: adopted
    assert [n for n, _ in other.launcher.launches] == [0]
    assert _states(tmp_path) == ["COMPLETE"]


def test_c_its_own_requeued_life_resumes_a_trial_at_once_and_a_stale_one_is_not_failed(tmp_path, monkeypatch):
    with pytest.raises(SystemExit):
        _sweeper(tmp_path, monkeypatch, "slurm-7_0", FakeLauncher(stop_at=1, code=9), budget=2).sweep([])
    _age(tmp_path, 0, 10 * GRACE)                        # held in the queue far past grace_period
    again = _sweeper(tmp_path, monkeypatch, "slurm-7_0", FakeLauncher(), budget=2)
    again.sweep([])
    assert [n for n, _ in again.launcher.launches] == [0, 1]
    assert _states(tmp_path) == ["COMPLETE", "COMPLETE"]


def test_d_a_live_trial_of_another_worker_is_not_adopted(tmp_path, monkeypatch):
    study = open_study(f"sqlite:///{tmp_path / 'optuna.db'}", "s", ["maximize"])
    trial = study.ask()
    study._storage.set_trial_system_attr(trial._trial_id, ownership.OWNER, "w0 host 1 1.0")
    study._storage.set_trial_system_attr(trial._trial_id, ownership.HEARTBEAT, 1000.0)
    frozen = ownership.stored_trials(study, (TrialState.RUNNING,))[0]
    assert ownership.why_orphan(frozen, "w1", GRACE, now=1000.0 + GRACE) is None
    assert "no heartbeat for 6 s" in ownership.why_orphan(frozen, "w1", GRACE, now=1000.0 + GRACE + 1)
    assert "earlier life of this worker" in ownership.why_orphan(frozen, "w0", GRACE, now=1000.0)
    assert ownership.adopt(study, frozen, "w1 host 2 2.0", None)
    assert not ownership.adopt(study, frozen, "w2 host 3 3.0", None)    # it read the owner before w1 took it
    assert ownership.owner(study, trial._trial_id) == "w1 host 2 2.0"
    study.tell(trial, 1.0)
    for lock in (None, str(tmp_path / "owner.lock")):                   # finished: nobody's to take
        assert not ownership.swap_owner(study, trial._trial_id, "w1 host 2 2.0", "w2 host 3 3.0", lock)


def _race(url: str, worker: str, lock, barrier, results) -> None:
    study = load_study(url, "s")
    found = ownership.orphans(study, worker, GRACE, time.time())
    barrier.wait()
    results[worker] = [t.number for t, _ in found if ownership.adopt(study, t, f"{worker} host 0 0.0", lock)]


def race_for_orphans(url: str, lock) -> None:
    """Two processes read the same 30 released trials, then adopt them at once: each trial is won exactly once."""
    study = open_study(url, "s", ["maximize"])
    for _ in range(30):
        trial = study.ask()
        study._storage.set_trial_system_attr(trial._trial_id, ownership.OWNER, RELEASED_W0)
    context = multiprocessing.get_context("spawn")
    barrier, manager = context.Barrier(2), context.Manager()
    results = manager.dict()
    racers = [context.Process(target=_race, args=(url, w, lock, barrier, results)) for w in ("w1", "w2")]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(120)
    assert [r.exitcode for r in racers] == [0, 0]
    won = dict(results)
    assert sorted(won["w1"] + won["w2"]) == list(range(30)), won      # every trial once, none twice
    owners = [ownership.owner(study, t._trial_id).split(" ")[0] for t in study.trials]
    assert owners == ["w1" if t.number in won["w1"] else "w2" for t in study.trials]


@pytest.mark.parametrize("lock", [None, "owner.lock"], ids=["sql-update", "lock-file"])
def test_e_two_workers_racing_for_the_same_orphans_adopt_each_exactly_once(tmp_path, lock):
    """sql-update: SQLite's compare-and-set (PostgreSQL's: tests/test_sweeps_postgres.py); lock-file, JournalStorage's
    (run here on SQLite; on a real journal file: tests/test_sweep_journal.py, optuna >= 4)."""
    race_for_orphans(f"sqlite:///{tmp_path / 'optuna.db'}", None if lock is None else str(tmp_path / lock))


def test_f_a_trial_without_last_pt_is_rerun_from_scratch_with_its_params(tmp_path, monkeypatch, caplog):
    with pytest.raises(SystemExit):
        _sweeper(tmp_path, monkeypatch, "w0", FakeLauncher(stop_at=1, code=128 + 15), budget=1).sweep([])
    (tmp_path / "trial-0" / "checkpoints").mkdir(parents=True)
    caplog.set_level("INFO")
    _sweeper(tmp_path, monkeypatch, "w1", FakeLauncher(), budget=1).sweep([])
    assert "adopting trial 0 (released by its preempted worker w0)" in caplog.text
    assert "from scratch (it has no last.pt)" in caplog.text
    assert _states(tmp_path) == ["COMPLETE"]


def test_g_a_late_worker_whose_trial_was_adopted_stops_beating_and_records_nothing(tmp_path, monkeypatch, caplog):
    """w0's heartbeats were late: w1 adopted its trial while it ran. w0's heartbeat stops at its next beat and w0
    does not tell the study its result (the trial is w1's to finish)."""
    sweeper = _sweeper(tmp_path, monkeypatch, "w0", None, budget=1)

    class AdoptedMeanwhile(FakeLauncher):
        def launch(self, job_overrides, initial_job_idx):
            study = _study(tmp_path)
            trial_id = study.trials[0]._trial_id
            assert ownership.swap_owner(study, trial_id, sweeper.life, "w1 host 2 2.0", None)
            beats = ownership.stored_trials(study, (TrialState.RUNNING,))[0].system_attrs[ownership.HEARTBEAT]
            time.sleep(2.5)                              # two heartbeat intervals
            assert ownership.stored_trials(study, (TrialState.RUNNING,))[0].system_attrs[ownership.HEARTBEAT] == beats
            return super().launch(job_overrides, initial_job_idx)

    class WaitsForW1(Exception):
        pass

    def wait(study, complete, live):                     # then w0 waits for w1's trial, the budget still full
        raise WaitsForW1((complete, live))

    sweeper.launcher, sweeper._wait_for_running = AdoptedMeanwhile(), wait
    caplog.set_level("INFO")
    with pytest.raises(WaitsForW1, match=r"\(0, 1\)"):
        sweeper.sweep([])
    assert "trial heartbeat stopped: the trial now belongs to w1 host 2 2.0" in caplog.text
    assert "another worker adopted it meanwhile" in caplog.text
    trial = _study(tmp_path).trials[0]
    assert trial.state == TrialState.RUNNING and "val/x" not in trial.user_attrs


def _silent_trial_of(tmp_path, monkeypatch, owner: str | None = None) -> str:
    """A trial left RUNNING by a killed worker w0 (owner `owner` when given), silent past grace_period; its
    run directory, created."""
    with pytest.raises(SystemExit):
        _sweeper(tmp_path, monkeypatch, "w0", FakeLauncher(stop_at=1, code=9), budget=1).sweep([])
    study = _study(tmp_path)
    if owner is not None:
        study._storage.set_trial_system_attr(study.trials[0]._trial_id, ownership.OWNER, owner)
    _age(tmp_path, 0, 10 * GRACE)
    run_dir = tmp_path / "trial-0"
    run_dir.mkdir()
    return run_dir


class ClaimsItsRunDir(FakeLauncher):
    """A launch that takes its trial's run directory as a run does (RunDirectoryBusy while another holds it)."""

    def __init__(self, run_dir):
        super().__init__()
        self.run_dir = run_dir

    def launch(self, job_overrides, initial_job_idx):
        with run_directory_lock(self.run_dir):
            return super().launch(job_overrides, initial_job_idx)


def test_h_a_silent_trial_still_run_by_a_live_process_of_this_host_is_left_to_it(tmp_path, monkeypatch, caplog):
    """Heartbeats late past grace_period (a stalled start-up), but a live process of this host holds the trial's run
    directory: not adopted (adopted, its run would fail with RunDirectoryBusy), said once; adopted once it ends."""
    run_dir = _silent_trial_of(tmp_path, monkeypatch)
    (run_dir / LOCK_NAME).write_text(f"{socket.gethostname()} {os.getpid()}\n")     # this live process
    waits = []

    def holder_ends_on_third_wait(study, complete, live):
        waits.append((complete, live))
        if len(waits) == 3:
            (run_dir / LOCK_NAME).unlink()

    other = _sweeper(tmp_path, monkeypatch, "w1", ClaimsItsRunDir(run_dir), budget=1)
    other._wait_for_running = holder_ends_on_third_wait
    caplog.set_level("INFO")
    other.sweep([])
    assert waits == [(0, 1)] * 3
    assert caplog.text.count(f"but process {os.getpid()} on {socket.gethostname()} still runs it") == 1
    assert [n for n, _ in other.launcher.launches] == [0]
    assert _states(tmp_path) == ["COMPLETE"]


def test_i_adopting_from_a_worker_presumed_dead_on_another_host_frees_its_run_directory(tmp_path, monkeypatch):
    """The killed worker ran on another host (its process invisible here) and left its run directory's lock: the
    adopter removes that lock, exactly that one, and resumes the trial (before: RunDirectoryBusy, the trial FAIL)."""
    run_dir = _silent_trial_of(tmp_path, monkeypatch, owner="w0 node-b 4242 1.0")
    (run_dir / LOCK_NAME).write_text("node-b 4242 77\n")
    other = _sweeper(tmp_path, monkeypatch, "w1", ClaimsItsRunDir(run_dir), budget=1)
    other.sweep([])
    assert [n for n, _ in other.launcher.launches] == [0]
    assert _states(tmp_path) == ["COMPLETE"] and not (run_dir / LOCK_NAME).exists()


def test_only_the_lock_of_the_process_presumed_dead_is_dropped(tmp_path):
    (tmp_path / LOCK_NAME).write_text("node-b 4242 77\n")
    assert not drop_lock_of(tmp_path, "node-b", 4243) and not drop_lock_of(tmp_path, "node-c", 4242)
    assert (tmp_path / LOCK_NAME).exists()
    assert drop_lock_of(tmp_path, "node-b", 4242) and not (tmp_path / LOCK_NAME).exists()
    assert not drop_lock_of(tmp_path / "absent", "node-b", 4242)
    assert ownership.process_of("released w0 node-b 4242 1.0") == ("node-b", 4242)
    assert ownership.process_of("w0 node-b 4242 1.0") == ("node-b", 4242) and ownership.process_of(None) is None
