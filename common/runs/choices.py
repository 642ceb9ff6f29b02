"""Checks right after composition, before any heavy import: the mode, and that the task's own config groups
(data, model, loss, metric) were chosen among that task's options (`task=sclera +model/biomass=fpn` is refused).

`CheckBeforeRun` (a Hydra callback, conf/config.yaml) runs them with the typed schemas (common.runs.config_schema)
before Hydra creates the run folder, so a refused mode, option or section leaves no folder behind; run.py runs them
again in each job (the jobs of a -m run are composed after the callback). The schemas resolve `${hydra:...}` values:
before the job exists, `hydra.runtime.output_dir` is the run folder Hydra is about to create (`hydra.run.dir`)."""
from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

MODES = ("train", "eval", "predict", "cv", "synth")
TASK_GROUPS = ("data", "model", "loss", "metric")
CONF = Path(__file__).resolve().parents[2] / "conf"


class ChoiceError(ValueError):
    """A config value or group option that is not among the valid ones (the message lists them)."""


def task_options(group: str, task: str) -> list[str]:
    """The command-line choices of a task's own group: `model/sclera=cgdseg`, ..."""
    return sorted(f"{group}/{task}={p.stem}" for p in (CONF / group / task).glob("*.yaml")
                  if not p.stem.startswith("_"))


def check_choices(cfg: DictConfig, choices: dict[str, str | None]) -> None:
    """choices: Hydra's runtime choices ({group: option}); raises ChoiceError naming the key and the valid values.
    A task's own groups are `<group>/<task>` (conf/task/<task>.yaml selects `/model/<task>: <option>`, the same
    choice key on Hydra 1.3 and 1.4); another task's (appended with `+model/biomass=fpn`) or the group itself
    (`+model=biomass/fpn`) is refused."""
    if cfg.mode not in MODES:
        raise ChoiceError(f"mode={cfg.mode}: expected one of {', '.join(MODES)}")
    task = str(cfg.task.name)
    for key, chosen in choices.items():
        group, _, owner = str(key).partition("/")
        if group in TASK_GROUPS and chosen is not None and owner != task:
            raise ChoiceError(f"{key}={chosen} belongs to another task than task={task}: expected one of "
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


def _as_job(config: DictConfig) -> DictConfig:
    """A copy of the composed `config` as its job will see it: `hydra.runtime.output_dir` set to the folder
    `hydra.run.dir` names (Hydra sets it only when it creates that folder)."""
    job = copy.deepcopy(config)
    with read_write(job.hydra.runtime), open_dict(job.hydra.runtime):
        job.hydra.runtime.output_dir = os.path.abspath(str(job.hydra.run.dir))
    return job


class CheckBeforeRun(Callback):
    """Every check of check_config on the composed config of a single run, before Hydra creates its folder."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        job, hydra_config = _as_job(config), HydraConfig.instance().cfg
        HydraConfig.instance().set_config(job)          # `${hydra:...}` resolves against the job to come
        try:
            check_config(job, dict(job.hydra.runtime.choices))
        finally:
            HydraConfig.instance().cfg = hydra_config
