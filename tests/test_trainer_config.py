"""trainer.optim and trainer.schedule as `_target_` nodes: the composed default builds the AdamW and the schedule
the trainer always built (every hyperparameter, `fused: auto` resolved per device), and a `_target_` swap on the
command line (torch.optim.SGD with lr / momentum) trains through the trainer's own step."""
from __future__ import annotations

import copy

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from common.cluster.distributed import DistContext
from common.tracking.tracker import Tracker
from common.training.fit_state import FitState
from common.training.optim import Schedule, build_optimizer, build_param_groups, named_trainable
from common.training.trainer import Trainer
from tests.cli import REPO, TOY

STEPS_PER_EPOCH = 3


def _compose(tmp_path, overrides=()):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*TOY, "logger=none", "trainer.device=cpu", "trainer.progress=off",
                                           *overrides])
    OmegaConf.update(cfg, "paths", {"root_dir": str(tmp_path), "log_dir": str(tmp_path / "logs"),
                                    "cache_dir": str(tmp_path / "cache"), "output_dir": str(tmp_path)})
    return cfg


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3, 1)

    def forward(self, batch):
        return {"pred": self.head(batch["x"]).squeeze(1)}


class Weighted(nn.Module):
    """A criterion with a parameter (tag uw, its own lr and weight decay)."""

    def __init__(self):
        super().__init__()
        self.log_w = nn.Parameter(torch.tensor(0.0))

    def forward(self, outputs, batch):
        return {"mse": self.log_w.exp() * ((outputs["pred"] - batch["y"]) ** 2).mean()}


def _prepared(cfg, tmp_path, steps_per_epoch: int = STEPS_PER_EPOCH):
    torch.manual_seed(0)
    model, criterion = Head(), Weighted()
    trainer = Trainer(cfg, tmp_path, Tracker(), DistContext())
    trainer.prepare(model, criterion, steps_per_epoch)
    return trainer, model, criterion


def _by_names(optimizer) -> dict[tuple, dict]:
    return {tuple(g["names"]): {k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups}


def test_default_optimizer_is_adamw_with_the_current_hyperparameters(tmp_path):
    cfg = _compose(tmp_path)
    assert cfg.trainer.optim._target_ == "torch.optim.AdamW" and cfg.trainer.optim._partial_ is True
    trainer, model, criterion = _prepared(cfg, tmp_path)
    optimizer = trainer.training.optimizer
    assert type(optimizer) is torch.optim.AdamW
    adam = {"betas": (0.9, 0.999), "eps": 1e-8, "amsgrad": False, "maximize": False, "foreach": None,
            "capturable": False, "differentiable": False, "fused": False, "decoupled_weight_decay": True}
    assert _by_names(optimizer) == {
        ("model.head.weight",): {"tag": "head", "lr": 1e-3, "base_lr": 1e-3, "weight_decay": 0.05,
                                 "names": ["model.head.weight"], **adam},
        ("model.head.bias",): {"tag": "head", "lr": 1e-3, "base_lr": 1e-3, "weight_decay": 0.0,
                               "names": ["model.head.bias"], **adam},
        ("criterion.log_w",): {"tag": "uw", "lr": 1e-2, "base_lr": 1e-2, "weight_decay": 0.0,
                               "names": ["criterion.log_w"], **adam}}
    assert all(type(g["betas"]) is tuple for g in optimizer.param_groups)
    # the construction the trainer had before trainer.optim became a _target_ node: AdamW(groups, betas, fused)
    groups = build_param_groups(named_trainable(model, criterion), {"head": 1e-3, "uw": 1e-2}, weight_decay=0.05)
    before = torch.optim.AdamW(groups, betas=(0.9, 0.999), fused=False)
    assert optimizer.defaults == before.defaults
    assert optimizer.state_dict()["param_groups"] == before.state_dict()["param_groups"]


@pytest.mark.parametrize("fused, device, expected", [("auto", "cpu", False), ("auto", "cuda", True),
                                                     (False, "cuda", False), (True, "cpu", True)])
def test_fused_auto_is_fused_on_cuda(tmp_path, fused, device, expected):
    cfg = _compose(tmp_path, [f"trainer.optim.fused={str(fused).lower()}"])
    groups = [{"params": [nn.Parameter(torch.zeros(2))], "lr": 1e-3, "weight_decay": 0.0}]
    assert build_optimizer(cfg.trainer.optim, groups, torch.device(device)).param_groups[0]["fused"] is expected


def test_default_schedule_is_the_suites_schedule_in_optimiser_steps(tmp_path):
    """build_schedule turns the epoch lengths into steps as the trainer did: total = steps per epoch x
    max_epochs (2), warmup = warmup_epochs (1.0) x steps per epoch, restarts every restart_epochs (10)."""
    cfg = _compose(tmp_path, ["trainer.schedule.name=cosine_restarts", "trainer.schedule.restart_epochs=0.5"])
    assert cfg.trainer.schedule._target_ == "common.training.optim.build_schedule"
    schedule = _prepared(cfg, tmp_path)[0].training.schedule
    before = Schedule("cosine_restarts", total_steps=2 * STEPS_PER_EPOCH, warmup_steps=STEPS_PER_EPOCH,
                      min_lr_ratio=0.01, restart_steps=round(0.5 * STEPS_PER_EPOCH), restart_mult=1, min_lr=None)
    assert vars(schedule) == vars(before)
    default = _prepared(_compose(tmp_path), tmp_path)[0].training.schedule
    assert (default.name, default.total, default.warmup, default.min_ratio, default.restart, default.min_lr) == \
        ("cosine", 2 * STEPS_PER_EPOCH, STEPS_PER_EPOCH, 0.01, 10 * STEPS_PER_EPOCH, None)


SGD = ["trainer.optim._target_=torch.optim.SGD", "~trainer.optim.betas", "+trainer.optim.momentum=0.9",
       "trainer.optim.lr=0.1", "trainer.schedule.name=constant", "trainer.schedule.warmup_steps=0",
       "trainer.grad_clip=null", "trainer.accumulate_grad_batches=1"]


def test_target_swap_to_sgd_trains_through_the_trainers_step(tmp_path):
    """SGD from the command line: each group keeps its lr and weight decay (head 0.1, uw 1e-2; no decay on 1-D
    parameters), momentum 0.9 from the node; one step of the trainer is SGD's first step, p - lr (g + wd p)."""
    trainer, model, criterion = _prepared(_compose(tmp_path, SGD), tmp_path, steps_per_epoch=1)
    optimizer = trainer.training.optimizer
    assert type(optimizer) is torch.optim.SGD
    assert {names: (g["lr"], g["weight_decay"], g["momentum"]) for names, g in _by_names(optimizer).items()} == {
        ("model.head.weight",): (0.1, 0.05, 0.9), ("model.head.bias",): (0.1, 0.0, 0.9),
        ("criterion.log_w",): (1e-2, 0.0, 0.9)}
    gen = torch.Generator().manual_seed(0)
    batch = {"x": torch.randn(4, 3, generator=gen), "y": torch.randn(4, generator=gen)}
    reference = {"model": copy.deepcopy(model), "criterion": copy.deepcopy(criterion)}
    reference["criterion"](reference["model"](batch), batch)["mse"].backward()
    state = FitState()
    trainer.train_epoch([batch], state)
    assert state.step == 1
    lr_decay = {"model.head.weight": (0.1, 0.05), "model.head.bias": (0.1, 0.0), "criterion.log_w": (1e-2, 0.0)}
    for name, param in named_trainable(model, criterion):
        before = dict(named_trainable(reference["model"], reference["criterion"]))[name]
        lr, decay = lr_decay[name]
        expected = before.detach() - lr * (before.grad + decay * before.detach())
        torch.testing.assert_close(param.detach(), expected, rtol=0, atol=1e-7)


def test_a_key_the_target_does_not_take_fails_loudly(tmp_path):
    """SGD with AdamW's betas left in the node: the constructor refuses it by name, nothing trains."""
    cfg = _compose(tmp_path, [o for o in SGD if o != "~trainer.optim.betas"])
    with pytest.raises(TypeError, match=r"trainer\.optim\._target_=torch\.optim\.SGD: .*'betas'.*~trainer\.optim"):
        _prepared(cfg, tmp_path)


@pytest.mark.parametrize("node", ["optim", "schedule"])
def test_a_target_without_partial_is_refused(tmp_path, node):
    cfg = _compose(tmp_path, [f"~trainer.{node}._partial_"])
    with pytest.raises(ValueError, match=rf"trainer\.{node} needs `_target_` and `_partial_: true`"):
        _prepared(cfg, tmp_path)
