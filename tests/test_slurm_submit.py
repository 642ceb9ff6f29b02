"""common.cluster.slurm_submit without a cluster: Slurm's time / memory / gres formats and the partition check."""
import argparse

import pytest

from common.cluster.slurm_submit import Partition, RequestError, _gpus_of, check_request, megabytes, minutes


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
    part = Partition("cpu", max_minutes=240, max_cpus=16, max_mem_mb=64000, max_gpus=0)
    fits = argparse.Namespace(gpus=0, cpus=16, mem="62G", time="4:00:00")
    check_request(fits, part)
    too_much = argparse.Namespace(gpus=1, cpus=32, mem="128G", time="1-0")
    with pytest.raises(RequestError) as err:
        check_request(too_much, part)
    for text in ("--gpus 1: partition cpu has no GPUs", "--cpus 32", "--mem 128G", "--time 1-0"):
        assert text in str(err.value)
