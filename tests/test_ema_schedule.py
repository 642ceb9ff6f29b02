"""EMA and learning-rate schedules against hand computations; parameter groups and tags."""
import math

import pytest
import torch
from torch import nn

from common.models.backbone_families import FAMILIES
from common.training.ema import EMA
from common.training.optim import Schedule, build_param_groups, layer_scale, tag_of


def test_ema_matches_hand_computation():
    model = nn.Linear(2, 1, bias=False)
    frozen = nn.Parameter(torch.ones(1), requires_grad=False)
    model.register_parameter("frozen", frozen)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
    ema = EMA(model, decay=0.9)
    assert set(ema.shadow) == {"weight"}
    expected = torch.tensor([[1.0, 2.0]])
    for value in ([3.0, 4.0], [5.0, -1.0]):
        with torch.no_grad():
            model.weight.copy_(torch.tensor([value]))
        ema.update(model)
        expected = 0.9 * expected + 0.1 * torch.tensor([value])
    torch.testing.assert_close(ema.shadow["weight"], expected)
    with ema.applied(model):
        torch.testing.assert_close(model.weight.data, expected)
    torch.testing.assert_close(model.weight.data, torch.tensor([[5.0, -1.0]]))


def test_warmup_cosine_by_hand():
    s = Schedule("cosine", total_steps=10, warmup_steps=2, min_lr_ratio=0.1)
    assert s.factor(0) == pytest.approx(1 / 3) and s.factor(1) == pytest.approx(2 / 3)
    for step in range(2, 12):
        progress = min(1.0, (step - 2) / 8)
        assert s.factor(step) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    assert s.factor(10) == pytest.approx(0.1)


def test_cosine_restarts_and_constant():
    s = Schedule("cosine_restarts", total_steps=100, warmup_steps=0, min_lr_ratio=0.0, restart_steps=4,
                 restart_mult=2)
    assert s.factor(0) == pytest.approx(1.0) and s.factor(4) == pytest.approx(1.0)   # restart after 4 steps
    assert s.factor(2) == pytest.approx(0.5) and s.factor(8) == pytest.approx(0.5)   # second cycle is 8 long
    assert s.factor(12) == pytest.approx(1.0)
    c = Schedule("constant", total_steps=10, warmup_steps=1, min_lr_ratio=0.0)
    assert c.factor(0) == pytest.approx(0.5) and c.factor(7) == 1.0
    with pytest.raises(ValueError, match="trainer.schedule.name"):
        Schedule("linear", 10, 0, 0.0)


def test_schedule_sets_each_group_lr():
    params = [nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(2, 2))]
    opt = torch.optim.AdamW([{"params": [params[0]], "lr": 1.0, "base_lr": 1.0},
                             {"params": [params[1]], "lr": 0.1, "base_lr": 0.1}])
    Schedule("cosine", 4, 0, 0.0).apply(opt, 2)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5, 0.05])


def test_tags_and_layer_decay_groups():
    assert tag_of("criterion.uw.log_var") == "uw"
    assert tag_of("model.backbone.model.blocks.3.attn.qkv.lora_A.default.weight") == "adapter"
    assert tag_of("model.backbone.model.blocks.3.attn.qkv.weight") == "backbone"
    assert tag_of("model.head.fc.weight") == "head"
    assert layer_scale(3, 0.5, 4) == 1.0 and layer_scale(1, 0.5, 4) == 0.25 and layer_scale(None, 0.5, 4) == 1.0
    named = [("model.backbone.model.blocks.1.attn.qkv.lora_A.default.weight", nn.Parameter(torch.zeros(2, 2))),
             ("model.head.fc.weight", nn.Parameter(torch.zeros(2, 2))),
             ("model.head.fc.bias", nn.Parameter(torch.zeros(2)))]
    groups = build_param_groups(named, {"head": 1e-3, "adapter": 1e-4}, weight_decay=0.05, layer_decay=0.5,
                                num_blocks=4, block_of=FAMILIES["timm_vit"].block_of)
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name[named[0][0]]["lr"] == pytest.approx(1e-4 * 0.25) and by_name[named[0][0]]["tag"] == "adapter"
    assert by_name["model.head.fc.weight"]["weight_decay"] == 0.05
    assert by_name["model.head.fc.bias"]["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="no learning rate"):
        build_param_groups(named, {"head": 1e-3}, weight_decay=0.0)


def test_absolute_min_lr_is_each_groups_floor():
    params = [nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))]
    opt = torch.optim.AdamW([{"params": [params[0]], "lr": 1e-4, "base_lr": 1e-4},
                             {"params": [params[1]], "lr": 1e-5, "base_lr": 1e-5}])
    s = Schedule("cosine", total_steps=10, warmup_steps=0, min_lr_ratio=0.5, min_lr=1e-6)
    s.apply(opt, 10)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-6, 1e-6])
    s.apply(opt, 5)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-6 + (1e-4 - 1e-6) * 0.5)


def test_per_epoch_cosine_equals_cosine_annealing_lr_stepped_each_epoch():
    """interval=epoch: every step of epoch e trains at eta_min + (eta_max - eta_min) (1 + cos(pi e / T)) / 2,
    T = max_epochs; the same lrs as torch's CosineAnnealingLR(T_max=T, eta_min) stepped after each epoch."""
    from common.training.optim import build_schedule
    steps, epochs, eta_min = 3, 7, 1e-6
    schedule = build_schedule(name="cosine", steps_per_epoch=steps, max_epochs=epochs, warmup_epochs=0.0,
                              warmup_steps=None, min_lr_ratio=0.01, min_lr=eta_min, restart_epochs=10,
                              restart_mult=1, interval="epoch")
    ours = torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))], "base_lr": lr} for lr in (1e-4, 1e-5)], lr=1)
    ref_params = [nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))]
    ref = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(ref_params, (1e-4, 1e-5))], lr=1)
    torch_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(ref, T_max=epochs, eta_min=eta_min)
    for epoch in range(epochs):
        for step in range(epoch * steps, (epoch + 1) * steps):
            schedule.apply(ours, step)
            for group, ref_group, base in zip(ours.param_groups, ref.param_groups, (1e-4, 1e-5)):
                formula = eta_min + (base - eta_min) * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
                assert group["lr"] == pytest.approx(formula, rel=1e-12)
                assert group["lr"] == pytest.approx(ref_group["lr"], rel=1e-9)
        ref.step()
        torch_schedule.step()
    schedule.apply(ours, epochs * steps)
    assert [g["lr"] for g in ours.param_groups] == pytest.approx([eta_min, eta_min])   # the deck's log at epoch 70


def test_per_step_cosine_stays_the_default_and_epoch_refuses_warmup_steps():
    from common.training.optim import build_schedule
    args = dict(name="cosine", steps_per_epoch=4, max_epochs=2, warmup_epochs=0.0, warmup_steps=None,
                min_lr_ratio=0.0, min_lr=None, restart_epochs=10, restart_mult=1)
    per_step = build_schedule(**args)
    assert per_step.steps_per_unit == 1 and per_step.total == 8
    assert per_step.factor(1) < per_step.factor(0)                  # changes within the first epoch
    with pytest.raises(ValueError, match="trainer.schedule.warmup_steps=2 counts optimiser steps"):
        build_schedule(**dict(args, warmup_steps=2, interval="epoch"))
    with pytest.raises(ValueError, match="trainer.schedule.interval='batch'"):
        build_schedule(**dict(args, interval="batch"))
