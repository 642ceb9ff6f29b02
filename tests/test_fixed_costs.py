"""What a run (and a sweep trial) pays besides training: the loaders of a fit are built once, with persistent
workers, and an epoch's order comes from the sampler's set_epoch, the same order (and item seeds) the per-epoch
loaders of before gave; curves.png is drawn when `curves` says (after the run; a sweep's trials at the sweep's
end), never inside every epoch unless asked."""
from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from common.tracking import reports
from common.tracking.tracker import RunFiles, Tracker
from common.training import loaders as loaders_module
from common.training import trainer as trainer_module
from common.training.trainer import Trainer
from tests.test_trainer_behaviours import MSE, Items, LinearModel, NegMSE, _cfg

N, BATCH, SEED = 10, 3, 7


class Draws(Dataset):
    """Item i: (i, a torch.rand draw): the draw shows the item seed it was loaded with."""

    def __len__(self):
        return N

    def __getitem__(self, i):
        return torch.tensor([float(i), float(torch.rand(()))])


def _trainer(tmp_path, workers: int) -> Trainer:
    from omegaconf import OmegaConf

    from common.cluster.distributed import DistContext
    cfg = OmegaConf.create({"seed": SEED, "data": {"batch_size": BATCH, "num_workers": workers},
                            "trainer": {"precision": "fp32", "progress": "off", "pin_memory": False}})
    return Trainer(cfg, tmp_path, Tracker(), DistContext())


def _hand_order(epoch: int) -> list[int]:
    """DistributedSampler's seeded permutation on one process (seed + epoch), batches of BATCH, last one dropped."""
    order = torch.randperm(N, generator=torch.Generator().manual_seed(SEED + epoch)).tolist()
    return order[:N // BATCH * BATCH]


def test_one_persistent_loader_gives_every_epoch_the_order_and_draws_of_a_fresh_one(tmp_path):
    """A loader with 2 persistent workers moved by set_epoch (a resumed epoch too: start=) yields what the old
    per-epoch construction yields in the main process, item for item, and the order is the hand permutation."""
    persistent = _trainer(tmp_path, workers=2).loader(Draws(), torch.stack, train=True, persistent=True)
    fresh = _trainer(tmp_path, workers=0)
    assert persistent.persistent_workers and persistent.num_workers == 2
    for epoch, skip in [(0, 0), (1, 0), (2, 1), (3, 0)]:
        persistent.sampler.set_epoch(epoch, start=skip * BATCH)
        got = torch.cat(list(persistent))
        want = torch.cat(list(fresh.loader(Draws(), torch.stack, train=True, epoch=epoch, skip_batches=skip)))
        assert torch.equal(got, want), (epoch, skip)
        assert got[:, 0].long().tolist() == _hand_order(epoch)[skip * BATCH:]
    assert len(set(torch.cat(list(persistent))[:, 1].tolist())) == N // BATCH * BATCH    # draws differ per item


def test_fit_builds_its_loaders_once_with_persistent_workers(tmp_path, monkeypatch):
    """3 epochs, 2 workers: one training and one validation loader, both persistent; each epoch trains the items
    of the hand permutation of (seed, epoch)."""
    built = []

    class Counted(DataLoader):
        def __init__(self, *args, **kwargs):
            built.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(loaders_module, "DataLoader", Counted)
    cfg = _cfg(tmp_path, {"trainer.max_epochs": 3, "data.num_workers": 2, "data.batch_size": BATCH,
                          "seed": SEED, "trainer.log_every_n_steps": 1000})
    gen = torch.Generator().manual_seed(0)
    train = Items(x=torch.randn(N, 4, generator=gen), y=torch.randn(N, generator=gen))
    val = Items(x=torch.randn(4, 4, generator=gen), y=torch.randn(4, generator=gen))
    from tests.toy.task import ToyTask
    criterion = MSE()
    Trainer(cfg, tmp_path / "run", Tracker(), trainer_module.DistContext()).fit(
        ToyTask(cfg), LinearModel(4), criterion, NegMSE(), train, val, {})
    assert len(built) == 2 and all(k["persistent_workers"] and k["num_workers"] == 2 for k in built)
    per_epoch = len(_hand_order(0)) // BATCH
    trained = [sum(criterion.ids[e * per_epoch:(e + 1) * per_epoch], []) for e in range(3)]
    assert trained == [_hand_order(e) for e in range(3)]


def test_no_workers_no_persistence(tmp_path):
    loader = _trainer(tmp_path, workers=0).loader(Draws(), torch.stack, train=True, persistent=True)
    assert not loader.persistent_workers


# ---- curves.png ----------------------------------------------------------------------------------
def _epochs(run_dir, n=2):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "train/loss": 1.0 / (e + 1),
                                                               "val/score": float(e)}) + "\n" for e in range(n)))


def test_curves_are_drawn_during_training_only_when_asked(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(reports, "write_curves", lambda run_dir, monitor=None: drawn.append(run_dir))
    for redraw in (False, True):
        files = RunFiles(tmp_path / str(redraw), redraw=redraw)
        files.append_epoch({"epoch": 0})
    assert drawn == [tmp_path / "True"]


@pytest.mark.parametrize("curves, drawn", [("end", True), ("epoch", True), ("sweep", False), ("never", False)])
def test_finish_run_draws_the_run_and_its_folds_as_curves_says(tmp_path, curves, drawn):
    _epochs(tmp_path)
    _epochs(tmp_path / "fold_0")
    reports.finish_run(Tracker(), tmp_path, True, "val/score", curves)
    assert (tmp_path / "curves.png").is_file() == drawn == (tmp_path / "fold_0" / "curves.png").is_file()


def test_the_sweep_draws_each_trials_missing_or_stale_curves_once(tmp_path):
    for name in ("trial-0", "trial-1"):
        _epochs(tmp_path / name)
    (tmp_path / "trial-0" / "metrics.json").write_text(json.dumps({"monitor": "val/score"}))
    _epochs(tmp_path / "trial-1" / "fold_0")
    written = reports.write_missing_curves(tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in written) == [
        "trial-0/curves.png", "trial-1/curves.png", "trial-1/fold_0/curves.png"]
    assert reports.write_missing_curves(tmp_path) == []                    # up to date: nothing drawn again
    _epochs(tmp_path / "trial-1", n=3)                                      # a newer metrics.jsonl
    import os
    os.utime(tmp_path / "trial-1" / "metrics.jsonl", (2e9, 2e9))
    assert reports.write_missing_curves(tmp_path) == [tmp_path / "trial-1" / "curves.png"]


def test_a_bad_curves_value_is_refused_naming_the_choices():
    from omegaconf import OmegaConf
    assert reports.curves_setting(OmegaConf.create({})) == "end"
    with pytest.raises(ValueError, match=r"curves='epochs'.*end \| epoch \| sweep \| never"):
        reports.curves_setting(OmegaConf.create({"curves": "epochs"}))


def test_the_shipped_configs_draw_after_a_run_and_at_a_sweeps_end():
    """conf/config.yaml: a run draws its curves.png at its end; every search space (sweeps/_base.yaml) leaves
    its trials' to the sweep's end, whose callback draws them."""
    from omegaconf import OmegaConf
    from tests.cli import REPO
    assert OmegaConf.load(REPO / "conf" / "config.yaml").curves == "end"
    base = OmegaConf.load(REPO / "sweeps" / "_base.yaml")
    assert base.curves == "sweep"
    assert base.hydra.callbacks.sweep_curves._target_ == "common.tracking.reports.SweepCurves"


class FailsAt(MSE):
    """MSE that raises at its `at`-th training call: a fit that stops with an exception."""

    def __init__(self, at: int):
        super().__init__()
        self.at = at

    def forward(self, outputs, batch):
        if self.training and torch.is_grad_enabled() and len(self.losses) == self.at:
            raise RuntimeError("stop here")
        return super().forward(outputs, batch)


def test_a_fit_that_raises_leaves_no_worker_running(tmp_path):
    """The persistent workers end with the fit, even while its exception (and traceback) is still held."""
    import multiprocessing

    from tests.toy.task import ToyTask
    cfg = _cfg(tmp_path, {"trainer.max_epochs": 3, "data.num_workers": 2, "data.batch_size": BATCH})
    gen = torch.Generator().manual_seed(0)
    train = Items(x=torch.randn(N, 4, generator=gen), y=torch.randn(N, generator=gen))
    trainer = Trainer(cfg, tmp_path / "run", Tracker(), trainer_module.DistContext())
    with pytest.raises(RuntimeError, match="stop here") as raised:
        trainer.fit(ToyTask(cfg), LinearModel(4), FailsAt(4), NegMSE(), train, train, {})
    assert raised.value is not None and multiprocessing.active_children() == []
