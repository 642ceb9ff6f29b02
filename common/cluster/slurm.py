"""What a process learns about its Slurm job: its id, whether it may be requeued, its nodes; requeue itself."""
from __future__ import annotations

import logging
import os
import re
import subprocess

log = logging.getLogger(__name__)


def job_id() -> str | None:
    """The id `scontrol requeue` needs: <array job>_<task> for an array task, else SLURM_JOB_ID; None outside."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID") or None


def _scontrol(*args: str) -> str:
    try:
        proc = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=60)
    except FileNotFoundError as err:
        raise RuntimeError(f"SLURM_JOB_ID is set but scontrol is not on PATH ({err})") from err
    if proc.returncode != 0:
        raise RuntimeError(f"scontrol {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def requeue_allowed() -> bool:
    """The job's Requeue flag (sbatch --requeue, or the cluster's JobRequeue=1 without --no-requeue)."""
    found = re.search(r"\bRequeue=(\d)", _scontrol("show", "job", "-o", os.environ["SLURM_JOB_ID"]))
    return bool(found and found.group(1) == "1")


def requeue() -> None:
    job = job_id()
    _scontrol("requeue", job)
    log.info(f"[slurm] requeued job {job}: it resumes from last.pt when it starts again")


def hostnames(nodelist: str) -> list[str]:
    """Expand a Slurm node list (`node[01-03],gpu7`) with scontrol; a plain host name needs no scontrol."""
    if not re.search(r"[\[,]", nodelist):
        return [nodelist]
    return _scontrol("show", "hostnames", nodelist).split()


def ddp_environment(env: dict[str, str]) -> dict[str, str] | None:
    """RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT of an `srun -n N` task (N > 1), or None.

    srun sets SLURM_STEP_NUM_TASKS for its tasks only (not for the batch script, even with sbatch -n N). The
    rendezvous is the step's first node, on MASTER_PORT when given, else on a port derived from the job id.
    """
    tasks = int(env.get("SLURM_STEP_NUM_TASKS", "1"))
    if tasks <= 1 or "SLURM_PROCID" not in env:
        return None
    nodelist = env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": str(tasks), "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": env.get("MASTER_ADDR") or hostnames(nodelist)[0],
            "MASTER_PORT": env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)}
