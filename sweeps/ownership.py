"""Who runs a RUNNING trial, and handing an orphaned one over: a trial's work is never lost to queue time.

A trial stays RUNNING until it is told COMPLETE, PRUNED or FAIL by the worker that runs it; it is never failed for
being silent. Its system attribute `owner` names the life of the worker running it (`<worker id> <host> <pid>
<start time>`, one per process: a requeued Slurm job keeps its worker id but is a new life). A RUNNING trial is
an orphan, to be adopted by the next worker that looks, when
- its owner stopped it on a preemption signal (the owner then reads `released <owner>`), or
- its owner has this worker's id (an earlier life of this worker: a requeued job), or
- its heartbeat is older than grace_period (the owner is presumed dead: killed, cancelled, its node lost).
A worker adopts an orphan with a compare-and-set on `owner`, so that of two workers racing for a trial exactly one
wins it: on an SQL storage one `UPDATE ... WHERE value = <the owner it read>` (an INSERT for a trial without one,
under the table's unique (trial, key) constraint), on SQLite and PostgreSQL alike; on a JournalStorage file (which
has no such statement) the read, compare and write under an exclusive lock on `<journal file>.owner.lock` (flock:
the shared filesystem must support it, as the journal's own lock needs).

Everything here reads the database, never optuna's per-process cache of the trials this process created (which
would not see another worker adopt or finish them).
"""
from __future__ import annotations

import json
import os
import socket
import time
from typing import Optional

import optuna
import sqlalchemy
from optuna.storages._rdb import models
from optuna.trial import FrozenTrial, TrialState

from common.utils.atomic import file_lock

OWNER = "owner"
HEARTBEAT = "heartbeat"
RELEASED = "released "


def life_of(worker: str) -> str:
    """This process's owner value: the worker id, then what tells its lives apart."""
    return f"{worker} {socket.gethostname()} {os.getpid()} {time.time():.6f}"


def _fields(owner: str) -> list[str]:
    """An owner value's fields (worker id, host, pid, start time), released or not."""
    return (owner[len(RELEASED):] if owner.startswith(RELEASED) else owner).split(" ")


def worker_of(owner: str) -> str:
    """The worker id of an owner value (released or not)."""
    return _fields(owner)[0]


def process_of(owner: Optional[str]) -> Optional[tuple[str, int]]:
    """(host, pid) of an owner value (released or not), or None for one without them."""
    parts = _fields(owner or "")
    return (parts[1], int(parts[2])) if len(parts) >= 3 and parts[2].isdigit() else None


def lock_for(url: str) -> Optional[str]:
    """The lock file of swap_owner for a storage URL: one for a journal file, None for an SQL database."""
    return url[len("journal://"):] + ".owner.lock" if url.startswith("journal:///") else None


def stored(study: optuna.Study):
    """The study's storage itself, under optuna's per-process cache of the trials this process created."""
    storage = study._storage
    return storage._backend if isinstance(storage, optuna.storages._cached_storage._CachedStorage) else storage


def stored_trials(study: optuna.Study, states: tuple[TrialState, ...]) -> list[FrozenTrial]:
    """The study's trials in `states`, read from the storage now."""
    return stored(study).get_all_trials(study._study_id, deepcopy=False, states=states)


def owner(study: optuna.Study, trial_id: int) -> Optional[str]:
    return stored(study).get_trial(trial_id).system_attrs.get(OWNER)


def swap_owner(study: optuna.Study, trial_id: int, old: Optional[str], new: str, lock: Optional[str]) -> bool:
    """Compare-and-set: make `new` the owner of the RUNNING trial if its owner is still `old` (None: it has none
    yet). True for exactly one of any number of workers swapping from the same `old`; False once it is finished.
    `lock`: a lock file (lock_for) to do it under, for storages without SQL; None: one SQL statement."""
    if lock is not None:
        return _locked_swap(stored(study), trial_id, old, new, lock)
    storage = stored(study)
    if not isinstance(storage, optuna.storages.RDBStorage):
        raise ValueError(f"swap_owner without a lock file needs an SQL storage, not {type(storage).__name__}")
    table, trials = models.TrialSystemAttributeModel.__table__, models.TrialModel.__table__
    running = sqlalchemy.select(trials.c.trial_id).where(trials.c.trial_id == trial_id,
                                                         trials.c.state == TrialState.RUNNING)
    try:
        with storage.engine.begin() as conn:
            if old is None:      # a trial claimed before owners were recorded: the first INSERT wins
                if conn.execute(running).first() is None:
                    return False
                conn.execute(table.insert().values(trial_id=trial_id, key=OWNER, value_json=json.dumps(new)))
                return True
            changed = conn.execute(table.update().where(
                table.c.trial_id.in_(running), table.c.key == OWNER, table.c.value_json == json.dumps(old))
                .values(value_json=json.dumps(new)))
            return changed.rowcount == 1
    except sqlalchemy.exc.IntegrityError:       # another worker inserted the owner first
        return False


def _locked_swap(storage, trial_id: int, old: Optional[str], new: str, lock: str) -> bool:
    with file_lock(lock):
        trial = storage.get_trial(trial_id)
        if trial.state != TrialState.RUNNING or trial.system_attrs.get(OWNER) != old:
            return False
        storage.set_trial_system_attr(trial_id, OWNER, new)
        return True


def last_beat(trial: FrozenTrial) -> float:
    beat = trial.system_attrs.get(HEARTBEAT)
    return float(beat) if beat is not None else trial.datetime_start.timestamp()


def why_orphan(trial: FrozenTrial, worker: str, grace_period: float, now: float) -> Optional[str]:
    """Why this RUNNING trial is an orphan that `worker` may adopt, or None (its owner is alive)."""
    current = trial.system_attrs.get(OWNER) or trial.user_attrs.get("worker", "?")
    if current.startswith(RELEASED):
        return f"released by its preempted worker {worker_of(current)}"
    if worker_of(current) == worker:
        return f"left by an earlier life of this worker ({worker})"
    silent = now - last_beat(trial)
    if silent > grace_period:
        return f"its worker {worker_of(current)} sent no heartbeat for {silent:.0f} s (grace_period {grace_period} s)"
    return None


def orphans(study: optuna.Study, worker: str, grace_period: float, now: float) -> list[tuple[FrozenTrial, str]]:
    """The RUNNING trials `worker` may adopt, with the reason: its own earlier lives' first, then by number."""
    found = [(t, why) for t in stored_trials(study, (TrialState.RUNNING,))
             if (why := why_orphan(t, worker, grace_period, now)) is not None]
    return sorted(found, key=lambda pair: (worker_of(pair[0].system_attrs.get(OWNER) or "") != worker,
                                           pair[0].number))


def take_new(study: optuna.Study, trial_id: int, life: str) -> None:
    """The owner of a trial this worker has just asked for (nobody else knows it yet: no compare needed)."""
    study._storage.set_trial_system_attr(trial_id, OWNER, life)


def adopt(study: optuna.Study, trial: FrozenTrial, life: str, lock: Optional[str]) -> bool:
    """Take over `trial` for this life (compare-and-set on the owner read with it); True when this worker won it."""
    return swap_owner(study, trial._trial_id, trial.system_attrs.get(OWNER), life, lock)


def release(study: optuna.Study, trial_id: int, life: str, lock: Optional[str]) -> bool:
    """A preempted worker hands its trial to the next worker that looks (no grace_period to wait)."""
    return swap_owner(study, trial_id, life, RELEASED + life, lock)
