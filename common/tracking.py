"""Run tracking: local metric files in every run directory, wandb when selected, redaction of secrets."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from common.atomic import atomic_write_json

_SECRET_KEY = re.compile(r"(password|passwd|secret|token|api_key|apikey|credential)", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]+):(?P<pw>[^@/\s]+)@")


def redact(value: Any, key: str = "") -> Any:
    """Copy of a plain container with passwords, tokens and URL credentials replaced by ***."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if isinstance(value, str):
        if _SECRET_KEY.search(key) and value:
            return "***"
        return _URL_PASSWORD.sub(r"\g<scheme>\g<user>:***@", value)
    return value


def config_for_logging(cfg: DictConfig) -> dict:
    return redact(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False))


class RunFiles:
    """metrics.jsonl (one object per epoch, appended) and metrics.json (final, atomic)."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def append_epoch(self, record: dict) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def write_final(self, metrics: dict) -> None:
        atomic_write_json(self.run_dir / "metrics.json", metrics)


class Tracker:
    """No-op tracker (logger=none); the wandb tracker overrides each method."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_images(self, name: str, images: list, step: int, captions: list[str] | None = None) -> None: ...

    def log_table(self, name: str, columns: list[str], rows: list[list]) -> None: ...

    def set_summary(self, metrics: dict[str, float]) -> None: ...

    def finish(self, exit_code: int = 0) -> None: ...


class WandbTracker(Tracker):
    def __init__(self, cfg: DictConfig, run_dir: Path, run_name: str):
        import wandb  # imported only when logger=wandb is selected

        self._wandb = wandb
        log = cfg.logger
        self.run = wandb.init(project=log.project, entity=log.entity, mode=log.mode, group=log.group,
                              job_type=log.job_type, tags=list(log.tags), name=run_name, dir=str(run_dir),
                              config=config_for_logging(cfg), reinit="finish_previous")

    def log_metrics(self, metrics, step):
        self.run.log(dict(metrics), step=step)

    def log_images(self, name, images, step, captions=None):
        captions = captions or [None] * len(images)
        self.run.log({name: [self._wandb.Image(im, caption=c) for im, c in zip(images, captions)]}, step=step)

    def log_table(self, name, columns, rows):
        self.run.log({name: self._wandb.Table(columns=columns, data=rows)})

    def set_summary(self, metrics):
        for key, value in metrics.items():
            self.run.summary[key] = value

    def finish(self, exit_code=0):
        self.run.finish(exit_code=exit_code)


def make_tracker(cfg: DictConfig, run_dir: Path, run_name: str, is_main: bool) -> Tracker:
    if cfg.logger.name == "none" or not is_main:
        return Tracker()
    if cfg.logger.name == "wandb":
        return WandbTracker(cfg, run_dir, run_name)
    raise ValueError(f"logger.name={cfg.logger.name!r}: expected none or wandb")


def use_progress_bars(setting: str) -> bool:
    if setting == "auto":
        return sys.stderr.isatty()
    if setting not in ("bar", "plain", "off"):
        raise ValueError(f"trainer.progress={setting!r}: expected auto, bar, plain or off")
    return setting == "bar"
