"""trainer.precision: fp16 autocast with a grad scaler (the loss scaled, gradients unscaled before clipping, an
overflow skipped and the scale lowered), its fp32 fallback off CUDA, bf16 / auto / fp32."""
import logging

import pytest
import torch
from torch import nn

from common.training import precision as precision_module
from common.training.precision import Precision

CPU = torch.device("cpu")


def test_fp16_off_cuda_runs_fp32_and_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="common.training.precision"):
        chosen = Precision("fp16", CPU)
    assert chosen.dtype is None and chosen.scaler is None and chosen.state_dict() is None
    assert "trainer.precision=fp16 needs CUDA" in caplog.text and "running fp32 on cpu" in caplog.text


@pytest.mark.parametrize("setting, dtype", [("auto", None), ("fp32", None), ("bf16", torch.bfloat16)])
def test_other_settings_on_the_cpu(setting, dtype):
    chosen = Precision(setting, CPU)
    assert chosen.dtype == dtype and chosen.scaler is None
    with chosen.autocast():
        out = nn.Linear(3, 2)(torch.ones(1, 3))
    assert out.dtype == (dtype or torch.float32)


def test_unknown_setting_names_the_key():
    with pytest.raises(ValueError, match="trainer.precision='fp8': expected one of auto, bf16, fp16, fp32"):
        Precision("fp8", CPU)


def _toy():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)), torch.randn(16, 4), torch.randn(16, 1)


def test_fp16_scaler_path_on_a_toy_model(monkeypatch):
    """The fp16 path as the trainer takes it (CPU fp16 autocast standing in for CUDA's): backward of the scaled
    loss gives scale x the gradients, unscale_ gives them back (fp16 rounding aside), then a step; a non-finite
    gradient is an overflow: no step, the scale halved."""
    monkeypatch.setattr(precision_module, "fp16_supported", lambda device: True)
    chosen = Precision("fp16", CPU)
    assert chosen.dtype == torch.float16 and isinstance(chosen.scaler, torch.amp.GradScaler)
    model, x, y = _toy()
    nn.functional.mse_loss(model(x), y).backward()                # fp32 reference gradients
    reference = [p.grad.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.zero_grad()
    with chosen.autocast():
        assert model[0](x).dtype == torch.float16
        loss = nn.functional.mse_loss(model(x).float(), y)
    chosen.scale(loss).backward()
    scale = chosen.scaler.get_scale()
    assert scale == 2.0 ** 16
    for p, ref in zip(model.parameters(), reference):
        torch.testing.assert_close(p.grad / scale, ref, rtol=2e-2, atol=2e-3)
    chosen.unscale_(optimizer)
    for p, ref in zip(model.parameters(), reference):
        torch.testing.assert_close(p.grad, ref, rtol=2e-2, atol=2e-3)
    before = [p.detach().clone() for p in model.parameters()]
    chosen.step(optimizer)
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))

    optimizer.zero_grad()
    with chosen.autocast():
        loss = nn.functional.mse_loss(model(x).float(), y)
    chosen.scale(loss).backward()
    model[0].weight.grad[0, 0] = float("inf")                   # an fp16 overflow
    chosen.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    assert not torch.isfinite(norm) and chosen.overflowed()
    assert chosen.scaler.get_scale() == 2.0 ** 15
    restored = Precision("fp16", CPU)
    restored.load_state_dict(chosen.state_dict())               # checkpoints carry the scale
    assert restored.scaler.get_scale() == 2.0 ** 15



def test_fp16_overflows_in_the_trainer_lower_the_scale_without_counting_as_divergence(tmp_path, monkeypatch):
    """Targets of 10 overflow fp16 gradients at the scaler's first scales (the bias: 2 (pred - y) x 2^16 > 65504):
    those steps are skipped and the scale halved each time, with trainer.max_nonfinite_steps=0 (a single counted
    non-finite step would stop the run); the checkpoint carries the lowered scale."""
    from tests.test_trainer_behaviours import MSE, Items, LinearModel, NegMSE, _cfg, _fit
    monkeypatch.setattr(precision_module, "fp16_supported", lambda device: True)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, generator=gen), 10 * torch.ones(32)
    cfg = _cfg(tmp_path, {"data.batch_size": 4, "trainer.max_epochs": 1, "trainer.precision": "fp16",
                          "trainer.max_nonfinite_steps": 0, "trainer.grad_clip": 1.0})
    torch.manual_seed(0)
    trainer, state, grads = _fit(cfg, tmp_path / "run", LinearModel(3), MSE(), NegMSE(), Items(x=x, y=y),
                                 Items(x=x[:4], y=y[:4]))
    scale = trainer.precision.scaler.get_scale()
    assert len(grads) == 8 and 0 < state.step < 8 and state.nonfinite_steps == 0
    assert scale == 2.0 ** 16 / 2 ** (8 - state.step)                # one halving per skipped step
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert saved["grad_scaler"]["scale"] == scale


def test_per_epoch_schedule_through_the_trainer_holds_the_lr_within_an_epoch(tmp_path):
    from tests.test_trainer_behaviours import MSE, Items, LinearModel, NegMSE, Recorder, _cfg, _fit
    import math
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, generator=gen), torch.randn(8, generator=gen)
    cfg = _cfg(tmp_path, {"data.batch_size": 4, "trainer.max_epochs": 3, "trainer.optim.lr": 1e-3,
                          "trainer.schedule.interval": "epoch", "trainer.schedule.warmup_epochs": 0.0,
                          "trainer.schedule.min_lr": 1e-6, "trainer.log_every_n_steps": 1})
    tracker = Recorder()
    _fit(cfg, tmp_path / "run", LinearModel(3), MSE(), NegMSE(), Items(x=x, y=y), Items(x=x[:4], y=y[:4]), tracker)
    lrs = [m["lr/head"] for m, _ in tracker.logged if "train/loss_step" in m]
    want = [1e-6 + (1e-3 - 1e-6) * 0.5 * (1 + math.cos(math.pi * e / 3)) for e in (0, 0, 1, 1, 2, 2)]
    assert lrs == pytest.approx(want, rel=1e-12)
