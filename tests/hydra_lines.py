"""Every config the suite ships, composed with the installed Hydra line, as text: the job config as `--cfg job`
prints it (unresolved), the config group choices and, for a search space, the sweeper's config.
tests/test_hydra_lines.py compares the two dependency lines' texts (constraints.txt and constraints-modern.txt).

    <python of either line> -m tests.hydra_lines <out.json>     writes {name: text}
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from common.utils.hydra_lines import version_base

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
TASKS = ("biomass", "sclera", "roadwork")
TASK_GROUPS = ("data", "model", "loss", "metric")


def _stems(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.yaml") if not p.stem.startswith("_"))


def override_sets() -> dict[str, list[str]]:
    """name -> overrides: every task, every option of each task's own groups, every preset (the biomass ones also
    with their CPU smoke config), every search space with its task, and roadwork's TTA."""
    sets = {f"task={t}": [f"task={t}"] for t in TASKS}
    for task in TASKS:
        for group in TASK_GROUPS:
            for option in _stems(CONF / group / task):
                sets[f"task={task} {group}/{task}={option}"] = [f"task={task}", f"{group}/{task}={option}"]
    for preset in _stems(CONF / "experiment"):
        sets[f"experiment={preset}"] = [f"experiment={preset}"]
        for smoke in _stems(CONF / "smoke"):
            if preset.startswith(smoke.split("_")[0]):
                sets[f"experiment={preset} +smoke={smoke}"] = [f"experiment={preset}", f"+smoke={smoke}"]
    for space in _stems(ROOT / "sweeps"):
        task = space.split("_")[0]
        sets[f"task={task} sweeps={space}"] = [f"task={task}", f"sweeps={space}"]
    sets["task=roadwork inference/tta=roadwork"] = ["task=roadwork", "inference/tta=roadwork"]
    return sets


def composed(overrides: list[str]) -> str:
    with initialize_config_dir(config_dir=str(CONF), **version_base()):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    hydra = cfg.hydra
    choices = {k: v for k, v in hydra.runtime.choices.items() if not k.startswith("hydra/") or "sweeper" in k}
    extra = {"choices": dict(sorted(choices.items()))}
    if "study_name" in hydra.sweeper:
        extra["sweeper"] = OmegaConf.to_container(hydra.sweeper, resolve=False)
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    return OmegaConf.to_yaml(job) + "# ----\n" + OmegaConf.to_yaml(OmegaConf.create(extra))


def compose_all() -> dict[str, str]:
    return {name: composed(overrides) for name, overrides in override_sets().items()}


if __name__ == "__main__":
    Path(sys.argv[1]).write_text(json.dumps(compose_all(), indent=1))
