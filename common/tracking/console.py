"""What a person reads in a terminal (and in run.log): one short line per epoch, a summary block at the end.

Everything goes through `logging`, which Hydra routes to the console and to `<run dir>/run.log`
(conf/hydra/job_logging/vfm.yaml). While tqdm bars are shown, log lines are written above them.
"""
from __future__ import annotations

import logging
import math
import os
import shlex
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)


class ConsoleFormatter(logging.Formatter):
    """The message alone for INFO and below; the level in front of warnings and errors. No colour codes."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{record.levelname}: {message}"
        return message


def _number(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return str(value)
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def epoch_line(record: dict, max_epochs: int, monitor_key: str, best_value, best_epoch: int) -> str:
    """`[epoch 3/16] loss 0.4123 | val/f1 0.8123 | best 0.8123 @ 3 | 12.3 s` (epochs counted from 0)."""
    monitor = f"val/{monitor_key}"
    return (f"[epoch {record['epoch']}/{max_epochs}] loss {_number(record.get('train/loss'))} | "
            f"{monitor} {_number(record.get(monitor))} | best {_number(best_value)} @ {best_epoch} | "
            f"{record.get('epoch_seconds', 0.0):.1f} s")


def _files_in(run_dir: Path) -> list[str]:
    """Files a person looks for, relative to the run directory (Hydra's and wandb's own folders left out)."""
    skip = (".hydra", "wandb")
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")
                  if p.is_file() and p.relative_to(run_dir).parts[0] not in skip and not p.name.startswith("."))


def _as_typed(path: str) -> str:
    """A path as the user would type it: relative to the current directory when below it."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def inference_commands(task_name: str, data_root, ckpt: Path) -> list[str]:
    """The eval and predict commands for a checkpoint, with this run's interpreter and entry point."""
    program = [_as_typed(sys.executable), _as_typed(sys.argv[0]) if sys.argv[0].endswith(".py") else "run.py"]
    data = [] if data_root is None else [f"data.root={data_root}"]
    return [shlex.join([*program, f"task={task_name}", f"mode={mode}", f"ckpt_path={ckpt}", *data])
            for mode in ("eval", "predict")]


RULE = "-" * 72
HEADLINE_METRICS = 8            # numbers a results block shows; metrics.json holds every one


def _block(rows: list[tuple[str, str]]) -> str:
    width = max(10, *(len(name) + 2 for name, _ in rows))
    return "\n".join([RULE, *(f"{name:<{width}}{value}" for name, value in rows), RULE])


def summary_block(run_dir: Path, monitor: str, best_value, best_epoch: int, epochs_run: int,
                  commands: list[str]) -> str:
    """The end of mode=train: run dir, best value, files, the eval and predict commands of the best checkpoint."""
    best = (f"{monitor} = {_number(best_value)} at epoch {best_epoch} ({epochs_run} epochs run)"
            if best_value is not None else f"{monitor} was never finite: no best checkpoint")
    rows = [("run dir", str(run_dir)), ("best", best), ("files", ", ".join(_files_in(run_dir)))]
    rows += [("evaluate" if i == 0 else "predict", command) for i, command in enumerate(commands)]
    return _block(rows)


def headline(metrics: dict, monitor_key: str) -> list[tuple[str, str]]:
    """(name, value) of the numbers in `metrics`, the monitored one (name ending in /<monitor_key>) first, at most
    HEADLINE_METRICS of them."""
    numbers = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    numbers.sort(key=lambda item: not item[0].endswith("/" + monitor_key))
    return [(name, _number(value)) for name, value in numbers[:HEADLINE_METRICS]]


def results_block(run_dir: Path, metrics: dict, monitor_key: str, rows: list[tuple[str, str]] = ()) -> str:
    """The end of mode=eval / cv / predict: run dir, the given rows, the headline metrics as a short table, files."""
    table = headline(metrics, monitor_key)
    width = max((len(name) for name, _ in table), default=0)
    lines = [("run dir", str(run_dir)), *rows]
    lines += [("metrics" if i == 0 else "", f"{name:<{width}}  {value}") for i, (name, value) in enumerate(table)]
    if len(metrics) > len(table):
        lines.append(("", f"(all {len(metrics)} values in metrics.json)"))
    return _block([*lines, ("files", ", ".join(_files_in(run_dir)))])


@contextmanager
def lines_above_bars(enabled: bool) -> Iterator[None]:
    """While tqdm bars are on screen, route console log handlers through tqdm.write so lines stay above them."""
    if not enabled:
        with nullcontext():
            yield
        return
    from tqdm.contrib.logging import logging_redirect_tqdm
    with logging_redirect_tqdm(loggers=[logging.getLogger()]):
        yield
