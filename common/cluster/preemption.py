"""Preemption: a signal asks the run to checkpoint and stop; under Slurm the job is requeued and resumes.

- SIGUSR1 (`--signal=B:USR1@N` in the sbatch scripts: N seconds before the time limit, or `scancel --signal=USR1`)
  and SIGUSR2 (submitit, `hydra/launcher=slurm`) mean "the time is up, come back later": the trainer writes
  last.pt at the next optimiser step, then, under Slurm with requeue allowed, `scontrol requeue`s its own job and
  exits 0 (the job is not recorded FAILED); the requeued job finds last.pt in its run directory and resumes.
- SIGTERM (`scancel`, `scontrol requeue` by someone else, the time limit without --signal) writes last.pt and
  exits 128 + 15 without requeueing: a cancelled job must stay cancelled; Slurm requeues it itself when asked to.
- DataLoader workers ignore all three (`ignore_in_worker`), so that only the main process acts.
"""
from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)

_received: list[int] = []      # signals caught while the handlers are installed, in order
_running: list[bool] = []      # non-empty while a run (common.runs.app.run) can act on them


class Preempted(Exception):
    def __init__(self, signum: int):
        super().__init__(f"signal {signal.Signals(signum).name}")
        self.signum = signum


def _handle(signum, frame) -> None:
    if signum == signal.SIGTERM and not _running and not _received:   # nothing to save yet (start-up, between
        # sweep trials); once a preemption is under way the process is ending anyway: a job that requeued itself
        # gets Slurm's SIGTERM while its sweep worker records the trial as preempted
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _received.append(signum)
    print(f"[preemption] caught {signal.Signals(signum).name}: stopping at the next safe point", flush=True)


def install() -> None:
    """Catch the preemption signals for the rest of the process: run.py does it first thing, so that a SIGUSR1 /
    SIGUSR2 sent while Python imports and composes the config is kept for the run (and does not kill the job).
    SIGTERM outside a run keeps its default action (the process ends), unless a preemption is already under way."""
    for signum in SIGNALS:
        signal.signal(signum, _handle)


@contextmanager
def handlers() -> Iterator[None]:
    """Catch the preemption signals for the block (main thread only; elsewhere signals cannot be set); a signal
    caught since `install` still counts."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if signal.getsignal(SIGNALS[1]) is not _handle:   # not installed at start-up: no earlier signal counts
        _received.clear()
    previous = {s: signal.signal(s, _handle) for s in SIGNALS}
    _running.append(True)
    try:
        yield
    finally:
        _running.pop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if signal.getsignal(SIGNALS[1]) is not _handle:   # nothing left to act on a caught signal: forget it
            _received.clear()


def requested() -> int | None:
    """The first preemption signal received, or None."""
    return _received[0] if _received else None


def check() -> None:
    """Raise Preempted when a signal was received (single process; DDP ranks use `agreed`)."""
    if _received:
        raise Preempted(_received[0])


def agreed(ctx) -> int | None:
    """The signal any rank received (DDP: every rank stops at the same step, or all-reduces would hang)."""
    if not ctx.enabled:
        return requested()
    import torch  # not at module level: run.py imports this module before anything heavy
    flag = torch.tensor([requested() or 0], dtype=torch.int64, device=ctx.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag.item()) or None


def ignore_in_worker() -> None:
    """DataLoader worker_init_fn part: preemption signals are for the main process only."""
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def stop(signum: int, is_main: bool) -> None:
    """End the process after a preemption: requeue the Slurm job when allowed (exit 0), else exit 128 + signum."""
    from common.cluster import slurm
    if signum in REQUEUE_SIGNALS and slurm.job_id() is not None:
        if is_main and slurm.requeue_allowed():
            slurm.requeue()
            raise SystemExit(0)
        if not is_main:
            raise SystemExit(0)
        print(f"[preemption] Slurm job {slurm.job_id()} does not allow requeue (sbatch --no-requeue or "
              f"JobRequeue=0): resubmit the same command to continue from last.pt", flush=True)
    raise SystemExit(128 + signum)
