"""DDP under torchrun (gloo, 2 CPU processes) trains like one process with the same global batch."""
import sys

import pytest
import torch

from tests.cli import REPO, TOY, run_cli


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path, monkeypatch):
    common = [*TOY, "model.dropout=0.0", "trainer.max_epochs=1", "trainer.device=cpu"]
    run_cli([*common, "data.batch_size=8"], tmp_path / "single", tmp_path / "cache")
    import subprocess
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           str(REPO / "run.py"), *common, "data.batch_size=4", f"hydra.run.dir={tmp_path / 'ddp'}",
           f"paths.cache_dir={tmp_path / 'cache'}", "logger=none", "trainer.progress=plain"]
    env = {"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    single = torch.load(tmp_path / "single" / "checkpoints" / "last.pt", weights_only=True)
    ddp = torch.load(tmp_path / "ddp" / "checkpoints" / "last.pt", weights_only=True)
    assert single["step"] == ddp["step"] == 3
    for key, value in single["model"].items():
        torch.testing.assert_close(ddp["model"][key], value, rtol=1e-4, atol=1e-5)
