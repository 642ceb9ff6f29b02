"""Roadwork datasets: samples -> views (V, 3, S, S) in [0, 1] + metadata indices + label.

`data.metadata` names the metadata inputs. A field whose mere presence predicts the label (NATIX
`scene_description`, non-empty almost only for roadwork) is refused unless `data.allow_leaky_fields`.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from common.cache import image_key
from roadwork.augment import BenchmarkTransform, augment_views, build_pipeline
from roadwork.samples import Sample, index_samples
from roadwork.views import cut_views, resolve_views

log = logging.getLogger(__name__)
CATEGORY_FIELDS = ("weather", "daytime", "scene")


def check_leakage(metadata: Sequence[str], leaky_fields: Sequence[str], allow: bool) -> None:
    leaky = [f for f in metadata if f in set(leaky_fields)]
    if leaky and not allow:
        raise ValueError(
            f"data.metadata includes {leaky}: in the NATIX data such a field is filled (almost) only for roadwork "
            f"images, so its mere presence predicts the label and the model would learn the annotation, not the "
            f"image; the live benchmark sends no metadata. Remove it from data.metadata, or set "
            f"data.allow_leaky_fields=true to use it anyway.")


def metadata_spec(data_cfg) -> tuple[dict, list[str]]:
    """(vocabularies of the categorical inputs, text fields used as presence flags) from config."""
    fields = list(data_cfg.metadata)
    check_leakage(fields, data_cfg.leaky_fields, bool(data_cfg.allow_leaky_fields))
    known = set(CATEGORY_FIELDS) | {"gps"} | set(data_cfg.leaky_fields)
    unknown = [f for f in fields if f not in known]
    if unknown:
        raise ValueError(f"data.metadata: unknown fields {unknown}; expected some of {sorted(known)}")
    vocabularies = {f: list(data_cfg.vocabularies[f]) for f in CATEGORY_FIELDS}
    return vocabularies, [f for f in fields if f in set(data_cfg.leaky_fields)]


class RoadworkDataset(Dataset):
    """Items: views, label (-1 unknown), weather/daytime/scene indices (0 unknown), gps, gps_known, image."""

    def __init__(self, samples: list[Sample], views, view_size: int, augment: Optional[Sequence] = None,
                 benchmark: Optional[BenchmarkTransform] = None, seed: int = 0, benchmark_random: bool = False,
                 cache_features: bool = False):
        self.samples = samples
        self.cache_features = cache_features  # items carry one feature-cache key per view
        self.view_names = resolve_views(views)
        self.view_size = int(view_size)
        self.pipeline = build_pipeline(augment) if augment else None
        self.benchmark = benchmark
        self.seed = seed
        self.benchmark_random = benchmark_random   # train: a fresh level per draw; eval: one fixed level per item

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, sample: Sample) -> Image.Image:
        try:
            with Image.open(sample.image) as img:
                return img.convert("RGB")
        except OSError as err:
            raise ValueError(f"{sample.image}: cannot decode image ({err})") from err

    def _views(self, index: int, image: Image.Image) -> list[np.ndarray]:
        if self.benchmark is not None:
            # Eval: one fixed level per item (index-seeded), so benchmark scores are reproducible.
            seed = None if self.benchmark_random else self.seed * 100003 + index
            level = int(np.random.default_rng(seed).integers(len(self.benchmark.levels)))
            image = Image.fromarray(self.benchmark(np.asarray(image), level, seed))
        views = cut_views(image, self.view_names, self.view_size)
        return augment_views(views, self.pipeline)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        views = np.stack(self._views(index, self.load_image(sample)))
        item = {"views": torch.from_numpy(views).permute(0, 3, 1, 2).float().div_(255.0),
                "label": sample.label, "image": sample.name}
        if self.cache_features:
            item["cache_key"] = [image_key(sample.image, f"{name}-{self.view_size}") for name in self.view_names]
        for key, value in sample.meta.items():
            if key == "gps":
                item["gps"] = torch.tensor(value, dtype=torch.float32)
            elif key == "gps_known":
                item["gps_known"] = float(value)
            else:
                item[key] = int(value)
        return item


def split_indices(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train / val split of one labelled folder (used when data.val is null)."""
    from sklearn.model_selection import train_test_split
    idx = np.arange(len(labels))
    train, val = train_test_split(idx, test_size=val_fraction, random_state=seed, stratify=labels)
    return np.sort(train), np.sort(val)


def load_index(root: Path, rel: str, data_cfg, require_label: bool):
    vocabularies, text_fields = metadata_spec(data_cfg)
    index = index_samples(Path(root) / rel, vocabularies, text_fields, require_label, bool(data_cfg.skip_bad))
    if index.skipped:
        log.warning("%s: skipped %d bad samples (data.skip_bad=true):\n  %s", rel, len(index.skipped),
                    "\n  ".join(index.skipped[:20]))
    return index
