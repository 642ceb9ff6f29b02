"""hydra/launcher=slurm: hydra-submitit-launcher's Slurm launcher, with the request checked against the partition
before anything is queued (common.cluster.slurm_submit's check, each failure naming the hydra.launcher key and
the limit), and gpus_per_node null meaning 1 on a partition with GPUs, 0 on one without gpu GRES."""
from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import Sequence

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

from common.cluster.slurm_submit import Flags, Partition, RequestError, check_request, partition_info

PREFIX = "hydra.launcher."


def launcher_flags(tasks_per_node: int) -> Flags:
    cpus = f"{PREFIX}cpus_per_task" + (f" x tasks_per_node {tasks_per_node}" if tasks_per_node > 1 else "")
    return Flags(f"{PREFIX}nodes", f"{PREFIX}gpus_per_node", cpus, f"{PREFIX}mem_gb", f"{PREFIX}timeout_min", "=",
                 lambda gb: int(float(gb) * 1024), lambda mb: str(mb // 1024), float)


def checked_params(params: dict, part: Partition) -> dict:
    """The launcher's parameters with gpus_per_node resolved; RequestError for what the partition cannot run."""
    resolved = dict(params)
    if resolved.get("gpus_per_node") is None:
        resolved["gpus_per_node"] = 1 if part.max_gpus else 0
    tasks = int(resolved.get("tasks_per_node") or 1)
    request = SimpleNamespace(nodes=int(resolved.get("nodes") or 1), gpus=int(resolved["gpus_per_node"]), cpus=int(resolved["cpus_per_task"]) * tasks,
                              mem=resolved["mem_gb"], time=resolved["timeout_min"])
    check_request(request, part, launcher_flags(tasks))
    return resolved


class CheckedSlurmLauncher(SlurmLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        try:
            self.params = checked_params(self.params, partition_info(self.params.get("partition") or "", f"{PREFIX}partition="))
        except RequestError as err:     # a message, not a traceback: nothing was queued
            sys.exit(f"hydra/launcher=slurm: nothing submitted: {err}")
        return super().launch(job_overrides, initial_job_idx)
