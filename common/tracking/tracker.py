"""Run tracking: local metric files in every run directory, wandb when selected, redaction of secrets."""
from __future__ import annotations

import inspect
import json
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from common.utils.atomic import atomic_write_json, write_error

if TYPE_CHECKING:
    from common.tracking.run_info import RunInfo

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


def logged_config(cfg: DictConfig, info: RunInfo, from_checkpoint: tuple[str, ...] = ()) -> dict:
    """The config a tracker records: `cfg` resolved and redacted, Hydra's choices and overrides under `hydra`, and
    for eval / predict the checkpoint's training run under `checkpoint`. from_checkpoint: the sections of `cfg`
    taken from the checkpoint, whose group choices are then the checkpoint's run's (run_info.inherited_choices)."""
    from common.tracking.run_info import inherited_choices
    choices = inherited_choices(info.choices, info.checkpoint, from_checkpoint) if from_checkpoint else info.choices
    hydra = {"choices": choices, "overrides": info.overrides}
    extra = {"checkpoint": info.checkpoint} if info.checkpoint else {}
    return {**config_for_logging(cfg), "hydra": redact(hydra), **extra}


class RunFiles:
    """metrics.jsonl (one object per epoch, appended) and metrics.json (final, atomic). With `redraw` (`curves:
    epoch`), curves.png is also redrawn from metrics.jsonl while training, as often as keeps drawing under
    1/CURVES_GAP of the time (the first epoch always); common.tracking.reports.finish_run draws the final picture."""

    CURVES_GAP = 20

    def __init__(self, run_dir: Path, monitor: str | None = None, redraw: bool = False):
        """monitor: the monitored metric, which curves.png always draws."""
        self.run_dir, self.monitor, self.redraw = Path(run_dir), monitor, redraw
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._drawn_at, self._draw_seconds = 0.0, 0.0

    def append_epoch(self, record: dict) -> None:
        path = self.run_dir / "metrics.jsonl"
        try:
            with open(path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        except OSError as err:          # a full disk, a quota: say which file and what to do
            raise write_error(path, err) from err
        if self.redraw and time.monotonic() - self._drawn_at >= self.CURVES_GAP * self._draw_seconds:
            from common.tracking.reports import write_curves
            start = time.monotonic()
            write_curves(self.run_dir, self.monitor)
            self._drawn_at = time.monotonic()
            self._draw_seconds = self._drawn_at - start

    def write_final(self, metrics: dict) -> None:
        atomic_write_json(self.run_dir / "metrics.json", metrics)


class Tracker:
    """No-op tracker (logger=none, and every rank but the main one); the wandb tracker overrides each method.

    A tracker class is the `_target_` of a logger option (conf/logger/*.yaml, `_partial_: true`): its constructor
    takes keyword arguments only, the option's keys but RUN_KEYS, plus those of RUNTIME_ARGS it names."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_images(self, name: str, images: list, step: int, captions: list[str] | None = None) -> None: ...

    def log_image(self, name: str, image, caption: str | None = None) -> None: ...

    def log_table(self, name: str, columns: list[str], rows: list[list]) -> None: ...

    def log_confusion_matrix(self, name: str, matrix, class_names: list[str]) -> None: ...

    def set_config(self, cfg: DictConfig, from_checkpoint: tuple[str, ...]) -> None: ...

    def set_summary(self, metrics: dict[str, float]) -> None: ...

    def add_tags(self, tags: list[str]) -> None: ...

    def report_run(self, run_dir: Path) -> None: ...

    def finish(self, exit_code: int = 0) -> None: ...


# keys of a logger option that describe the run (common.tracking.run_info reads them; a tracker gets them resolved as
# `info`), not arguments of its `_target_`
RUN_KEYS = ("group", "tags", "default_tags")
# what only the run knows, passed to a tracker class that names it as a constructor argument
RUNTIME_ARGS = {
    "run_dir": "the run directory (Path)",
    "info": "common.tracking.run_info.RunInfo: the run's name, group, tags, Hydra choices and overrides, checkpoint's run",
    "config": "the config to record (common.tracking.tracker.logged_config: resolved, redacted, with `hydra`)",
    "monitor": "trainer.monitor, the monitored metric",
    "direction": "trainer.monitor_direction: maximize | minimize",
}


def make_tracker(cfg: DictConfig, run_dir: Path, is_main: bool) -> Tracker:
    """The tracker of `cfg.logger`: its `_target_` instantiated (its module imported only now: wandb only with
    logger=wandb) with the option's keys but RUN_KEYS, and called with the RUNTIME_ARGS its constructor names.
    Every rank but the main one gets the no-op Tracker. A key the class does not take, or an argument it needs that
    neither the option nor the run gives, fails naming it."""
    if not is_main:
        return Tracker()
    from hydra.utils import instantiate
    node = cfg.logger
    if "_target_" not in node or node.get("_partial_") is not True:
        raise ValueError(f"logger needs `_target_` (a common.tracking.tracker.Tracker class) and `_partial_: true`: the "
                         f"run calls it with {', '.join(RUNTIME_ARGS)} as its constructor names them; "
                         f"got keys {sorted(node)}")
    args = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in RUN_KEYS}
    factory = instantiate(args, _convert_="all")
    cls = factory.func
    if not (isinstance(cls, type) and issubclass(cls, Tracker)):
        raise TypeError(f"logger._target_={node._target_}: expected a subclass of common.tracking.tracker.Tracker")
    params = {name: p for name, p in inspect.signature(cls).parameters.items()
              if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    for key in factory.keywords:
        if key in RUNTIME_ARGS:
            raise ValueError(f"logger.{key}: {RUNTIME_ARGS[key]} is given by the run, not by the config")
        if key not in params:
            raise ValueError(f"logger.{key}: not an argument of {node._target_} (its arguments: "
                             f"{', '.join(k for k in params if k not in RUNTIME_ARGS) or 'none'}); remove it "
                             f"with ~logger.{key}")
    wanted = [k for k in params if k in RUNTIME_ARGS]
    missing = [k for k, p in params.items() if p.default is p.empty and k not in factory.keywords
               and k not in RUNTIME_ARGS]
    if missing:
        raise ValueError(f"logger: missing {', '.join(f'logger.{k}' for k in missing)}, an argument of "
                         f"{node._target_} (add it with +logger.<key>=<value>)")
    return factory(**_runtime_args(cfg, run_dir, wanted))


def _runtime_args(cfg: DictConfig, run_dir: Path, wanted: list[str]) -> dict[str, Any]:
    """The RUNTIME_ARGS named in `wanted`, each computed only when wanted (run_info reads Hydra's config)."""
    values: dict[str, Any] = {}
    if "info" in wanted or "config" in wanted:
        from common.tracking.run_info import run_info
        values["info"] = run_info(cfg)
        if "config" in wanted:
            values["config"] = logged_config(cfg, values["info"])
    if "monitor" in wanted or "direction" in wanted:
        values.update(monitor=str(cfg.trainer.monitor), direction=str(cfg.trainer.monitor_direction))
    values["run_dir"] = Path(run_dir)
    return {k: values[k] for k in wanted}


def use_progress_bars(setting: str) -> bool:
    if setting == "auto":
        return sys.stderr.isatty()
    if setting not in ("bar", "plain", "off"):
        raise ValueError(f"trainer.progress={setting!r}: expected auto, bar, plain or off")
    return setting == "bar"
