"""Module paths that an earlier version of the suite wrote into checkpoints, and where those modules live now.

A checkpoint stores its run's config, `_target_`s included (`common.augment.GaussianHighlights`); common/ was
split into packages (docs/ARCHITECTURE.md), so a checkpoint written before the split names modules that are
gone. `with_moved_targets` rewrites such a `_target_` to the module's new path before the config is checked and
used; nothing else in a checkpoint is changed. A new move adds its row here.
"""
from __future__ import annotations

from typing import Any

MOVED_MODULES = {
    "common.atomic": "common.utils.atomic",
    "common.seed": "common.utils.seed",
    "common.timm_import": "common.utils.timm_import",
    "common.secrets": "common.utils.secrets",
    "common.slurm": "common.cluster.slurm",
    "common.distributed": "common.cluster.distributed",
    "common.preemption": "common.cluster.preemption",
    "common.slurm_submit": "common.cluster.slurm_submit",
    "common.tracking": "common.tracking.tracker",
    "common.wandb_tracker": "common.tracking.wandb_tracker",
    "common.console": "common.tracking.console",
    "common.reports": "common.tracking.reports",
    "common.run_info": "common.tracking.run_info",
    "common.backbone": "common.models.backbone",
    "common.backbone_families": "common.models.backbone_families",
    "common.adapters": "common.models.adapters",
    "common.build": "common.models.encoder",
    "common.option_groups": "common.models.option_groups",
    "common.data": "common.data.datasets",
    "common.augment": "common.data.augment",
    "common.sampling": "common.data.sampling",
    "common.cache": "common.data.feature_cache",
    "common.image_cache": "common.data.image_cache",
    "common.image_check": "common.data.image_check",
    "common.trainer": "common.training.trainer",
    "common.checkpoint": "common.training.checkpoint",
    "common.optim": "common.training.optim",
    "common.ema": "common.training.ema",
    "common.mtl": "common.training.mtl",
    "common.mixup": "common.training.mixup",
    "common.losses": "common.training.losses",
    "common.device": "common.training.device",
    "common.parts": "common.training.parts",
    "common.adapt": "common.training.adapt",
    "common.cv": "common.training.cv",
    "common.inference": "common.inference.predictor",
    "common.ensemble": "common.inference.ensemble",
    "common.checkpoint_config": "common.inference.checkpoint_config",
    "common.app": "common.runs.app",
    "common.run_dir": "common.runs.run_dir",
    "common.choices": "common.runs.choices",
    "common.config_schema": "common.runs.config_schema",
    "common.demo": "common.runs.demo",
    "common.resolvers": "common.runs.resolvers",
}


def moved_target(target: str) -> str:
    """`target` with a moved module's old path replaced by its new one. An old target is a module and one name
    (`common.augment.GaussianHighlights`); a longer path is a new one (`common.data.augment.GaussianHighlights`,
    whose `common.data` is also an old module's path) and stays as it is."""
    module, _, name = target.rpartition(".")
    return f"{MOVED_MODULES[module]}.{name}" if module in MOVED_MODULES else target


def with_moved_targets(value: Any) -> Any:
    """A copy of a plain container (dicts, lists) with every `_target_` string passed through `moved_target`."""
    if isinstance(value, dict):
        return {k: moved_target(v) if k == "_target_" and isinstance(v, str) else with_moved_targets(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [with_moved_targets(v) for v in value]
    return value
