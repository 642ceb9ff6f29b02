"""Preemption outside plain training: mode=cv resumes at the fold and epoch, prediction stops, DataLoader workers
ignore the signals, the Slurm requeue decision, DDP ranks from SLURM_* (toy task; no Slurm needed)."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from common.cluster import preemption, slurm
from common.data.datasets import seed_worker
from tests.cli import REPO, TOY, run_cli


@pytest.mark.slow
def test_cv_signal_resumes_at_fold_and_epoch(tmp_path):
    cache = tmp_path / "cache"
    args = [*TOY, "mode=cv", "cv.folds=2", "trainer.max_epochs=2", "model.dropout=0.3"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    straight = subprocess.Popen([sys.executable, str(REPO / "run.py"), *args, "logger=none",
                                 f"hydra.run.dir={tmp_path / 'straight'}", f"paths.cache_dir={cache}"],
                                cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
    run_dir = tmp_path / "resumed"
    proc = subprocess.Popen([sys.executable, str(REPO / "run.py"), *args, "loss.sleep_s=0.3", "logger=none",
                             f"hydra.run.dir={run_dir}", f"paths.cache_dir={cache}", "trainer.progress=plain"],
                            cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    fold1 = run_dir / "fold_1" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (fold1.is_file() and fold1.read_text().strip()):
        time.sleep(0.2)
    time.sleep(0.5)                                   # fold 1, epoch 1
    proc.send_signal(signal.SIGUSR1)
    out = proc.communicate(timeout=120)[0]
    assert straight.wait(timeout=300) == 0
    assert proc.returncode == 128 + signal.SIGUSR1, out[-3000:]
    last = torch.load(run_dir / "fold_1" / "checkpoints" / "last.pt", weights_only=True)
    assert last["epoch"] == 1 and 0 < last["fit_state"]["batches_done"] < 6
    assert not (run_dir / "oof.csv").exists()
    again = run_cli(args, run_dir, cache)              # the same command: resume=auto
    assert f"resumed from {run_dir / 'fold_1' / 'checkpoints' / 'last.pt'} at epoch 1" in again.stdout
    assert (run_dir / "oof.csv").read_text() == (tmp_path / "straight" / "oof.csv").read_text()


class _Handlers(Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        return torch.tensor([int(signal.getsignal(s) == signal.SIG_IGN) for s in preemption.SIGNALS])


def test_dataloader_workers_ignore_preemption_signals():
    loader = DataLoader(_Handlers(), batch_size=2, num_workers=1, worker_init_fn=seed_worker)
    assert next(iter(loader)).tolist() == [[1, 1, 1], [1, 1, 1]]


def test_prediction_stops_at_a_signal():
    from omegaconf import OmegaConf

    from common.cluster.distributed import DistContext
    from common.training.trainer import Preempted, Trainer
    cfg = OmegaConf.create({"trainer": {"precision": "fp32", "progress": "off", "pin_memory": False,
                                        "channels_last": False},
                            "data": {"batch_size": 1, "num_workers": 0}, "seed": 0})
    trainer = Trainer(cfg, "/nonexistent", None, DistContext())
    items = torch.utils.data.TensorDataset(torch.zeros(3, 2))
    with preemption.handlers():
        os.kill(os.getpid(), signal.SIGUSR2)
        with pytest.raises(Preempted):
            list(trainer.infer(torch.nn.Linear(2, 1), items, lambda rows: torch.stack([r[0] for r in rows])))
    assert preemption.requested() is None      # handled within the block: a later trainer in this process runs


@pytest.mark.parametrize("signum, allowed, expected", [(signal.SIGUSR1, True, 0), (signal.SIGUSR2, True, 0),
                                                       (signal.SIGUSR1, False, 128 + 10),
                                                       (signal.SIGTERM, True, 128 + 15)])
def test_requeue_only_for_usr_signals_when_allowed(monkeypatch, signum, allowed, expected):
    calls = []
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.setattr(slurm, "requeue_allowed", lambda: allowed)
    monkeypatch.setattr(slurm, "requeue", lambda: calls.append("requeue"))
    with pytest.raises(SystemExit) as stop:
        preemption.stop(signum, is_main=True)
    assert stop.value.code == expected
    assert calls == (["requeue"] if expected == 0 else [])


def test_slurm_job_id_of_an_array_task(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "57")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "55")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    assert slurm.job_id() == "55_2"


def test_ddp_environment_from_srun():
    env = {"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123",
           "SLURM_STEP_NODELIST": "gpu7"}
    assert slurm.ddp_environment(env) == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                                          "MASTER_ADDR": "gpu7", "MASTER_PORT": "20123"}
    assert slurm.ddp_environment({**env, "SLURM_STEP_NUM_TASKS": "1"}) is None       # one task: no DDP
    assert slurm.ddp_environment({"SLURM_JOB_ID": "9", "SLURM_PROCID": "0"}) is None  # the batch script itself


def test_sigterm_outside_a_run_ends_the_process_unless_a_preemption_is_under_way():
    """run.py installs the handlers first thing; before any run (or between sweep trials) SIGTERM still ends the
    process at once. Once a preemption signal was caught (SIGUSR1, kept for the run to come), SIGTERM is kept too:
    the process is ending at its next safe point anyway, and a sweep worker whose job requeued itself gets Slurm's
    SIGTERM while it records its trial as preempted."""
    start = "import os, signal, time\nfrom common.cluster import preemption\npreemption.install()\n"
    proc = subprocess.run([sys.executable, "-c", start + "os.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(30)\n"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    code = (start + "os.kill(os.getpid(), signal.SIGUSR1)\nos.kill(os.getpid(), signal.SIGTERM)\n"
            "assert preemption._received == [signal.SIGUSR1, signal.SIGTERM], preemption._received\n"
            "assert preemption.requested() == signal.SIGUSR1\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
