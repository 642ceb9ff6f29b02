"""The multi-node path of sweeps/multinode.sbatch without a second machine: two `slurm_job.sh --torchrun` (the
line each node's srun task runs), as two nodes of one job (SLURM_NNODES=2, one process each), meet through c10d on
localhost, get ranks 0 and 1 of 2 (local rank 0 each) and train as one process with the global batch."""
import os
import socket
import subprocess

import pytest
import torch

from tests.cli import REPO, TOY, run_cli

COMMON = [*TOY, "model.dropout=0.0", "trainer.max_epochs=1", "trainer.device=cpu", "logger=none",
          "trainer.progress=plain"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_torchrun_nodes_rendezvous_and_match_one_process(tmp_path):
    run_cli([*COMMON, "data.batch_size=8"], tmp_path / "single", tmp_path / "cache")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "SLURM_NNODES": "2", "SLURM_JOB_ID": f"{os.getpid()}", "VFM_NPROC_PER_NODE": "1",
           "VFM_RDZV_PORT": str(_free_port())}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = ["bash", str(REPO / "sweeps" / "slurm_job.sh"), str(REPO), "--torchrun", "localhost", *COMMON,
           "data.batch_size=4", f"hydra.run.dir={tmp_path / 'ddp'}", f"paths.cache_dir={tmp_path / 'cache'}"]
    nodes = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(out[-3000:] for out in outputs)
    assert "--nnodes=2 --nproc_per_node=1 --rdzv_backend=c10d --rdzv_endpoint=localhost:" in outputs[0]
    log = (tmp_path / "ddp" / "run.log").read_text()
    for rank in (0, 1):
        assert f"[ddp] rank {rank} of 2 (local rank 0)" in log, log[-3000:]
    single = torch.load(tmp_path / "single" / "checkpoints" / "last.pt", weights_only=True)
    ddp = torch.load(tmp_path / "ddp" / "checkpoints" / "last.pt", weights_only=True)
    assert single["step"] == ddp["step"] == 3
    for key, value in single["model"].items():
        torch.testing.assert_close(ddp["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
