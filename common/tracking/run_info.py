"""What a run is, for the tracker: a short readable name, its group, its tags and Hydra's group choices.

Everything is read from Hydra's runtime config (overrides, choices, sweep directory) and, for eval / predict,
from the checkpoint's own run directory (`<run>/.hydra/`), so the run tells where its model came from.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

_FLOAT = re.compile(r"(?<![\w.])[-+]?(?:\d+\.\d*|\.\d+|\d+(?=[eE]))(?:[eE][-+]?\d+)?(?![\w.])")
_PATH_KEY = re.compile(r"(^|\.)(ckpt_path|root|\w*dir|\w*_path|reference|masks|storage)$")
_PATH_VALUE = re.compile(r"^\[?\s*(/|~|\./|\.\./)")
_DROPPED_PREFIXES = ("hydra.", "paths.", "logger")
# Hydra's own groups (output, logging, help) are noise in a run's config; the sweeper and launcher are not.
_HYDRA_CHOICES_KEPT = ("hydra/sweeper", "hydra/launcher")


@dataclass
class RunInfo:
    name: str
    group: str
    tags: list[str]
    choices: dict[str, str | None] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    checkpoint: dict = field(default_factory=dict)     # eval / predict: the checkpoint's run (dir, choices, name)


def round_floats(text: str, digits: int = 4) -> str:
    """Every float literal in an override value at `digits` significant digits (3.2345678e-05 -> 3.235e-05)."""
    return _FLOAT.sub(lambda m: f"{float(m.group(0)):.{digits}g}", text)


def short_override(item: str) -> str | None:
    """`key=value` as shown in a run name, or None for path-valued and bookkeeping overrides."""
    key, sep, value = item.lstrip("+~").partition("=")
    if not sep or key.startswith(_DROPPED_PREFIXES) or _PATH_KEY.search(key) or _PATH_VALUE.match(value):
        return None
    return f"{key}={round_floats(value)}"


def short_overrides(overrides: list[str], skip: tuple[str, ...] = ()) -> list[str]:
    kept = [short_override(item) for item in overrides if item.lstrip("+~").partition("=")[0] not in skip]
    return [item for item in kept if item]


def short_name(overrides: list[str], skip: tuple[str, ...] = ()) -> str:
    """The overrides of a command line without paths, floats rounded: `peft=lora,peft.r=8,peft.lr=0.0001235`."""
    return ",".join(short_overrides(overrides, skip))


def useful_choices(choices: dict) -> dict[str, str | None]:
    return {k: v for k, v in choices.items() if not k.startswith("hydra/") or k in _HYDRA_CHOICES_KEPT}


def checkpoint_run(ckpt_path) -> dict:
    """The training run a checkpoint came from, when it lies in `<run>/checkpoints/` (or is a cv run directory):
    its directory, Hydra choices and short name. Empty when the run directory has no `.hydra/`."""
    if ckpt_path is None:
        return {}
    first = ckpt_path if isinstance(ckpt_path, (str, Path)) else next(iter(ckpt_path), None)
    if first is None:
        return {}
    path = Path(str(first))
    run_dir = path if path.is_dir() else path.parent.parent
    hydra_yaml, overrides_yaml = run_dir / ".hydra" / "hydra.yaml", run_dir / ".hydra" / "overrides.yaml"
    if not hydra_yaml.is_file():
        return {}
    hydra_cfg = yaml.safe_load(hydra_yaml.read_text())["hydra"]
    overrides = yaml.safe_load(overrides_yaml.read_text()) if overrides_yaml.is_file() else []
    return {"run_dir": str(run_dir), "choices": useful_choices(hydra_cfg["runtime"]["choices"]),
            "overrides": short_overrides(overrides or [])}


def inherited_choices(choices: dict, checkpoint: dict, sections) -> dict[str, str | None]:
    """The choices of an eval / predict run whose `sections` come from a checkpoint: the checkpoint's run's choice
    for every group that configures one of them (a group's section is its first part: `model`, `model/biomass`),
    None where the checkpoint's run is unknown (no `.hydra/` beside it); this run's choice for the other groups."""
    sections = set(sections)
    own = {group: value for group, value in choices.items() if group.split("/")[0] not in sections}
    inherited = {group: None for group in choices if group.split("/")[0] in sections}
    inherited.update({group: value for group, value in checkpoint.get("choices", {}).items()
                      if group.split("/")[0] in sections})
    return {**own, **inherited}


def default_tags(cfg: DictConfig, choices: dict, facts: list[str]) -> list[str]:
    """`<fact>:<value>` for each fact named in logger.default_tags (task, mode, or a config group such as
    experiment or sweeps) that has a value, then the run's own `tags`."""
    values = {"task": str(cfg.task.name), "mode": str(cfg.mode), **choices}
    tags = [f"{fact}:{values[fact]}" for fact in facts if values.get(fact) is not None]
    return tags + [str(t) for t in cfg.logger.tags if str(t) not in tags]


def _sweep_name(hydra_cfg, overrides: list[str]) -> str | None:
    """`trial-<n> <swept parameters>` for a job of an Optuna sweep (sweeps/shared_study.py launches trial n as
    hydra.job.num = n); None outside sweeps."""
    sweeper = hydra_cfg.sweeper
    if "study_name" not in sweeper or "storage" not in sweeper:
        return None
    swept = set(OmegaConf.to_container(sweeper.params, resolve=False)) if "params" in sweeper and sweeper.params \
        else set()
    params = short_name([o for o in overrides if o.lstrip("+~").partition("=")[0] in swept])
    label = f"trial-{hydra_cfg.job.num}"                 # the shared-study sweeper numbers jobs by trial
    return f"{label} {params}".strip()


def run_info(cfg: DictConfig) -> RunInfo:
    """Name, group, tags and choices of the current run (Hydra's runtime config when Hydra is running)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    facts = [str(f) for f in cfg.logger.default_tags]
    if not HydraConfig.initialized():
        return RunInfo(f"{cfg.task.name}-{cfg.mode}", str(cfg.logger.group), default_tags(cfg, {}, facts))
    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    choices = useful_choices(OmegaConf.to_container(hydra_cfg.runtime.choices))
    ckpt = checkpoint_run(cfg.ckpt_path) if cfg.mode in ("eval", "predict") else {}
    tag_choices = {**ckpt.get("choices", {}), **{k: v for k, v in choices.items() if v is not None}}
    group = str(cfg.logger.group)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    name = _sweep_name(hydra_cfg, overrides) if multirun else None
    if multirun and name is None:                        # a -m grid: its jobs side by side
        group = f"multirun-{Path(str(hydra_cfg.sweep.dir)).name}"
    if name is None:
        inherited = ckpt.get("overrides", [])
        own = [o for o in short_overrides(overrides, skip=("mode", "tags")) if o not in inherited]
        name = ",".join(inherited + own) or str(cfg.task.name)
        name = f"{cfg.mode}:{name}" if cfg.mode != "train" else name
    return RunInfo(name, group, default_tags(cfg, tag_choices, facts), choices, overrides, ckpt)
