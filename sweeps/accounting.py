"""Running trials' heartbeats and attributes, the budget, and why a trial failed: the bookkeeping of a shared study.

A running trial carries user attributes `worker` (the worker id running it now), `host`, `pid`, `run_dir`,
`sampler_seed`, and the system attributes `owner` (the worker's life, sweeps.ownership) and `heartbeat` (Unix time,
renewed every heartbeat_interval seconds while it runs). A silent trial is never failed: sweeps.ownership hands it
to another worker, which resumes it.
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
from sweeps import ownership

log = logging.getLogger(__name__)
MAX_REASON = 2000


def beat(study: optuna.Study, trial_id: int) -> None:
    study._storage.set_trial_system_attr(trial_id, ownership.HEARTBEAT, time.time())


class Heartbeat:
    """Renews the trial's heartbeat every `interval` seconds while this life owns it and it runs in this process."""

    def __init__(self, study: optuna.Study, trial_id: int, interval: int, life: str):
        self.study, self.trial_id, self.interval, self.life = study, trial_id, interval, life
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.interval):
            current = ownership.owner(self.study, self.trial_id)
            if current != self.life:        # our heartbeats were late and another worker adopted the trial
                log.warning(f"trial heartbeat stopped: the trial now belongs to {current}")
                return
            try:
                beat(self.study, self.trial_id)
            except RuntimeError as err:  # finished meanwhile: stop beating
                log.warning(f"trial heartbeat stopped: {err}")
                return

    def __enter__(self):
        beat(self.study, self.trial_id)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def claim(study: optuna.Study, trial_id: int, worker: str, **first: object) -> None:
    """Attributes of a trial this worker runs from now on (a new trial, or one it adopted); `first`: those a new
    trial gets once (run_dir, sampler_seed: an adopted trial keeps them)."""
    trial = optuna.trial.Trial(study, trial_id)
    for key, value in {"worker": worker, "host": socket.gethostname(), "pid": os.getpid(), **first}.items():
        trial.set_user_attr(key, value)


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


BUDGET_COUNTS = ("complete", "finished")


def counts_toward_budget(trial: FrozenTrial, budget_counts: str) -> bool:
    """budget_counts=complete: COMPLETE trials; finished: COMPLETE and PRUNED ones (never a surplus trial, which is
    told PRUNED without having run)."""
    if trial.state == TrialState.COMPLETE:
        return True
    return budget_counts == "finished" and trial.state == TrialState.PRUNED and not trial.user_attrs.get("surplus")


def counts(study: optuna.Study, budget_counts: str = "complete") -> tuple[int, int]:
    """(trials that count toward the budget, RUNNING trials) of the study."""
    trials = ownership.stored_trials(study, (TrialState.COMPLETE, TrialState.RUNNING, TrialState.PRUNED))
    return (sum(counts_toward_budget(t, budget_counts) for t in trials),
            sum(t.state == TrialState.RUNNING for t in trials))


def is_surplus(study: optuna.Study, number: int, budget: int, budget_counts: str = "complete") -> bool:
    """Two workers asking at the same instant can overshoot: the later trial numbers beyond the budget yield."""
    trials = ownership.stored_trials(study, (TrialState.COMPLETE, TrialState.RUNNING, TrialState.PRUNED))
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
