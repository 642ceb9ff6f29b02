"""Run tracking: local metric files in every run directory, wandb when selected, redaction of secrets."""
from __future__ import annotations

import json
import re
import sys
import time
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
    """metrics.jsonl (one object per epoch, appended) and metrics.json (final, atomic); curves.png redrawn from
    metrics.jsonl while training, as often as keeps drawing under 1/CURVES_GAP of the time (the first epoch always;
    common.reports.finish_run draws the final picture)."""

    CURVES_GAP = 20

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._drawn_at, self._draw_seconds = 0.0, 0.0

    def append_epoch(self, record: dict) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if time.monotonic() - self._drawn_at >= self.CURVES_GAP * self._draw_seconds:
            from common.reports import write_curves
            start = time.monotonic()
            write_curves(self.run_dir)
            self._drawn_at = time.monotonic()
            self._draw_seconds = self._drawn_at - start

    def write_final(self, metrics: dict) -> None:
        atomic_write_json(self.run_dir / "metrics.json", metrics)


class Tracker:
    """No-op tracker (logger=none); the wandb tracker overrides each method."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_images(self, name: str, images: list, step: int, captions: list[str] | None = None) -> None: ...

    def log_image(self, name: str, image, caption: str | None = None) -> None: ...

    def log_table(self, name: str, columns: list[str], rows: list[list]) -> None: ...

    def log_confusion_matrix(self, name: str, matrix, class_names: list[str]) -> None: ...

    def set_config(self, cfg: DictConfig) -> None: ...

    def set_summary(self, metrics: dict[str, float]) -> None: ...

    def report_run(self, run_dir: Path) -> None: ...

    def finish(self, exit_code: int = 0) -> None: ...


def make_tracker(cfg: DictConfig, run_dir: Path, is_main: bool) -> Tracker:
    if cfg.logger.name == "none" or not is_main:
        return Tracker()
    if cfg.logger.name == "wandb":
        from common.run_info import run_info
        from common.wandb_tracker import WandbTracker   # imports wandb: only when logger=wandb is selected
        return WandbTracker(cfg, run_dir, run_info(cfg))
    raise ValueError(f"logger.name={cfg.logger.name!r}: expected none or wandb")


def use_progress_bars(setting: str) -> bool:
    if setting == "auto":
        return sys.stderr.isatty()
    if setting not in ("bar", "plain", "off"):
        raise ValueError(f"trainer.progress={setting!r}: expected auto, bar, plain or off")
    return setting == "bar"
