"""The one interface every task speaks.

A task is data + model + loss + metrics + an output writer + a synthetic-data generator.
`common.runs.app` drives every mode (train / eval / predict / cv / synth) through these methods only
(eval and predict through `common.inference.predictor`, which turns checkpoints into a predictor with the components of
the run's `inference` section: ensemble, stack, tta), so training, evaluation, prediction and export have one
code path each.

Conventions
- A batch is a dict. Tensor values are moved to the device by the trainer; anything else
  (ids, file names, set names) stays on the CPU as a list.
- A model is an `nn.Module` whose `forward(batch) -> dict[str, Tensor]` returns named outputs.
  Its frozen backbone lives at `model.backbone` (a `common.models.backbone.Backbone`), so parameter
  tagging (`head` / `adapter` / `backbone`) works by name.
- A criterion is an `nn.Module` whose `forward(outputs, batch) -> dict[str, Tensor]` returns the
  exact weighted terms that sum to the loss (so PCGrad and logging see each term). Its own
  parameters (uncertainty-weighting log-variances) are tagged `uw`.
- `stats` is a dict of plain containers (lists, floats, strings) fitted on the training split only
  and saved in every checkpoint, so a checkpoint alone (plus backbone weights) can predict.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.utils.data import Dataset

from common.metric import Metric

Batch = dict[str, Any]
Outputs = dict[str, Tensor]


class Task(ABC):
    """Subclass once per task; the class path is `task._target_` in `conf/task/<name>.yaml`."""

    # Keys of the task config section that eval / predict take from this run, not from the checkpoint (e.g. the
    # submission's team name). How checkpoints become a predictor (ensembles, stacking, test-time augmentation) is
    # the `inference` section (conf/inference/<task>.yaml), always this run's: common.inference.predictor.
    INFERENCE_KEYS: tuple[str, ...] = ()

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    @property
    def name(self) -> str:
        return str(self.cfg.task.name)

    # ---- data -------------------------------------------------------------------------------
    @abstractmethod
    def synthesize(self, root: Path, seed: int) -> None:
        """Write a small synthetic dataset with a learnable signal in the real on-disk format."""

    @abstractmethod
    def datasets(self, root: Path, stage: str, model: nn.Module | None = None) -> dict[str, Dataset]:
        """Datasets for a stage. model (eval / predict): the predictor's model the datasets feed, e.g. an ensemble
        whose members each need their own inputs (roadwork); None in training.

        stage "fit"     -> {"train": ..., "val": ...}; a training dataset may carry `sample_weights`, one per item
                           (each epoch then draws with replacement in proportion; common.data.datasets.sample_weights_of)
        stage "cv"      -> {"train": all labelled items with train transforms,
                            "val":   the same items, in the same order, with eval transforms}
        stage "eval"    -> {"eval": labelled items to score}
        stage "predict" -> {"predict": items to write official outputs for}
        """

    def cv_groups(self, dataset: Dataset) -> np.ndarray:
        """One group id per item of the "cv" datasets; items of a group never split across folds."""
        return np.arange(len(dataset))

    def cv_folds(self, groups: np.ndarray, n_folds: int, seed: int, labels: np.ndarray | None = None) -> np.ndarray:
        """Fold id per item of the "cv" datasets (mode=cv); default: the task's splitter over the groups (and the
        items' labels for a stratified splitter)."""
        from common.data.folds import assign_folds
        return assign_folds(groups, n_folds, seed, self.cv_splitter(n_folds, seed), labels)

    def cv_splitter(self, n_folds: int, seed: int):
        """mode=cv's fold splitter: an sklearn splitter with split(X, y, groups); default shuffled GroupKFold."""
        from sklearn.model_selection import GroupKFold
        return GroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)

    def cv_labels(self, dataset: Dataset) -> np.ndarray | None:
        """Optional: one class label per item of the "cv" datasets (stratified splitters; counts per fold)."""
        return None

    def fit_stats(self, train_set: Dataset) -> dict:
        """Normalisation statistics from the training split only (plain containers)."""
        return {}

    def collate(self, items: list[dict]) -> Batch:
        from common.data.datasets import default_collate
        return default_collate(items)

    # ---- model, loss, metric ----------------------------------------------------------------
    @abstractmethod
    def build_model(self, stats: dict) -> nn.Module:
        """Backbone (+ adapters) + head; forward(batch) -> outputs."""

    @abstractmethod
    def build_criterion(self, stats: dict) -> nn.Module:
        """forward(outputs, batch) -> {term name: weighted scalar}; the loss is their sum."""

    @abstractmethod
    def build_metric(self, stats: dict) -> Metric:
        """update(outputs, batch) per batch, compute() -> {name: float}."""

    def on_validation_end(self, model: nn.Module, metrics: dict[str, float]) -> None:
        """Called after each validation, before checkpoints are written (e.g. to calibrate a threshold)."""
        return None

    def check_prediction_group(self, label: str) -> None:
        """mode=predict with ckpt_path={label: checkpoints, ...}: called on the task restored from the label's
        checkpoints before they predict; raise if they do not belong under that label (default: any label)."""
        return None

    # ---- outputs ----------------------------------------------------------------------------
    @abstractmethod
    def write_predictions(self, results: Iterable[tuple[Outputs, Batch]], dataset: Dataset, out_dir: Path,
                          stats: dict) -> dict[str, Path]:
        """Write the official output files (docs/FORMATS.md) from (outputs, batch) pairs on the CPU; dataset: the
        "predict" dataset they came from (what the files list beyond the predictions, e.g. every test row).
        Returns {description: path} of what was written."""

    @abstractmethod
    def oof_rows(self, outputs: Outputs, batch: Batch, stats: dict) -> list[dict]:
        """Rows of oof.csv for one validation batch in cross-validation (id, true, predicted): one per item, the
        same keys in every row; mode=cv refuses a run without any."""

    def write_eval_outputs(self, metric: Metric, dataset: Dataset, out_dir: Path, tracker) -> dict[str, Path]:
        """Optional: mode=eval's files beyond metrics.json (e.g. error analysis) from the metric after compute();
        returns {what: path}."""
        return {}

    def log_media(self, logger, outputs: Outputs, batch: Batch, stats: dict, step: int) -> None:
        """Optional: images or plots a person would look at (first validation batch per epoch)."""
        return None
