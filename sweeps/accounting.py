"""Who runs which trial, which trials are dead, and why a trial failed: the bookkeeping of a shared study.

A running trial carries user attributes `worker` (the worker id), `host`, `pid`, `run_dir`, `sampler_seed`, and
the system attribute `heartbeat` (Unix time, renewed every heartbeat_interval seconds by its worker). A RUNNING
trial whose heartbeat is older than grace_period belongs to a dead worker: its own worker, restarted (Slurm
requeue, same SWEEP_WORKER_ID), resumes it; any other worker marks it FAIL with the reason, so that it never
holds a budget slot.
"""
from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from typing import Optional

import optuna
from optuna.trial import FrozenTrial, TrialState

from common.utils.secrets import redact

log = logging.getLogger(__name__)
HEARTBEAT = "heartbeat"
MAX_REASON = 2000


def last_beat(trial: FrozenTrial) -> float:
    beat = trial.system_attrs.get(HEARTBEAT)
    return float(beat) if beat is not None else trial.datetime_start.timestamp()


def beat(study: optuna.Study, trial_id: int) -> None:
    study._storage.set_trial_system_attr(trial_id, HEARTBEAT, time.time())


class Heartbeat:
    """Renews the trial's heartbeat every `interval` seconds while the trial runs in this process."""

    def __init__(self, study: optuna.Study, trial_id: int, interval: int):
        self.study, self.trial_id, self.interval = study, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.interval):
            try:
                beat(self.study, self.trial_id)
            except RuntimeError as err:  # finished by another worker (our heartbeats were late): stop beating
                log.warning(f"trial heartbeat stopped: {err}")
                return

    def __enter__(self):
        beat(self.study, self.trial_id)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def claim(trial: optuna.trial.Trial, worker: str, run_dir: str, sampler_seed: int) -> None:
    for key, value in (("worker", worker), ("host", socket.gethostname()), ("pid", os.getpid()),
                       ("run_dir", run_dir), ("sampler_seed", sampler_seed)):
        trial.set_user_attr(key, value)


def running(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))


def is_stale(trial: FrozenTrial, grace_period: int) -> bool:
    return time.time() - last_beat(trial) > grace_period


def mark_failed(study: optuna.Study, trial_id: int, number: int, reason: str) -> bool:
    """FAIL with user attribute fail_reason; False when another worker finished the trial first."""
    reason = redact(reason)[:MAX_REASON]
    try:
        optuna.trial.Trial(study, trial_id).set_user_attr("fail_reason", reason)
        study.tell(number, state=TrialState.FAIL)
    except (RuntimeError, ValueError) as err:  # already finished (optuna raises one or the other by version)
        log.info(f"trial {number} was finished by another worker: {err}")
        return False
    log.warning(f"trial {number} failed: {reason}")
    return True


def fail_dead_trials(study: optuna.Study, grace_period: int, me: str) -> int:
    """Mark FAIL the RUNNING trials of other workers whose heartbeat is older than grace_period."""
    failed = 0
    for trial in running(study):
        if trial.user_attrs.get("worker") == me or not is_stale(trial, grace_period):
            continue
        age = time.time() - last_beat(trial)
        reason = (f"worker {trial.user_attrs.get('worker', '?')} (host {trial.user_attrs.get('host', '?')}, pid "
                  f"{trial.user_attrs.get('pid', '?')}) stopped sending heartbeats {age:.0f} s ago (grace_period "
                  f"{grace_period} s): killed, lost its node, or was not requeued in time; "
                  f"run_dir {trial.user_attrs.get('run_dir', '?')}")
        failed += mark_failed(study, trial._trial_id, trial.number, reason)
    return failed


BUDGET_COUNTS = ("complete", "finished")


def counts_toward_budget(trial: FrozenTrial, budget_counts: str) -> bool:
    """budget_counts=complete: COMPLETE trials; finished: COMPLETE and PRUNED ones (never a surplus trial, which is
    told PRUNED without having run)."""
    if trial.state == TrialState.COMPLETE:
        return True
    return budget_counts == "finished" and trial.state == TrialState.PRUNED and not trial.user_attrs.get("surplus")


def counts(study: optuna.Study, budget_counts: str = "complete") -> tuple[int, int]:
    """(trials that count toward the budget, RUNNING trials) of the study."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING, TrialState.PRUNED))
    return (sum(counts_toward_budget(t, budget_counts) for t in trials),
            sum(t.state == TrialState.RUNNING for t in trials))


def is_surplus(study: optuna.Study, number: int, budget: int, budget_counts: str = "complete") -> bool:
    """Two workers asking at the same instant can overshoot: the later trial numbers beyond the budget yield."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING, TrialState.PRUNED))
    active = sorted(t.number for t in trials if t.state == TrialState.RUNNING or counts_toward_budget(t, budget_counts))
    return active.index(number) >= budget


def failure_reason(err: BaseException) -> str:
    """The fail_reason of a trial whose run raised `err`: diverged, out of memory, or the exception."""
    name, text = type(err).__name__, str(err)
    if name == "OutOfMemoryError" or "out of memory" in text.lower():
        return f"out of memory: {name}: {text}"
    if any(cls.__name__ == "NonFiniteLossError" for cls in type(err).__mro__):     # Diverged too
        return f"diverged: {text}"
    return f"{name}: {text}"


def value_failure(value, monitor: str, run_dir: str) -> Optional[str]:
    """The fail_reason of a run that returned `value` for `monitor`, or None when the value is usable."""
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        return (f"diverged: the monitored metric {monitor} was never finite (the run returned {value!r}); see "
                f"{run_dir}/metrics.jsonl")
    return None
