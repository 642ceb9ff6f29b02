"""The dataset folder a run reads: `data.root`, or the task's synthetic dataset, generated once per settings."""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from common.task import Task
from common.utils.atomic import file_lock

log = logging.getLogger(__name__)


def synthetic_root(cfg: DictConfig) -> Path:
    """The folder of the synthetic dataset that `cfg` trains on when data.root is unset (keyed by its settings)."""
    seed = int(cfg.data.synth_seed)
    synth_cfg = OmegaConf.to_container(cfg.data.synth, resolve=True) if "synth" in cfg.data else {}
    digest = hashlib.sha1(json.dumps([seed, synth_cfg], sort_keys=True).encode()).hexdigest()[:8]
    return Path(cfg.paths.synth_dir) / f"{cfg.task.name}-{digest}"


def ensure_synthetic(task: Task, root: Path, seed: int) -> Path:
    """Generate the task's synthetic dataset once; concurrent processes wait on a file lock."""
    if (root / ".complete").is_file():
        return root
    with file_lock(root.parent / f".{root.name}.lock"):
        if not (root / ".complete").is_file():
            tmp = root.parent / f".{root.name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            log.info(f"[data] generating the synthetic {task.name} dataset into {root}")
            task.synthesize(tmp, seed)
            (tmp / ".complete").write_text("ok\n")
            shutil.rmtree(root, ignore_errors=True)
            tmp.rename(root)
    return root


def data_root(cfg: DictConfig, task: Task) -> Path:
    if cfg.data.root is None:
        seed = int(cfg.data.synth_seed)
        return ensure_synthetic(task, synthetic_root(cfg), seed)
    root = Path(str(cfg.data.root)).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data.root={root} does not exist: expected the {task.name} dataset as laid out "
                                f"in docs/FORMATS.md, or leave data.root unset to use synthetic data")
    return root
