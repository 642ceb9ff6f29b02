"""common.cluster.slurm_submit and the checked submitit launcher without a cluster: Slurm's time / memory / gres
formats, the partition check, log names."""
import argparse

import pytest

from common.cluster.slurm_submit import (REPO, Partition, RequestError, _gpus_of, check_request, megabytes, minutes,
                                        sbatch_options)
from hydra_plugins.vfm_launchers.checked_slurm import checked_params


@pytest.mark.parametrize("text, expected", [("90", 90), ("1:30", 1.5), ("2:00:00", 120), ("1-0", 1440),
                                            ("1-2:30", 1590), ("1-02:30:30", 1590.5), ("UNLIMITED", float("inf"))])
def test_slurm_time_formats(text, expected):
    assert minutes(text) == expected


def test_memory_and_gpu_formats():
    assert megabytes("32G") == 32768 and megabytes("16000M") == 16000 and megabytes("500") == 500
    with pytest.raises(RequestError, match="--mem '32 gigs'"):
        megabytes("32 gigs")
    assert _gpus_of("gpu:a100:4(S:0-1)") == 4 and _gpus_of("gpu:2,shard:8") == 2 and _gpus_of("(null)") == 0


def test_partition_check_names_every_flag_to_change():
    part = Partition("cpu", max_minutes=240, max_cpus=16, max_mem_mb=64000, max_gpus=0, max_nodes=4)
    fits = argparse.Namespace(nodes=4, gpus=0, cpus=16, mem="62G", time="4:00:00")
    check_request(fits, part)
    too_much = argparse.Namespace(nodes=5, gpus=1, cpus=32, mem="128G", time="1-0")
    with pytest.raises(RequestError) as err:
        check_request(too_much, part)
    for text in ("--nodes 5: partition cpu has 4 nodes", "--gpus 1: partition cpu has no GPUs", "--cpus 32", "--mem 128G", "--time 1-0"):
        assert text in str(err.value)


def test_array_logs_are_named_after_the_array_and_the_task():
    args = argparse.Namespace(nodes=1, cpus=1, mem="1G", time="10", signal_s=120, gpus=0, account="", array="0-3",
                              script="sweeps/worker.sbatch")
    assert any(o.endswith("/%x-%A_%a.out") for o in sbatch_options(args, "debug"))
    assert "--signal=B:USR1@120" in sbatch_options(args, "debug")            # to the batch shell, which execs Python
    args.array, args.script, args.nodes = "", "sweeps/multinode.sbatch", 2
    assert any(o.endswith("/%x-%j.out") for o in sbatch_options(args, "debug"))
    assert {"--signal=USR1@120", "--nodes=2"} <= set(sbatch_options(args, "debug"))   # every srun step process
    assert "#SBATCH --output=slurm-%x-%A_%a.out" in (REPO / "sweeps" / "worker.sbatch").read_text()


def test_submitit_launcher_request_is_checked_with_its_own_keys():
    cpu = Partition("debug", max_minutes=60, max_cpus=2, max_mem_mb=24105, max_gpus=0, max_nodes=1)
    gpu = Partition("gpu", max_minutes=60, max_cpus=64, max_mem_mb=512000, max_gpus=8, max_nodes=8)
    fits = {"gpus_per_node": None, "cpus_per_task": 2, "mem_gb": 4, "timeout_min": 60, "tasks_per_node": 1}
    assert checked_params(fits, cpu)["gpus_per_node"] == 0 and checked_params(fits, gpu)["gpus_per_node"] == 1
    assert fits["gpus_per_node"] is None                                   # the launcher's own dict is not edited
    too_much = {"gpus_per_node": 1, "cpus_per_task": 2, "mem_gb": 32, "timeout_min": 90, "tasks_per_node": 2,
                "nodes": 2}
    with pytest.raises(RequestError) as err:
        checked_params(too_much, cpu)
    for text in ("hydra.launcher.nodes=2: partition debug has 1 nodes",
                 "hydra.launcher.gpus_per_node=1: partition debug has no GPUs (no gpu GRES); "
                 "pass hydra.launcher.gpus_per_node=0",
                 "hydra.launcher.cpus_per_task x tasks_per_node 2=4: the largest node of partition debug has 2 CPUs",
                 "hydra.launcher.mem_gb=32: the largest node of partition debug has 24105 MB; "
                 "pass hydra.launcher.mem_gb=23 or less",
                 "hydra.launcher.timeout_min=90: partition debug allows at most 60 minutes (MaxTime)"):
        assert text in str(err.value)
