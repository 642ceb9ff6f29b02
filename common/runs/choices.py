"""Checks right after composition, before any heavy import: the mode, and that the task's own config groups
(data, model, loss, metric) were chosen among that task's options (`task=sclera model=biomass/fpn` is refused).

`CheckBeforeRun` (a Hydra callback, conf/config.yaml) runs them before Hydra creates the run folder, so a refused
mode or option leaves no folder behind; run.py runs them again in each job (the jobs of a -m run are composed after
the callback), with the typed schemas (common.runs.config_schema), which resolve `${hydra:...}` values and so need
the job's Hydra config."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

MODES = ("train", "eval", "predict", "cv", "synth")
TASK_GROUPS = ("data", "model", "loss", "metric")
CONF = Path(__file__).resolve().parents[2] / "conf"


class ChoiceError(ValueError):
    """A config value or group option that is not among the valid ones (the message lists them)."""


def task_options(group: str, task: str) -> list[str]:
    return sorted(f"{task}/{p.stem}" for p in (CONF / group / task).glob("*.yaml") if not p.stem.startswith("_"))


def check_choices(cfg: DictConfig, choices: dict[str, str | None]) -> None:
    """choices: Hydra's runtime choices ({group: option}); raises ChoiceError naming the key and the valid values."""
    if cfg.mode not in MODES:
        raise ChoiceError(f"mode={cfg.mode}: expected one of {', '.join(MODES)}")
    task = str(cfg.task.name)
    for group in TASK_GROUPS:
        chosen = choices.get(group)
        if chosen is not None and not str(chosen).startswith(f"{task}/"):
            raise ChoiceError(f"{group}={chosen} belongs to another task than task={task}: expected one of "
                              f"{', '.join(task_options(group, task))}")


def check_config(cfg: DictConfig, choices: dict[str, str | None]) -> None:
    """The mode, the task's own groups (check_choices) and the typed schemas of the shared sections; exits the
    process with the message (as a command-line tool does), naming the key."""
    from common.runs.config_schema import SchemaError, check_schema
    try:
        check_choices(cfg, choices)
        check_schema(cfg)
    except (ChoiceError, SchemaError) as err:
        sys.exit(f"error: {err}")


class CheckBeforeRun(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_choices(config, dict(config.hydra.runtime.choices))
        except ChoiceError as err:
            sys.exit(f"error: {err}")
