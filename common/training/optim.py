"""Parameter groups tagged by role, the optimiser over them, and the learning-rate schedules.

`trainer.optim` and `trainer.schedule` are `_target_` nodes with `_partial_: true` (conf/trainer/default.yaml):
`build_optimizer` instantiates the optimiser (torch.optim.AdamW by default) and calls it with the parameter
groups; `build_schedule` is the default schedule target, called with the epoch's optimiser steps and max_epochs.

Tags (by parameter name, so optimisers, PCGrad and logging route the same way):
- `uw`:       parameters of the criterion (uncertainty-weighting log-variances)
- `adapter`:  LoRA / DoRA parameters (names hold "lora_")
- `backbone`: other parameters under `model.backbone` (trainable only when backbone.freeze=false)
- `head`:     everything else of the model
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

TAGS = ("head", "adapter", "backbone", "uw")
BACKBONE_PREFIX = "model.backbone.model."      # a trainable name under the backbone's encoder


def tag_of(name: str) -> str:
    if name.startswith("criterion."):
        return "uw"
    if "lora_" in name:
        return "adapter"
    if name.startswith("model.backbone."):
        return "backbone"
    return "head"


def named_trainable(model: nn.Module, criterion: nn.Module) -> list[tuple[str, nn.Parameter]]:
    named = [(f"model.{n}", p) for n, p in model.named_parameters()]
    named += [(f"criterion.{n}", p) for n, p in criterion.named_parameters()]
    return [(n, p) for n, p in named if p.requires_grad]


def layer_scale(block: Optional[int], layer_decay: float, num_blocks: int) -> float:
    """lr multiplier layer_decay ** (depth from the top) for a parameter of backbone block `block` (None: not
    in a block, e.g. the patch embedding or the final norm, scale 1)."""
    if layer_decay == 1.0 or block is None:
        return 1.0
    return layer_decay ** (num_blocks - 1 - block)


def build_param_groups(named_params: Iterable[tuple[str, nn.Parameter]], lr: dict[str, float],
                       weight_decay: float, layer_decay: float = 1.0, num_blocks: int = 1,
                       block_of: Optional[Callable[[str], Optional[int]]] = None,
                       uw_weight_decay: float = 0.0, decay_1d: bool = False) -> list[dict]:
    """One optimiser group per (tag, lr scale, decay or not); each group remembers its tag. 1-D parameters
    (biases, norms) get no weight decay unless `decay_1d`; `uw` parameters (uncertainty-weighting
    log-variances) get `uw_weight_decay`. `block_of` maps a name inside the backbone's encoder to its block
    (Backbone.block_of) for layer decay over `num_blocks`."""
    groups: dict[tuple, dict] = {}
    for name, param in named_params:
        tag = tag_of(name)
        if lr.get(tag) is None:
            raise ValueError(f"parameter {name} is trainable with tag '{tag}' but no learning rate is "
                             f"configured for that tag (configured: {sorted(k for k, v in lr.items() if v)})")
        in_backbone = tag in ("adapter", "backbone")
        scale = layer_scale(_block(name, block_of), layer_decay, num_blocks) if in_backbone else 1.0
        decay = float(uw_weight_decay) if tag == "uw" else 0.0 if (param.ndim <= 1 and not decay_1d) else weight_decay
        key = (tag, scale, decay)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "tag": tag, "lr": lr[tag] * scale,
                           "base_lr": lr[tag] * scale, "weight_decay": decay}
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return list(groups.values())


def _block(name: str, block_of: Optional[Callable[[str], Optional[int]]]) -> Optional[int]:
    if block_of is None or not name.startswith(BACKBONE_PREFIX):
        return None
    return block_of(name[len(BACKBONE_PREFIX):])


# keys of trainer.optim that shape the parameter groups (build_param_groups), not arguments of its `_target_`
GROUP_KEYS = ("lr", "uw_lr", "weight_decay", "uw_weight_decay", "decay_1d")


def call_target(node: DictConfig, where: str, *args, **kwargs):
    """Instantiate a `_target_` node with `_partial_: true` (lists as python lists) and call it with the arguments
    that only the trainer knows (the parameter groups, the epoch's length); `where` names the node in errors."""
    from hydra.utils import instantiate
    if "_target_" not in node or node.get("_partial_") is not True:
        raise ValueError(f"{where} needs `_target_` and `_partial_: true`: the trainer calls the target with "
                         f"{', '.join([*(['the parameter groups'] if args else []), *kwargs])}; got keys {sorted(node)}")
    factory = instantiate(node, _convert_="all")
    tuples = {k: tuple(v) for k, v in factory.keywords.items() if isinstance(v, list)}   # e.g. betas
    try:
        return factory(*args, **kwargs, **tuples)
    except TypeError as err:
        raise TypeError(f"{where}._target_={node._target_}: {err}. The node's keys are its arguments: remove one "
                        f"with ~{where}.<key>, add one with +{where}.<key>=<value>") from err


def build_optimizer(settings: DictConfig, groups: list[dict], device: torch.device) -> torch.optim.Optimizer:
    """trainer.optim's `_target_` (torch.optim.AdamW by default) called with `groups`: every key but GROUP_KEYS is
    an argument of the target; `fused: auto` is fused on CUDA; lists (betas) are passed as the tuples
    torch.optim declares."""
    node = OmegaConf.create({k: v for k, v in settings.items() if k not in GROUP_KEYS})
    if node.get("fused") == "auto":
        node.fused = device.type == "cuda"
    return call_target(node, "trainer.optim", groups)


def build_schedule(*, name: str, steps_per_epoch: int, max_epochs: int, warmup_epochs: float,
                   warmup_steps: int | None, min_lr_ratio: float, min_lr: float | None, restart_epochs: float,
                   restart_mult: int, interval: str = "step") -> "Schedule":
    """The default trainer.schedule target. interval "step": lengths in epochs (or warmup_steps) turned into
    optimiser steps, the lr changing every step; "epoch": the lr changes once per epoch (torch's CosineAnnealingLR
    stepped after each epoch: epoch e trains at the factor of e / max_epochs), lengths in whole epochs."""
    if interval == "epoch":
        if warmup_steps is not None:
            raise ValueError(f"trainer.schedule.warmup_steps={warmup_steps} counts optimiser steps but "
                             f"trainer.schedule.interval=epoch changes the lr once per epoch: use warmup_epochs")
        return Schedule(name, total_steps=int(max_epochs), warmup_steps=round(warmup_epochs),
                        min_lr_ratio=min_lr_ratio, restart_steps=round(restart_epochs), restart_mult=restart_mult,
                        min_lr=min_lr, steps_per_unit=steps_per_epoch)
    if interval != "step":
        raise ValueError(f"trainer.schedule.interval={interval!r}: expected step or epoch")
    return Schedule(name, total_steps=steps_per_epoch * int(max_epochs),
                    warmup_steps=round(warmup_epochs * steps_per_epoch) if warmup_steps is None else int(warmup_steps),
                    min_lr_ratio=min_lr_ratio, restart_steps=round(restart_epochs * steps_per_epoch),
                    restart_mult=restart_mult, min_lr=min_lr)


class Schedule:
    """lr factor per unit of `steps_per_unit` optimiser steps (1: every step; an epoch's steps: once per epoch):
    linear warmup from 0, then cosine / cosine with restarts / constant; lengths are counted in units."""

    def __init__(self, name: str, total_steps: int, warmup_steps: int, min_lr_ratio: float,
                 restart_steps: int = 0, restart_mult: int = 1, min_lr: float | None = None,
                 steps_per_unit: int = 1):
        if name not in ("cosine", "cosine_restarts", "constant"):
            raise ValueError(f"trainer.schedule.name={name!r}: expected cosine, cosine_restarts or constant")
        self.name, self.total, self.warmup = name, max(1, total_steps), max(0, warmup_steps)
        self.min_ratio, self.restart, self.mult = min_lr_ratio, max(1, restart_steps), restart_mult
        self.min_lr = min_lr  # absolute floor for every group; overrides min_lr_ratio when set
        self.steps_per_unit = max(1, int(steps_per_unit))

    def factor(self, step: int, min_ratio: float | None = None) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if self.name == "constant":
            return 1.0
        t = step - self.warmup
        if self.name == "cosine":
            progress = min(1.0, t / max(1, self.total - self.warmup))
        else:
            period = self.restart
            while t >= period:
                t, period = t - period, period * self.mult
            progress = t / period
        floor = self.min_ratio if min_ratio is None else min_ratio
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Set each group's lr for optimiser step `step` (counted from 0 over the whole run)."""
        unit = step // self.steps_per_unit
        for group in optimizer.param_groups:
            base = group["base_lr"]
            ratio = None if self.min_lr is None or base <= 0 else min(1.0, self.min_lr / base)
            group["lr"] = base * self.factor(unit, ratio)
