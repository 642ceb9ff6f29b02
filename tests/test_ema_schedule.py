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
