"""No host synchronisation inside a training step: outside logging steps, a step reads the device at most once
(the skip decision of the non-finite guard). Counted with patched Tensor.item / __bool__ / __float__ / cpu."""
import pytest
import torch

from bench.references import Reference
from bench.run import build, compose
from common.training.fit_state import FitState

STEPS = 3
READS = ("item", "__bool__", "__float__", "cpu")


class ReadCounter:
    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        self.paused = False
        for name in READS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(name, original))

    def _counting(self, name, original):
        def counted(tensor, *args, **kwargs):
            if not self.paused:
                self.calls.append(name)
            return original(tensor, *args, **kwargs)
        return counted


def _reads_per_step(built, monkeypatch) -> list[list[str]]:
    """The patched reads of each of STEPS optimiser steps of Trainer.train_epoch (a step ends at its preemption
    check); the epoch's end (its sums, read once) is not a step."""
    from common.cluster import preemption
    trainer = built.trainer
    trainer.t.log_every_n_steps = 10_000                  # no logging step among these
    trainer.prepare(built.model, built.criterion, steps_per_epoch=STEPS + 1)
    accum = int(trainer.t.accumulate_grad_batches)
    state = FitState()
    trainer.train_epoch([built.batch] * accum, state)     # warm-up step: lazy initialisation may read
    state.batches_done, state.epoch_sums = 0, {}
    counter, ends = ReadCounter(monkeypatch), []
    step = trainer.training.optimizer.step

    def uncounted_step(*args, **kwargs):   # torch's optimisers keep their step counts on the CPU (no device read)
        counter.paused = True
        try:
            return step(*args, **kwargs)
        finally:
            counter.paused = False
    monkeypatch.setattr(trainer.training.optimizer, "step", uncounted_step)
    agreed = preemption.agreed
    monkeypatch.setattr(preemption, "agreed", lambda ctx: (ends.append(len(counter.calls)), agreed(ctx))[1])
    trainer.train_epoch([built.batch] * (accum * STEPS), state)
    starts = [0, *ends[:-1]]
    return [counter.calls[a:b] for a, b in zip(starts, ends)]


def _toy(tmp_path):
    from tests.test_resume import _config
    return _config(tmp_path, 0)


def _task(tmp_path, task):
    return compose(Reference(task, [f"task={task}", "backbone=tiny"], 2), tmp_path / "cache", "fp32 eager", "cpu",
                   tiny=False)


@pytest.mark.parametrize("task", ["toy", "biomass", "sclera", "roadwork"])
def test_a_training_step_reads_the_device_at_most_once(tmp_path, monkeypatch, task):
    cfg = _toy(tmp_path) if task == "toy" else _task(tmp_path, task)
    built = build(Reference(task, [], 2), cfg, 2, train=True)
    per_step = _reads_per_step(built, monkeypatch)
    assert len(per_step) == STEPS
    for reads in per_step:
        assert len(reads) <= 1, f"{task}: a training step read the device {len(reads)} times: {reads}"
