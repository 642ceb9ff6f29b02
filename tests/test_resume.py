"""Exact resume: a run preempted in the middle of an epoch and resumed ends bitwise equal (CPU) to an
uninterrupted run, with dropout in the model and python / numpy / torch / albumentations draws in the data,
for num_workers 0 and 2 (in-process, toy task); which generator states a resume uses (the saved ones in the middle
of an epoch, the epoch's reseed at an epoch boundary)."""
import json
import os
import random
import shutil
import signal

import albumentations as A
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from common.cluster import preemption
from common.tracking.tracker import Tracker
from common.training.checkpoint import load_checkpoint, rng_state
from common.training.trainer import Preempted, Trainer
from common.utils.seed import isolated_rng, seed_everything
from tests.cli import REPO
from tests.toy.task import ToyCriterion, ToyDataset, ToyTask


class NoisyToy(ToyDataset):
    """Toy items with augmentation drawn from every generator a task's data pipeline may use."""

    def __init__(self, root, split):
        super().__init__(root, split)
        self.pipeline = A.Compose([A.GaussNoise(std_range=(0.05, 0.1), p=1.0)])

    def __getitem__(self, i):
        item = super().__getitem__(i)
        hwc = item["image"].permute(1, 2, 0).numpy()
        image = self.pipeline(image=hwc)["image"] + np.random.normal(0, 0.05) + random.uniform(0, 0.05)
        item["image"] = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1) + 0.05 * torch.rand(1)
        return item


class SignalAt(ToyCriterion):
    """Sends this process SIGUSR1 during training call `at`, as Slurm would (`--signal=B:USR1@N`)."""

    def __init__(self, at: int | None):
        super().__init__()
        self.at = at

    def forward(self, outputs, batch):
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                os.kill(os.getpid(), signal.SIGUSR1)
        return {"mse": ((outputs["pred"] - batch["target"]) ** 2).mean()}


def _config(tmp_path, num_workers: int):
    toy_conf = REPO / "tests" / "toy" / "conf"
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["task=toy", f"hydra.searchpath=[file://{toy_conf}]", "logger=none",
                                           "trainer.max_epochs=2", "trainer.progress=off", "model.dropout=0.3",
                                           f"data.num_workers={num_workers}", "trainer.device=cpu"])
    OmegaConf.update(cfg, "paths", {"root_dir": str(tmp_path), "log_dir": str(tmp_path / "logs"),
                                    "cache_dir": str(tmp_path / "cache"), "output_dir": str(tmp_path)})
    return cfg


class Draws(SignalAt):
    """Records, per training batch, its items and one draw of each of the main process's generators (torch,
    numpy, python: what dropout or mixup in the training step would draw from)."""

    def __init__(self, at: int | None = None):
        super().__init__(at)
        self.draws = []

    def forward(self, outputs, batch):
        if self.training and torch.is_grad_enabled():      # Trainer.evaluate calls it under no_grad
            self.draws.append((list(batch["id"]), float(torch.rand(())), float(np.random.rand()), random.random()))
        return super().forward(outputs, batch)


def _fit(cfg, run_dir, signal_at: int | None, criterion: SignalAt | None = None):
    """One process's share of a run: build as app.run does, fit; returns the Preempted it raised, if any."""
    from common.cluster.distributed import DistContext
    from common.training.dataset_root import data_root
    seed_everything(int(cfg.seed))
    task = ToyTask(cfg)
    root = data_root(cfg, task)
    train, val = NoisyToy(root, "train"), ToyDataset(root, "val")
    model, metric = task.build_model({}), task.build_metric({})
    trainer = Trainer(cfg, run_dir, Tracker(), DistContext())
    with preemption.handlers():
        try:
            trainer.fit(task, model, criterion or SignalAt(signal_at), metric, train, val, {})
        except Preempted as stop:
            return stop
    return None


def _final(run_dir):
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    metrics = [{k: v for k, v in r.items() if "seconds" not in k and "samples_per_s" not in k}   # wall clock
               for r in records]
    return ckpt, metrics


def _assert_same(a_dir, b_dir):
    (a, a_metrics), (b, b_metrics) = _final(a_dir), _final(b_dir)
    assert a["step"] == b["step"] == 12 and a["epoch"] == b["epoch"] == 2
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a_metrics == b_metrics


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.slow
def test_mid_epoch_preemption_resumes_bitwise(tmp_path, num_workers):
    cfg = _config(tmp_path, num_workers)
    assert _fit(cfg, tmp_path / "straight", None) is None
    stop = _fit(cfg, tmp_path / "resumed", signal_at=11)   # epoch 1 batch 3 (6 train + 2 val calls per epoch)
    assert stop is not None and stop.signum == signal.SIGUSR1
    saved = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=True)
    assert saved["epoch"] == 1 and saved["fit_state"]["batches_done"] == 3 and saved["step"] == 9
    assert _fit(cfg, tmp_path / "resumed", None) is None          # trainer.resume=auto: finds last.pt
    _assert_same(tmp_path / "straight", tmp_path / "resumed")


def test_first_epoch_preemption_keeps_epoch_metrics(tmp_path):
    """Stopped in epoch 0, the resumed epoch's train loss still averages all six batches."""
    cfg = _config(tmp_path, 0)
    _fit(cfg, tmp_path / "straight", None)
    assert _fit(cfg, tmp_path / "resumed", signal_at=2) is not None
    assert _fit(cfg, tmp_path / "resumed", None) is None
    _assert_same(tmp_path / "straight", tmp_path / "resumed")


def test_preemption_during_validation_resumes(tmp_path):
    """Stopped in epoch 0's validation (its training done), last.pt holds plain values (its epoch's loss sums as
    numbers, not tensors) and loads; the resume trains no batch twice and ends equal to the uninterrupted run."""
    cfg = _config(tmp_path, 0)
    _fit(cfg, tmp_path / "straight", None)
    assert _fit(cfg, tmp_path / "resumed", signal_at=7) is not None     # epoch 0's first validation call
    saved = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt", "toy")
    assert saved["epoch"] == 0 and saved["fit_state"]["batches_done"] == 6 and saved["step"] == 6
    assert all(type(v) is float for v in saved["fit_state"]["epoch_sums"].values())
    assert _fit(cfg, tmp_path / "resumed", None) is None
    _assert_same(tmp_path / "straight", tmp_path / "resumed")


def test_workers_do_not_change_the_items(tmp_path):
    """Items are seeded by their place in the epoch: num_workers 0 and 2 train the same weights."""
    _fit(_config(tmp_path, 0), tmp_path / "w0", None)
    _fit(_config(tmp_path, 2), tmp_path / "w2", None)
    _assert_same(tmp_path / "w0", tmp_path / "w2")


def test_resume_false_starts_afresh(tmp_path):
    cfg = _config(tmp_path, 0)
    assert _fit(cfg, tmp_path / "run", signal_at=3) is not None
    cfg.trainer.resume = False
    assert _fit(cfg, tmp_path / "run", None) is None
    _fit(_config(tmp_path, 0), tmp_path / "straight", None)
    _assert_same(tmp_path / "straight", tmp_path / "run")


def _replace_saved_generators(run_dir) -> None:
    """last.pt with the generator states of an unrelated seed in place of the ones the run saved."""
    path = run_dir / "checkpoints" / "last.pt"
    ckpt = torch.load(path, weights_only=True)
    with isolated_rng():
        seed_everything(12345)
        ckpt["rng"] = rng_state()
    torch.save(ckpt, path)


def test_epoch_boundary_resume_reseeds_the_next_epoch(tmp_path):
    """A run stopped at an epoch boundary (trainer.epochs_per_run=1) resumes with epoch 1's generators seeded by
    (seed, epoch, rank), as the uninterrupted run's are, not with the states saved in last.pt (here another
    seed's): the same items in the same order, the same draws of every main-process generator, the same weights."""
    cfg = _config(tmp_path, 0)
    straight, first, second = Draws(), Draws(), Draws()
    _fit(cfg, tmp_path / "straight", None, straight)
    cfg.trainer.epochs_per_run = 1
    assert _fit(cfg, tmp_path / "resumed", None, first) is None
    _replace_saved_generators(tmp_path / "resumed")
    assert _fit(cfg, tmp_path / "resumed", None, second) is None
    assert len(straight.draws) == 12 and len(first.draws) == len(second.draws) == 6
    assert straight.draws == first.draws + second.draws
    assert [d[1:] for d in straight.draws[:6]] != [d[1:] for d in straight.draws[6:]]   # epochs draw apart
    _assert_same(tmp_path / "straight", tmp_path / "resumed")


def test_mid_epoch_resume_restores_the_saved_generators(tmp_path):
    """Stopped in the middle of epoch 1, a resume continues the main process's generators from the states saved
    in last.pt (no reseed): the uninterrupted run's draws exactly. With other states put in last.pt the items are
    still the same (seeded by their place in the epoch) but the generators' draws are not: the restore is used."""
    cfg = _config(tmp_path, 0)
    straight, first = Draws(), Draws(at=11)          # epoch 1 batch 3 (6 train + 2 val calls per epoch)
    _fit(cfg, tmp_path / "straight", None, straight)
    assert _fit(cfg, tmp_path / "resumed", None, first) is not None
    assert len(first.draws) == 9
    shutil.copytree(tmp_path / "resumed", tmp_path / "replaced")
    second, replaced = Draws(), Draws()
    assert _fit(cfg, tmp_path / "resumed", None, second) is None
    assert straight.draws == first.draws + second.draws
    _assert_same(tmp_path / "straight", tmp_path / "resumed")
    _replace_saved_generators(tmp_path / "replaced")
    assert _fit(cfg, tmp_path / "replaced", None, replaced) is None
    assert [d[0] for d in replaced.draws] == [d[0] for d in second.draws]
    assert all(a[1:] != b[1:] for a, b in zip(replaced.draws, second.draws))
