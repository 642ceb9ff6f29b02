"""The wandb tracker (logger=wandb): runs named, grouped and tagged for comparison, metrics on step and epoch
axes with best-value summaries, the config a run actually ran with, images, tables and optional artifacts.

Every series is drawn against its own axis, the `step` or `epoch` value in its row (define_metric), never against
wandb's own step, which the tracker leaves to count the log calls: wandb drops a row logged to a step below its
current one, and a run's calls (training's steps, then tables, eval's error pictures) are not in step order.

Imported only when logger=wandb is selected: conf/logger/wandb.yaml names WandbTracker as its `_target_`, which
common.tracking.tracker.make_tracker instantiates.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import wandb

from common.tracking.run_info import RunInfo
from common.tracking.tracker import Tracker, logged_config

STEP_AXIS, EPOCH_AXIS = "step", "epoch"


def axis_of(key: str) -> str:
    """Step-level series (`train/loss_step`, `lr/head`) are drawn against optimiser steps, the rest against epochs."""
    return STEP_AXIS if key.endswith("_step") or key.startswith("lr/") or "/lr/" in key else EPOCH_AXIS


def epoch_of(metrics: dict):
    """The epoch of an epoch record (`epoch`, or `fold<k>/epoch` in cross-validation); None for step records."""
    return next((v for k, v in metrics.items() if k == EPOCH_AXIS or k.endswith("/" + EPOCH_AXIS)), None)


def confusion_pairs(matrix, n_classes: int) -> tuple[list[int], list[int]]:
    """(true, predicted) class lists with each cell's count of pairs, for wandb's confusion-matrix plot."""
    counts = np.asarray(matrix, dtype=np.int64)
    if counts.shape != (n_classes, n_classes) or (counts < 0).any():
        raise ValueError(f"confusion matrix of shape {counts.shape}: expected {n_classes}x{n_classes} "
                         f"non-negative counts (rows true class, columns predicted class)")
    true, pred = np.indices(counts.shape).reshape(2, -1)
    repeats = counts.reshape(-1)
    return np.repeat(true, repeats).tolist(), np.repeat(pred, repeats).tolist()


class WandbTracker(Tracker):
    """One wandb run. The keyword arguments after `*` are the keys of conf/logger/wandb.yaml; run_dir, info,
    config, monitor and direction are given by the run (common.tracking.tracker.RUNTIME_ARGS)."""

    def __init__(self, *, run_dir: Path, info: RunInfo, config: dict, monitor: str, direction: str,
                 project: str | None, entity: str | None, mode: str | None, job_type: str | None, artifacts: bool,
                 verbose: bool, console: str):
        self.info, self.artifacts = info, bool(artifacts)
        self.monitor, self.direction = str(monitor), str(direction)
        settings = wandb.Settings(silent=not bool(verbose), console=str(console))
        self.run = wandb.init(project=project, entity=entity, mode=mode, group=info.group, job_type=job_type,
                              tags=info.tags, name=info.name, dir=str(run_dir), config=config, settings=settings,
                              reinit="finish_previous")
        self._defined: set[str] = {STEP_AXIS, EPOCH_AXIS}
        for axis in (STEP_AXIS, EPOCH_AXIS):
            self.run.define_metric(axis)

    def _define(self, key: str) -> None:
        """Each series once, on its axis; the monitored metric (also per fold) keeps its best and last value."""
        if key in self._defined:
            return
        self._defined.add(key)
        best = "max" if self.direction == "maximize" else "min"
        monitored = key == self.monitor or key.endswith("/" + self.monitor)
        self.run.define_metric(key, step_metric=axis_of(key), summary=f"{best},last" if monitored else None)

    def _log(self, row: dict) -> None:
        """`row` holds its axis values (`step`, `epoch`); wandb's own step just moves on (module docstring)."""
        for key in row:
            self._define(key)
        self.run.log(row)

    def log_metrics(self, metrics, step):
        row = {**metrics, STEP_AXIS: step}
        epoch = epoch_of(metrics)
        if epoch is not None:
            row[EPOCH_AXIS] = epoch
        self._log(row)

    def log_images(self, name, images, step, captions=None):
        captions = captions or [None] * len(images)
        self._log({name: [wandb.Image(im, caption=c) for im, c in zip(images, captions)], STEP_AXIS: step})

    def log_image(self, name, image, caption=None):
        """image: a file path or an HxW(xC) array."""
        self.run.log({name: wandb.Image(str(image) if isinstance(image, Path) else image, caption=caption)})

    def log_table(self, name, columns, rows):
        self.run.log({name: wandb.Table(columns=columns, data=rows)})

    def log_confusion_matrix(self, name, matrix, class_names):
        true, pred = confusion_pairs(matrix, len(class_names))
        self.run.log({name: wandb.plot.confusion_matrix(y_true=true, preds=pred, class_names=list(class_names),
                                                        title=name)})

    def set_config(self, cfg, from_checkpoint):
        """eval / predict: the config the checkpoint's network was rebuilt with replaces the command line's, and so
        do the choices of the groups behind its sections `from_checkpoint` (the checkpoint's run's choices)."""
        self.run.config.update(logged_config(cfg, self.info, tuple(from_checkpoint)), allow_val_change=True)

    def set_summary(self, metrics):
        for key, value in metrics.items():
            self.run.summary[key] = value

    def add_tags(self, tags):
        """Tags known only at the end of a run (`pruned`), after those of its config."""
        self.run.tags = tuple(self.run.tags or ()) + tuple(t for t in tags if t not in (self.run.tags or ()))

    def log_artifact(self, path: Path, kind: str) -> None:
        artifact = wandb.Artifact(f"{self.run.id}-{path.stem}", type=kind)
        if path.is_dir():
            artifact.add_dir(str(path))
        else:
            artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def report_run(self, run_dir):
        """After a mode: the pictures of the run directory, the scores of written predictions (summary
        `predict/<score>`), and with logger.artifacts the best checkpoint and the prediction files."""
        run_dir = Path(run_dir)
        for picture in sorted(run_dir.glob("*.png")):
            self.log_image(f"files/{picture.stem}", picture)
        final_path = run_dir / "metrics.json"
        final = json.loads(final_path.read_text()) if final_path.is_file() else {}
        outputs = {k: Path(v) for k, v in final.get("outputs", {}).items()}
        if "scores" in outputs:
            scores = json.loads(outputs["scores"].read_text())
            self.set_summary({f"predict/{k}": v for k, v in scores.items() if isinstance(v, (int, float))})
        if not self.artifacts:
            return
        best = final.get("checkpoints", {}).get("best")
        if best and Path(best).is_file():
            self.log_artifact(Path(best), "model")
        for path in outputs.values():
            if path.exists():
                self.log_artifact(path, "predictions")

    def finish(self, exit_code=0):
        self.run.finish(exit_code=exit_code)
