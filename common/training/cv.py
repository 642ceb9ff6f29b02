"""mode=cv: one model per grouped fold, out-of-fold predictions and metrics."""
from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from torch.utils.data import Subset

from common.data.datasets import sample_weights_of
from common.tracking.console import results_block
from common.tracking.tracker import RunFiles, Tracker
from common.training.checkpoint import load_checkpoint, restore_for_inference
from common.training.divergence import raise_if_diverged
from common.training.parts import build_parts
from common.training.trainer import Trainer
from common.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)


def print_label_counts(folds: np.ndarray, labels: np.ndarray, n_folds: int) -> None:
    """[cv] labels per fold: fold 0: 0=12, 1=5; ... (e.g. the positives of a stratified split)."""
    counts = ["fold %d: " % f + ", ".join(f"{c}={int(((folds == f) & (labels == c)).sum())}" for c in np.unique(labels))
              for f in range(n_folds)]
    log.info("[cv] labels per fold: " + "; ".join(counts))


class FoldTracker(Tracker):
    """Logs one fold's metrics under `fold<k>/` with steps after the previous folds' (wandb needs monotone steps)."""

    def __init__(self, inner: Tracker, fold: int, step_offset: int):
        self.inner, self.prefix, self.offset = inner, f"fold{fold}/", step_offset

    def log_metrics(self, metrics, step):
        self.inner.log_metrics({self.prefix + k: v for k, v in metrics.items()}, step + self.offset)

    def log_images(self, name, images, step, captions=None):
        self.inner.log_images(self.prefix + name, images, step + self.offset, captions)


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        raise ValueError(f"no rows to write to {path}: the task's oof_rows returned nothing")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0].keys()))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


CHECKPOINTS = ("best", "last")


def fold_checkpoint(fold_dir: Path, which: str) -> Path:
    """cv.checkpoint: the fold model that OOF predictions and fold ensembles use (best.pt chosen on the
    held-out fold itself, so an optimistic OOF, or last.pt, the final epoch)."""
    if which not in CHECKPOINTS:
        raise ValueError(f"cv.checkpoint={which!r}: expected one of {CHECKPOINTS}")
    return Path(fold_dir) / "checkpoints" / f"{which}.pt"


def cross_validate(cfg: DictConfig, task, root, run_dir: Path, tracker: Tracker, ctx) -> float | None:
    sets = task.datasets(root, "cv")
    groups = np.asarray(task.cv_groups(sets["train"]))
    n_folds, labels = int(cfg.cv.folds), task.cv_labels(sets["train"])
    folds = task.cv_folds(groups, n_folds, int(cfg.seed), labels)
    log.info("[cv] fold sizes: " + str(np.bincount(folds, minlength=n_folds).tolist()))
    if labels is not None:
        print_label_counts(folds, np.asarray(labels), n_folds)
    if ctx.is_main:
        write_csv(run_dir / "folds.csv", [{"index": i, "group": g, "fold": f}
                                          for i, (g, f) in enumerate(zip(groups, folds))])
    oof_rows, oof_metric, step_offset = [], None, 0
    for fold in range(int(cfg.cv.folds)):
        train_idx, val_idx = np.flatnonzero(folds != fold), np.flatnonzero(folds == fold)
        train_set, val_set = Subset(sets["train"], train_idx), Subset(sets["val"], val_idx)
        stats = task.fit_stats(train_set)
        model, criterion, metric = build_parts(task, stats)
        fold_dir = run_dir / f"fold_{fold}"
        trainer = Trainer(cfg, fold_dir, FoldTracker(tracker, fold, step_offset), ctx)
        state = trainer.fit(task, model, criterion, metric, train_set, val_set, stats,
                            sample_weights_of(train_set))
        step_offset += state.step
        raise_if_diverged(state, str(cfg.trainer.monitor))
        chosen = fold_checkpoint(fold_dir, str(cfg.cv.checkpoint))
        restore_for_inference(model, load_checkpoint(chosen, task.name), str(chosen))
        oof_metric, fold_metric = oof_metric or task.build_metric(stats), task.build_metric(stats)
        fold_metric.reset()
        for outputs, batch in trainer.infer(model, val_set, task.collate):
            oof_metric.update(outputs, batch)
            fold_metric.update(outputs, batch)
            oof_rows += [{"fold": fold, **row} for row in task.oof_rows(outputs, batch, stats)]
        fold_values = fold_metric.compute()
        if ctx.is_main:
            RunFiles(fold_dir).write_final({"fold": fold, "checkpoint": str(chosen), "size": int(len(val_idx)),
                                            "best_value": state.best_value, "best_epoch": state.best_epoch,
                                            **{f"val/{k}": v for k, v in fold_values.items()}})
        key = str(cfg.optimized_metric).split("/", 1)[-1]
        log.info(f"[cv] fold {fold}: best {cfg.trainer.monitor} {state.best_value:.4f} at epoch {state.best_epoch}; "
                 f"{chosen.name} on the fold: {key} {fold_values.get(key, float('nan')):.4f}")
    values = {f"oof/{k}": v for k, v in oof_metric.compute().items()}
    if ctx.is_main:
        write_csv(run_dir / "oof.csv", oof_rows)
        RunFiles(run_dir).write_final({"folds": int(cfg.cv.folds), **values})
    tracker.set_summary(values)
    if ctx.is_main:
        log.info(results_block(run_dir, values, str(cfg.optimized_metric).split("/", 1)[-1],
                               [("folds", f"{cfg.cv.folds} ({cfg.cv.checkpoint}.pt of each fold: out-of-fold)")]))
    return values.get("oof/" + str(cfg.optimized_metric).split("/", 1)[-1])
