"""The CSIRO Image2Biomass task: datasets, statistics, model / loss / metric, submission.csv."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable

import hydra
import numpy as np
import pandas as pd
from omegaconf import OmegaConf
from sklearn.model_selection import GroupKFold
from torch.utils.data import Dataset

from biomass.config_check import check_and_reconcile
from biomass.constants import TARGETS
from biomass.data import BiomassDataset, fit_stats, group_keys
from biomass.outputs import collect_predictions, score_submission, write_submission
from biomass.plots import scatter_image
from biomass.synth import SynthConfig, write_synthetic
from biomass.table import read_solution_table, read_test_table, read_train_table, report_missing
from common.data.augment import build_augment
from common.data.datasets import unwrap_subset
from common.data.cached_encoder import encoder_for, feature_cache_of
from common.data.image_cache import ImageCache
from common.task import Task

log = logging.getLogger(__name__)


def _table_of(dataset: Dataset) -> pd.DataFrame:
    """The wide table behind a BiomassDataset or a Subset of one (rows in the subset's order)."""
    base, indices = unwrap_subset(dataset)
    if not isinstance(base, BiomassDataset):
        raise TypeError(f"expected a BiomassDataset or a Subset of one, got {type(base).__name__}")
    return base.table.iloc[indices].reset_index(drop=True)


class BiomassTask(Task):
    def __init__(self, cfg):
        super().__init__(cfg)
        check_and_reconcile(cfg)

    # ---- data -------------------------------------------------------------------------------
    def synthesize(self, root: Path, seed: int) -> None:
        synth = OmegaConf.to_container(self.cfg.data.synth, resolve=True) if "synth" in self.cfg.data else {}
        write_synthetic(Path(root), seed, SynthConfig(**{k: tuple(v) if isinstance(v, list) else v
                                                         for k, v in synth.items()}))

    def _dataset(self, table: pd.DataFrame, root: Path, train: bool) -> BiomassDataset:
        d = self.cfg.data
        h, w = int(d.image_size[0]), int(d.image_size[1])
        draft = (w * int(d.decode_scale), h * int(d.decode_scale)) if d.decode_scale else None
        cached = bool(d.cache_features)  # cached tokens are of the clean image: no pixel augmentation
        augment = build_augment(d.augment) if train and not cached else None
        tiles = OmegaConf.select(self.cfg, "inference.tta.tiles")      # tiled inference reads the original image
        return BiomassDataset(table, root, augment, draft_size=draft, image_size=(h, w),
                              cache_view=self._cache_view() if cached else None,
                              feature_cache=feature_cache_of(self.cfg, (h, w)),
                              image_cache=ImageCache.from_config(d.get("image_cache")),
                              hires_scale=float(tiles.scale) if tiles and not train else None)

    def _cache_view(self) -> str:
        """Everything that decides the pixels the backbone sees, for the feature-cache key."""
        d = self.cfg.data
        return f"full-{int(d.image_size[0])}x{int(d.image_size[1])}-decode{int(d.decode_scale)}"

    def check_metadata_columns(self, root: Path) -> None:
        """Metadata fusion needs its fields in test.csv too, unless it was trained with field dropout (then
        absent fields are fed as unknown): fail at start, not at prediction time."""
        meta = self.cfg.model.get("metadata")
        test_csv = Path(root) / self.cfg.data.test_csv
        if meta is None or meta.mode == "none" or not test_csv.is_file():
            return
        columns = set(pd.read_csv(test_csv, nrows=0).columns)
        missing = [f for f in meta.fields if f not in columns]
        if missing and float(meta.field_dropout) > 0:
            log.info(f"[data] {test_csv} lacks metadata fields {missing}: predictions treat them as unknown "
                     f"(the model learns that with model.metadata.field_dropout={meta.field_dropout})")
        elif missing:
            raise ValueError(f"model.metadata.mode={meta.mode} uses fields {list(meta.fields)}, but {test_csv} "
                             f"lacks {missing} (it has {sorted(columns)}); set model.metadata.mode=none, or "
                             f"model.metadata.field_dropout > 0 to train the model to predict without them")

    def check_early_ndvi(self, table: pd.DataFrame, csv: Path) -> None:
        """model.early_ndvi feeds the NDVI column to the backbone: every table read needs it."""
        if self.cfg.model.get("early_ndvi") and "Pre_GSHH_NDVI" not in table.columns:
            raise ValueError(f"model.early_ndvi=true reads column Pre_GSHH_NDVI as the 4th input channel, but {csv} "
                             f"has no such column; set model.early_ndvi=false or give the table that column")

    def datasets(self, root: Path, stage: str, model=None) -> dict[str, Dataset]:
        d, root = self.cfg.data, Path(root)
        self.check_metadata_columns(root)
        if stage in ("fit", "cv"):
            table = read_train_table(root, d.train_csv, skip_bad=bool(d.skip_bad))
            self.check_early_ndvi(table, root / d.train_csv)
            report_missing(table, root / d.train_csv)
            if stage == "cv":
                train, val = table, table
            else:
                folds = self.cv_folds(group_keys(table), int(d.n_folds), int(self.cfg.seed))
                train, val = table[folds != int(d.val_fold)], table[folds == int(d.val_fold)]
            train_set = self._dataset(train, root, True)
            train_set.baseline_g = [float(v) for v in table[list(TARGETS)].mean(skipna=True)]   # the full table's
            return {"train": train_set, "val": self._dataset(val, root, False)}
        if stage == "eval":
            table = read_solution_table(root, d.test_csv, d.solution_csv)
            self.check_early_ndvi(table, root / d.test_csv)
            return {"eval": self._dataset(table, root, False)}
        if stage == "predict":
            _, wide = read_test_table(root, d.test_csv)
            self.check_early_ndvi(wide, root / d.test_csv)
            return {"predict": self._dataset(wide, root, False)}
        raise ValueError(f"stage={stage!r}: expected fit, cv, eval or predict")

    def cv_groups(self, dataset: Dataset) -> np.ndarray:
        return group_keys(_table_of(dataset))

    def cv_folds(self, groups: np.ndarray, n_folds: int, seed: int, labels: np.ndarray | None = None) -> np.ndarray:
        """Grouped folds balanced in size (sklearn's unshuffled GroupKFold: largest group first into the
        smallest fold); deterministic, `seed` unused. mode=train uses the same folds (data.val_fold)."""
        n_groups = len(np.unique(groups))
        if n_groups < n_folds:
            raise ValueError(f"{n_folds} folds but the data has only {n_groups} (Sampling_Date, State) groups; "
                             f"lower cv.folds")
        folds = np.empty(len(groups), dtype=int)
        for fold, (_, val_idx) in enumerate(GroupKFold(n_splits=n_folds).split(groups, groups=groups)):
            folds[val_idx] = fold
        return folds

    def fit_stats(self, train_set: Dataset) -> dict:
        """Training-split statistics, plus baseline_g: the full labelled table's mean grams per target
        (the global-baseline R2's SS_tot centre), which the training set of datasets(root, "fit" or "cv") carries."""
        baseline_g = unwrap_subset(train_set)[0].baseline_g
        if baseline_g is None:
            raise ValueError("fit_stats needs the training set of datasets(root, 'fit' or 'cv'): it carries the full "
                             "labelled table's mean grams (baseline_g)")
        return {**fit_stats(_table_of(train_set), float(self.cfg.data.quadrat_area)), "baseline_g": baseline_g}

    # ---- model, loss, metric ----------------------------------------------------------------
    def build_model(self, stats: dict):
        """The model; in mode=train / cv it averages the views of inference.tta in eval mode (validation, out-of-fold
        predictions), while eval / predict wrap the restored model or ensemble instead (common.inference.predictor)."""
        encoder = encoder_for(self.cfg, input_size=tuple(self.cfg.data.image_size))
        tta = hydra.utils.instantiate(self.cfg.inference.tta)
        if tta is not None and tta.active and self.cfg.data.cache_features:
            raise ValueError("inference.tta changes the pixels the cached tokens were computed from: "
                             "set data.cache_features=false for test-time augmentation")
        training = self.cfg.mode in ("train", "cv")
        return hydra.utils.instantiate(self.cfg.model, backbone=encoder, stats=stats,
                                       tta=tta if training and tta is not None and tta.active else None)

    def build_criterion(self, stats: dict):
        return hydra.utils.instantiate(self.cfg.loss, stats=stats)

    def build_metric(self, stats: dict):
        # checkpoints written before the global-baseline variant have no baseline_g: that variant is left out
        return hydra.utils.instantiate(self.cfg.metric, baseline_g=stats.get("baseline_g"))

    # ---- outputs ----------------------------------------------------------------------------
    def write_predictions(self, results: Iterable, dataset: Dataset, out_dir: Path, stats: dict) -> dict[str, Path]:
        """submission.csv: one row per row of the test.csv beside the predicted images (dataset.root), scored
        against test_solution.csv when the folder has one (the synthetic demo)."""
        root, d = unwrap_subset(dataset)[0].root, self.cfg.data
        test_rows, _ = read_test_table(root, d.test_csv)
        preds = collect_predictions(results)
        path = write_submission(test_rows, preds, Path(out_dir) / "submission.csv")
        written = {"submission": path}
        solution = root / d.solution_csv
        if solution.is_file():
            scores = score_submission(path, solution, Path(out_dir) / "submission_scores.json")
            log.info("[predict] submission.csv vs test_solution.csv: " + json.dumps(scores))
            written["scores"] = Path(out_dir) / "submission_scores.json"
        return written

    def oof_rows(self, outputs, batch, stats: dict) -> list[dict]:
        pred, true = outputs["pred_g"].float().numpy(), batch["targets_g"].float().numpy()
        rows = []
        for i, image_id in enumerate(batch["image_id"]):
            row = {"image_id": image_id}
            row.update({f"true_{t}": round(float(true[i, j]), 6) for j, t in enumerate(TARGETS)})
            row.update({f"pred_{t}": round(float(pred[i, j]), 6) for j, t in enumerate(TARGETS)})
            rows.append(row)
        return rows

    def log_media(self, logger, outputs, batch, stats: dict, step: int) -> None:
        true = np.nan_to_num(batch["targets_g"].float().cpu().numpy())
        image = scatter_image(true, outputs["pred_g"].float().cpu().numpy(), batch["target_mask"].cpu().numpy())
        logger.log_images("val/pred_vs_true", [image], step, captions=["x: true grams, y: predicted grams"])
