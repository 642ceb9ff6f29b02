"""Divergence is a failure (issue 30): a run whose every step was skipped, whose model holds a non-finite parameter
or buffer, or whose validation outputs are not finite stops with Diverged naming the step, the quantity and the
last finite value; metrics.json (strict JSON) holds the reason; a skipped step leaves BatchNorm (and other running)
statistics as they were; a sweep fails such a trial as diverged."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from common.runs.app import run
from common.training.divergence import BufferSnapshot, Diverged
from sweeps.accounting import failure_reason
from tests.cli import run_cli
from tests.test_trust_runs import _strict_json, _toy_cfg
from tests.toy import task as toy


def _diverged_summary(tmp_path):
    summary = _strict_json(tmp_path / "run" / "metrics.json")
    assert summary["status"] == "diverged"
    return summary


def test_every_step_skipped_is_diverged(tmp_path):
    cfg = _toy_cfg(tmp_path, ["loss.poison_after=0", "trainer.max_nonfinite_steps=100"])
    with pytest.raises(Diverged, match=r"at step 0 \(epoch 0\): every optimiser step \(6\): the loss or gradient "
                                       r"is not finite; last finite training loss none"):
        run(cfg)
    assert "every optimiser step" in _diverged_summary(tmp_path)["reason"]


class _NormedToy(toy.ToyModel):
    """The toy model with a BatchNorm layer; a training item of `poisoned` ids has NaN pixels."""

    def __init__(self, backbone, dropout):
        super().__init__(backbone, dropout)
        self.norm = nn.BatchNorm1d(backbone.embed_dim)

    def forward(self, batch):
        image = batch["image"]
        if self.training:
            bad = torch.tensor([item == "item5" for item in batch["id"]], device=image.device)
            image = torch.where(bad[:, None, None, None], torch.full_like(image, float("nan")), image)
        tokens = self.backbone(image).tokens[-1].mean(1)
        return {"pred": self.head(self.norm(tokens)).squeeze(1)}


def _normed(monkeypatch):
    monkeypatch.setattr(toy.ToyTask, "build_model",
                        lambda self, stats: _NormedToy(toy.build_encoder(self.cfg), float(self.cfg.model.dropout)))


def test_a_skipped_step_leaves_batchnorm_statistics_finite(tmp_path, monkeypatch):
    """Before: the NaN batch's forward pass wrote NaN into running_mean and the run passed with it in best.pt."""
    _normed(monkeypatch)
    run(_toy_cfg(tmp_path, ["trainer.max_epochs=2"]))
    best = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)
    assert best["fit_state"]["nonfinite_steps"] == 2         # one poisoned batch per epoch, skipped
    for key in ("norm.running_mean", "norm.running_var"):
        assert torch.isfinite(best["model"][key]).all(), key


def test_a_non_finite_buffer_at_validation_is_diverged(tmp_path, monkeypatch):
    _normed(monkeypatch)
    monkeypatch.setattr(BufferSnapshot, "restore", lambda self: None)     # as before: statistics kept
    with pytest.raises(Diverged, match=r"at step \d+ \(epoch 0\): buffer norm\.running_mean is not finite; last "
                                       r"finite training loss [0-9.e-]+ at step \d+"):
        run(_toy_cfg(tmp_path, ["trainer.max_epochs=2"]))
    assert "buffer norm.running_mean" in _diverged_summary(tmp_path)["reason"]


def test_non_finite_validation_outputs_are_diverged(tmp_path, monkeypatch):
    """What a biomass run met as sklearn's "Input contains infinity" and roadwork as "Target is multiclass"."""
    forward = toy.ToyModel.forward
    monkeypatch.setattr(toy.ToyModel, "forward", lambda self, batch: forward(self, batch) if self.training
                        else {"pred": forward(self, batch)["pred"] * float("inf")})
    monkeypatch.setattr(toy.ToyMetric, "compute", lambda self: pytest.fail("the metric saw non-finite outputs"))
    with pytest.raises(Diverged, match=r"at step 6 \(epoch 0\): the validation output 'pred' is not finite"):
        run(_toy_cfg(tmp_path, []))
    summary = _diverged_summary(tmp_path)
    assert summary["checkpoints"] == {}


def test_snapshot_restores_every_buffer():
    """BatchNorm statistics and other running statistics (roadwork's feature_stats is a plain buffer)."""
    stats = nn.Module()
    stats.register_buffer("mean", torch.zeros(3))
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Sequential(nn.BatchNorm1d(2)), stats)
    snapshot = BufferSnapshot(model)
    snapshot.take()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()[0](torch.full((2, 3, 2, 2), float("nan")))
    stats.mean += float("nan")
    assert not torch.isfinite(model[0].running_mean).all() and model[0].num_batches_tracked == 1
    snapshot.restore()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_sweep_fails_a_diverged_trial_as_diverged():
    assert failure_reason(Diverged("the run diverged at step 3 (epoch 0): buffer x is not finite")).startswith(
        "diverged: the run diverged at step 3")


@pytest.mark.slow
def test_cli_sclera_huge_learning_rate_fails(tmp_path):
    """The issue's run: exited 0 with a best F1 of 0.4485 and NaN BatchNorm statistics in best.pt."""
    proc = run_cli(["task=sclera", "trainer.optim.lr=1e12", "trainer=debug"], tmp_path / "run", tmp_path / "cache",
                   check=False)
    assert proc.returncode != 0 and "Diverged" in proc.stderr and "is not finite" in proc.stderr
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text(),
                         parse_constant=lambda c: pytest.fail(f"metrics.json holds {c}"))
    assert summary["status"] == "diverged" and "at step" in summary["reason"]
    assert not (tmp_path / "run" / "checkpoints" / "best.pt").exists()
