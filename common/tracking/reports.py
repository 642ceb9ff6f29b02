"""Offline reports, readable without wandb: every training run's curves.png (from metrics.jsonl) and the summary
table of a `-m` grid (from each job's metrics.json), printed and written as summary.csv / summary.md."""
from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from common.tracking.run_info import short_overrides
from common.utils.atomic import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

PANEL_COLUMNS = 4


# ---- curves.png ----------------------------------------------------------------------------------
def read_epochs(path: Path) -> list[dict]:
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {number} is not a JSON object ({err}): expected one record per "
                             f"epoch as the trainer writes it") from err
    return records


def curve_panels(records: list[dict], monitor: str | None = None) -> dict[str, list[str]]:
    """Panel title -> the numeric keys drawn in it: the losses (total and terms, train and val), the monitored
    metric (whatever its depth, e.g. sclera's `val/Binary/F1`), each other validation metric `val/<name>` (per-group
    breakdowns `val/<field>/<value>/<stat>` are left to the tables), learning rates."""
    keys = list(dict.fromkeys(k for r in records for k, v in r.items() if isinstance(v, (int, float))))
    losses = [k for k in keys if k in ("train/loss", "val/loss")]
    terms = [k for k in keys if k.startswith("train/") and k not in losses
             and k not in ("train/seconds", "train/samples_per_s")]
    panels = {"loss": losses}
    if len(terms) > 1:                       # one term is the loss itself
        panels["loss terms (train)"] = terms
    if monitor in keys and monitor != "val/loss":
        panels[monitor] = [monitor]
    panels.update({k: [k] for k in keys if k.startswith("val/") and k.count("/") == 1 and k != "val/loss"})
    lrs = [k for k in keys if k.startswith("lr/")]
    if lrs:
        panels["learning rate"] = lrs
    return panels


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(r["epoch"], r[key]) for r in records
              if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in points], [p[1] for p in points]


def write_curves(run_dir: Path, monitor: str | None = None) -> Path | None:
    """curves.png beside metrics.jsonl: one panel per quantity against the epoch (the monitored metric's first
    after the losses); None when there is no epoch yet."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    source = Path(run_dir) / "metrics.jsonl"
    records = read_epochs(source) if source.is_file() else []
    if not records:
        return None
    panels = curve_panels(records, monitor)
    rows = math.ceil(len(panels) / PANEL_COLUMNS)
    fig = Figure(figsize=(4 * min(len(panels), PANEL_COLUMNS), 3 * rows))
    # fixed margins (in inches: 0.5 below each row, 0.45 above the top): constrained layout doubles the drawing time
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.5 / (3 * rows), top=1 - 0.45 / (3 * rows),
                        wspace=0.3, hspace=0.5)
    for index, (title, keys) in enumerate(panels.items()):
        ax = fig.add_subplot(rows, min(len(panels), PANEL_COLUMNS), index + 1)
        for key in keys:
            epochs, values = _series(records, key)
            ax.plot(epochs, values, marker="o", markersize=3, label=key)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if title == "learning rate":
            ax.set_yscale("log")
        if len(keys) > 1:
            ax.legend(fontsize=6)
    fig.suptitle(str(run_dir), fontsize=8)
    target = Path(run_dir) / "curves.png"
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    return target


CURVES = {"end": "after the run", "epoch": "redrawn during training and after the run",
          "sweep": "by the sweep at its end (and by python -m sweeps.report)", "never": "not drawn"}


def curves_setting(cfg: DictConfig) -> str:
    """The config's `curves` (when curves.png is drawn: CURVES), checked."""
    value = str(OmegaConf.select(cfg, "curves", default="end"))
    if value not in CURVES:
        raise ValueError(f"curves={value!r}: expected one of {' | '.join(CURVES)} (when curves.png is drawn: "
                         f"{'; '.join(f'{k}: {v}' for k, v in CURVES.items())})")
    return value


def finish_run(tracker, run_dir: Path, is_main: bool, monitor: str | None = None, curves: str = "end") -> None:
    """After a mode: the final curves.png of the run and of its cv folds (curves: end | epoch; a sweep's trials
    leave theirs to the sweep's end, write_missing_curves), then the tracker's report."""
    if is_main and curves in ("end", "epoch"):
        for source in sorted(Path(run_dir).glob("metrics.jsonl")) + sorted(Path(run_dir).glob("*/metrics.jsonl")):
            write_curves(source.parent, monitor)
    tracker.report_run(run_dir)


def write_missing_curves(sweep_dir: Path) -> list[Path]:
    """curves.png of every run below `sweep_dir` (its trials and their cv folds) that has none or one older than its
    metrics.jsonl, the monitored metric read from the run's metrics.json; the pictures written."""
    written = []
    for source in sorted(Path(sweep_dir).glob("*/metrics.jsonl")) + sorted(Path(sweep_dir).glob("*/*/metrics.jsonl")):
        picture, final = source.parent / "curves.png", source.parent / "metrics.json"
        if picture.is_file() and picture.stat().st_mtime >= source.stat().st_mtime:
            continue
        monitor = json.loads(final.read_text()).get("monitor") if final.is_file() else None
        path = write_curves(source.parent, monitor if isinstance(monitor, str) else None)
        written += [path] if path is not None else []
    return written


class SweepCurves(Callback):
    """Registered by every search space (sweeps/_base.yaml, where trials run with `curves: sweep`): at the sweep's
    end, the curves.png of every trial, drawn once instead of inside each trial."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if sweep_dir.is_dir():
            written = write_missing_curves(sweep_dir)
            log.info(f"[sweep] curves.png of {len(written)} runs under {sweep_dir}")


# ---- the summary of a -m grid --------------------------------------------------------------------
COLUMNS = ["job", "overrides", "status", "metric", "value", "rank", "best_epoch", "run_dir"]


def _job_value(final: dict, metric: str) -> tuple[Any, Any]:
    """(value, best epoch) of a job's metrics.json: train's best_value, eval's eval/<m>, cv's oof/<m>."""
    if "best_value" in final:
        return final["best_value"], final.get("best_epoch")
    name = metric.split("/", 1)[-1]
    for prefix in ("eval/", "oof/"):
        if prefix + name in final:
            return final[prefix + name], None
    return None, None


def job_row(job_dir: Path) -> dict:
    """One row of the grid summary from a job directory (`.hydra/` and, once finished, metrics.json)."""
    cfg = OmegaConf.load(job_dir / ".hydra" / "config.yaml")
    overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) or []
    metric = str(OmegaConf.select(cfg, "optimized_metric"))
    row = {"job": job_dir.name, "overrides": short_overrides(overrides), "metric": metric, "run_dir": str(job_dir),
           "status": "no metrics.json (failed or running)", "value": None, "best_epoch": None, "rank": None,
           "direction": OmegaConf.select(cfg, "optimized_direction")}
    final_path = job_dir / "metrics.json"
    if final_path.is_file():
        row["value"], row["best_epoch"] = _job_value(json.loads(final_path.read_text()), metric)
        finite = isinstance(row["value"], (int, float)) and math.isfinite(row["value"])
        row["status"] = "done" if finite else "no finite value"
    return row


def _job_key(path: Path):
    return (0, int(path.name), "") if path.name.isdigit() else (1, 0, path.name)


def grid_rows(sweep_dir: Path) -> list[dict]:
    """Rows of every job directory under a multirun directory, in job order, ranked by value (1 = best, by
    each job's optimized_direction); `overrides` leaves out those every job shares."""
    jobs = sorted((p.parent.parent for p in Path(sweep_dir).glob("*/.hydra/config.yaml")), key=_job_key)
    rows = [job_row(job) for job in jobs]
    shared = set.intersection(*(set(r["overrides"]) for r in rows)) if len(rows) > 1 else set()
    for row in rows:                                   # the overrides that tell the jobs apart
        row["overrides"] = ",".join(o for o in row["overrides"] if o not in shared)
    done = [r for r in rows if r["status"] == "done"]
    done.sort(key=lambda r: -r["value"] if r["direction"] == "maximize" else r["value"])
    for rank, row in enumerate(done, 1):
        row["rank"] = rank
    return rows


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(_cell(r[c]).replace("|", "\\|") for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def csv_table(rows: list[dict], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_grid_summary(sweep_dir: Path) -> str:
    """summary.csv and summary.md in the multirun directory; returns the markdown table (without run_dir)."""
    rows = grid_rows(sweep_dir)
    atomic_write_text(Path(sweep_dir) / "summary.csv", csv_table(rows, COLUMNS))
    atomic_write_text(Path(sweep_dir) / "summary.md", markdown_table(rows, COLUMNS))
    return markdown_table(rows, COLUMNS[:-1])


class GridSummary(Callback):
    """Registered in conf/config.yaml (hydra.callbacks): at the end of a -m run, the table of its jobs."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        table = write_grid_summary(sweep_dir)
        log.info(f"[grid] {sweep_dir}: summary.csv, summary.md\n{table}")
