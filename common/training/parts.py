"""A config's task and its training parts: the Task class of `task._target_`, the model (adapted from
adapt.init_ckpt when set), criterion and metric, and their parameter counts."""
from __future__ import annotations

import logging

from hydra.utils import get_class
from omegaconf import DictConfig
from torch import nn

from common.task import Task
from common.training import adapt
from common.utils.seed import seed_everything

log = logging.getLogger(__name__)


def task_class(cfg: DictConfig) -> type[Task]:
    cls = get_class(cfg.task._target_)
    if not issubclass(cls, Task):
        raise TypeError(f"task._target_={cfg.task._target_} is not a common.task.Task subclass")
    return cls


def load_task(cfg: DictConfig) -> Task:
    return task_class(cfg)(cfg)


def count_parameters(model: nn.Module) -> dict[str, int]:
    from common.training.optim import tag_of
    counts = {"total": 0, "trainable": 0}
    for name, param in model.named_parameters():
        counts["total"] += param.numel()
        if param.requires_grad:
            counts["trainable"] += param.numel()
            tag = tag_of(f"model.{name}")
            counts[tag] = counts.get(tag, 0) + param.numel()
    return counts


def build_parts(task: Task, stats: dict):
    """Model (adapted from adapt.init_ckpt when set), criterion and metric for training. Seeded here, so the
    initial weights do not depend on what ran before (generating the synthetic data, an earlier fold)."""
    seed_everything(int(task.cfg.seed))
    model = adapt.build_for_training(task.build_model(stats), task.cfg, task.name)
    criterion, metric = task.build_criterion(stats), task.build_metric(stats)
    counts = count_parameters(model)
    log.info("[model] parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    return model, criterion, metric


