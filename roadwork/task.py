"""RoadworkTask: NATIX-style image + sidecar classification (see docs/FORMATS.md, roadwork)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import numpy as np
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import Dataset

from common.data.datasets import unwrap_subset
from common.data.cached_encoder import encoder_for, feature_cache_of
from common.data.image_cache import ImageCache
from common.metric import Metric
from common.models.option_groups import instantiate_grouped
from common.task import Batch, Outputs, Task
from roadwork import gps_sampling, synth
from roadwork.challenge import BenchmarkTransform
from roadwork.augment import scale_probabilities
from roadwork.data import CATEGORY_FIELDS, RoadworkDataset, load_index, mask_files, metadata_spec, split_indices
from roadwork.ensemble import MemberInputs, input_spec
from roadwork.model import RoadworkModel
from roadwork.outputs import write_predictions_csv
from roadwork.views import resolve_views


class RoadworkTask(Task):
    @property
    def data(self):
        return self.cfg.data

    def synthesize(self, root: Path, seed: int) -> None:
        s = self.data.synth
        synth.synthesize(Path(root), seed, OmegaConf.to_container(s.splits, resolve=True), s.positive_fraction,
                         s.small_fraction, s.distractor_p, s.meta_present, s.jpeg_quality)

    def _dataset(self, samples, train: bool, benchmark: bool = False, masks=None, data=None) -> RoadworkDataset:
        """data: the data config of the model that reads the items (an ensemble member's); default this task's."""
        data = self.data if data is None else data
        bench = None
        benchmark = benchmark or (train and bool(data.train_benchmark_levels))
        cached = bool(data.cache_features)
        if benchmark:
            if cached:
                raise ValueError("the benchmark transform levels change the pixels the cached tokens were computed "
                                 "from: set data.cache_features=false (and data.train_benchmark_levels=false)")
            bench = BenchmarkTransform(self.cfg.challenge)
        # select: checkpoints written before data.image_cache existed carry no such section (= disabled)
        image_cache = ImageCache.from_config(OmegaConf.select(data, "image_cache"))
        scale = float(OmegaConf.select(data, "augment_scale", default=1.0))   # older checkpoints: none
        augment = None if not train or cached or data.augment is None else scale_probabilities(
            OmegaConf.to_container(data.augment, resolve=True), scale)
        # the cache of this task's backbone; an ensemble member's own (data given) reads its cache in its forward
        features = feature_cache_of(self.cfg, (int(data.view_size),) * 2) if cached and data is self.data else None
        return RoadworkDataset(samples, data.views, data.view_size, augment=augment, benchmark=bench,
                               seed=int(self.cfg.seed), benchmark_random=train, cache_features=cached,
                               masks=masks, image_cache=image_cache, feature_cache=features)

    def _inference_set(self, root: Path, split: str, require_label: bool, benchmark: bool, model: nn.Module | None):
        """(dataset, the first member's sample index) of an eval / predict split: one dataset per distinct
        input spec of the members of the model it feeds (`model.member_specs`: an ensemble, a stacked
        ensemble, either wrapped by test-time augmentation; roadwork.ensemble.MemberInputs), or this task's own."""
        specs = getattr(model, "member_specs", None) or [input_spec(self.data)]
        if any(spec is None for spec in specs):
            raise ValueError("an ensemble member has no single input spec (an ensemble of members with different "
                             "inputs inside another ensemble): list its checkpoints directly in ckpt_path")
        sets, indexes = [], []
        for k, spec in enumerate(specs):      # member 0 is this task's own model (app: the first checkpoint)
            if k and spec == specs[0]:
                sets.append(None)
                continue
            data = self.data if k == 0 else OmegaConf.merge(self.data, spec)
            index = load_index(root, split, data, require_label)
            samples = [_without_metadata(s) for s in index.samples] if benchmark else index.samples
            sets.append(self._dataset(samples, False, benchmark=benchmark, data=data))
            indexes.append(index)
        dataset = sets[0] if all(d is None for d in sets[1:]) else MemberInputs(sets)
        return dataset, indexes[0]

    def _masks(self, root: Path, samples) -> list | None:
        """data.masks (fit and cv only, where the seg loss is computed): each sample's mask file or None."""
        folder = self.data.masks
        return None if folder is None else mask_files(samples, root, str(folder))

    def _fit_samples(self, root: Path):
        train = load_index(root, self.data.train, self.data, require_label=True).samples
        if self.data.val is not None:
            return train, load_index(root, self.data.val, self.data, require_label=True).samples
        labels = np.array([s.label for s in train])
        tr, va = split_indices(labels, float(self.data.val_fraction), int(self.cfg.seed))
        return [train[i] for i in tr], [train[i] for i in va]

    def datasets(self, root: Path, stage: str, model: nn.Module | None = None) -> dict[str, Dataset]:
        if stage == "fit":
            train, val = self._fit_samples(root)
            return {"train": self._weighted(root, self._dataset(train, True, masks=self._masks(root, train))),
                    "val": self._dataset(val, False, masks=self._masks(root, val))}
        if stage == "cv":
            train, val = self._fit_samples(root)
            masks = self._masks(root, train + val)
            return {"train": self._weighted(root, self._dataset(train + val, True, masks=masks)),
                    "val": self._dataset(train + val, False, masks=masks)}
        if stage == "eval":
            dataset, _ = self._inference_set(root, self.data.eval, True, self.benchmark, model)
            return {"eval": dataset}
        if stage == "predict":
            dataset, index = self._inference_set(root, self.data.predict, False, False, model)
            dataset.split_index = index     # every input of the split and the skipped ones: predictions.csv lists them
            return {"predict": dataset}
        raise ValueError(f"stage {stage!r}: expected fit, cv, eval or predict")

    def on_validation_end(self, model: nn.Module, metrics: dict[str, float]) -> None:
        """task.calibrate: shift the roadwork logit so that 0.5 becomes the MCC-best validation threshold."""
        if not self.cfg.task.calibrate or not math.isfinite(metrics.get("threshold_best", float("nan"))):
            return
        t = min(max(metrics["threshold_best"], 1e-6), 1 - 1e-6)
        model.logit_shift -= math.log(t / (1 - t))

    @property
    def benchmark(self) -> bool:
        return bool(OmegaConf.select(self.cfg, "benchmark", default=False))

    def fit_stats(self, train_set: Dataset) -> dict:
        base, indices = unwrap_subset(train_set)
        labels = [base.samples[i].label for i in indices]
        return {"view_names": list(base.view_names), "positive_fraction": float(np.mean(labels))}

    def _weighted(self, root: Path, train_set: RoadworkDataset) -> RoadworkDataset:
        """data.gps_sampling: the training set's `sample_weights`, each image's weight by its distance to the
        deployment region's centres (each epoch draws in proportion; mode=cv: the fold's share of them)."""
        if self.data.gps_sampling.enabled:
            train_set.sample_weights = gps_sampling.sample_weights(train_set.samples, Path(root),
                                                                   self.data.gps_sampling, int(self.cfg.seed))
        return train_set

    def build_model(self, stats: dict) -> nn.Module:
        vocabularies, text_fields = metadata_spec(self.data)
        fields = list(self.data.metadata)
        size = int(self.data.view_size)
        model = instantiate_grouped(OmegaConf.to_container(self.cfg.model, resolve=True), RoadworkModel,
                                    backbone=encoder_for(self.cfg, (size, size)),
                                    view_names=resolve_views(self.data.views),
                                    vocab_sizes={f: len(vocabularies[f]) for f in CATEGORY_FIELDS if f in fields},
                                    text_fields=text_fields, use_gps="gps" in fields,
                                    num_weather=len(vocabularies["weather"]), view_size=size)
        model.input_spec = input_spec(self.data)      # what an ensemble needs to feed it its own inputs
        return model

    def build_criterion(self, stats: dict) -> nn.Module:
        return instantiate(self.cfg.loss)

    def build_metric(self, stats: dict) -> Metric:
        vocabularies, _ = metadata_spec(self.data)
        return instantiate(self.cfg.metric, vocabularies=vocabularies, benchmark=self.benchmark, _convert_="all")

    def write_predictions(self, results: Iterable[tuple[Outputs, Batch]], dataset: Dataset, out_dir: Path,
                          stats: dict) -> dict[str, Path]:
        index = getattr(dataset, "split_index", None)    # set by datasets(root, "predict")
        path = write_predictions_csv(results, Path(out_dir) / "predictions.csv",
                                     None if index is None else index.inputs, () if index is None else index.skipped)
        return {"predictions": path}

    def write_eval_outputs(self, metric, dataset, out_dir: Path, tracker) -> dict[str, Path]:
        """Confusion matrix, worst false positives / negatives, breakdown, validator curve (roadwork.errors)."""
        from roadwork.errors import write_error_analysis
        base, _ = unwrap_subset(dataset)
        paths = {sample.name: sample.image for sample in base.samples}
        return write_error_analysis(metric, metric.compute(), paths, Path(out_dir), tracker)

    def cv_splitter(self, n_folds: int, seed: int):
        """Stratified grouped folds: every fold keeps the positive share (sklearn StratifiedGroupKFold)."""
        from sklearn.model_selection import StratifiedGroupKFold
        return StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)

    def cv_labels(self, dataset: Dataset) -> np.ndarray:
        base, indices = unwrap_subset(dataset)
        return np.array([base.samples[i].label for i in indices])

    def oof_rows(self, outputs: Outputs, batch: Batch, stats: dict) -> list[dict]:
        prob = outputs["prob"].float().cpu().numpy()
        return [{"image": name, "label": int(label), "probability": float(p)}
                for name, label, p in zip(batch["image"], batch["label"].tolist(), prob)]


def _without_metadata(sample):
    """The benchmark sends no metadata: every field unknown."""
    from dataclasses import replace
    meta = {k: (0.0, 0.0) if k == "gps" else False if k == "gps_known" else "" if isinstance(v, str) else 0
            for k, v in sample.meta.items()}
    return replace(sample, meta=meta)
