"""Roadwork datasets: samples -> views (V, 3, S, S) in [0, 1] + metadata indices + label.

`data.metadata` names the metadata inputs. A field whose mere presence predicts the label (NATIX
`scene_description`, non-empty almost only for roadwork) is refused unless `data.allow_leaky_fields`.
With `data.masks` set, items also carry the views' roadwork-object masks (`seg_target`, cut and augmented
like the views) and `mask_known` (0 when the image has no mask file; see `mask_files`).
With an `ImageCache` (data.image_cache) the deterministic part of an item, the decoded image cut into its
resized views (and the mask views), is read from disk after the first pass; augmentation runs after it.
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from common.data.augment import build_augment
from common.data.feature_cache import FeatureCache, file_digest, image_key, pixels_or_features
from common.data.image_cache import ImageCache, through
from common.data.image_check import raise_if_broken
from roadwork.augment import augment_views, augment_views_and_masks
from roadwork.challenge import BenchmarkTransform
from roadwork.samples import Sample, index_samples
from roadwork.views import cut_views, resolve_views

log = logging.getLogger(__name__)
CATEGORY_FIELDS = ("weather", "daytime", "scene")
MASK_THRESHOLD = 128   # mask pixels >= this are roadwork object (the format writes 0 and 255)


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


def _relative_to_root(image: Path, root: Path) -> Path:
    for resolve in (os.path.abspath, os.path.realpath):   # realpath: manifests store resolved image paths
        image_path, root_path = Path(resolve(image)), Path(resolve(root))
        if image_path.is_relative_to(root_path):
            return image_path.relative_to(root_path)
    raise ValueError(f"{image}: not under data.root={root}; data.masks finds an image's mask by the image's "
                     f"path relative to data.root")


def mask_files(samples: list[Sample], root: Path, masks: str) -> list[Optional[Path]]:
    """data.masks: the mask of image <root>/<split>/<rel>/<stem>.jpg is <root>/<masks>/<split>/<rel>/<stem>.png
    (single channel, 0 background, 255 roadwork object); None for an image without a mask file."""
    folder = Path(root) / masks
    if not folder.is_dir():
        raise FileNotFoundError(
            f"data.masks={masks!r}: no folder {folder}; expected <data.masks>/<split>/<stem>.png for the images "
            f"<split>/<stem>.jpg (a synthetic dataset generated before masks existed has none: delete it under "
            f"<paths.cache_dir>/synthetic)")
    paths = [folder / _relative_to_root(sample.image, Path(root)).with_suffix(".png") for sample in samples]
    found = [path if path.is_file() else None for path in paths]
    raise_if_broken((p for p in found if p is not None), "masks")    # decoded in full once (common.data.image_check)
    return found


def seg_target(masks: Optional[list[np.ndarray]], count: int, size: int) -> dict:
    """`seg_target` (V, 1, S, S) in {0, 1} and `mask_known` (0.0 with an all-zero target when no mask)."""
    if masks is None:
        return {"seg_target": torch.zeros(count, 1, size, size), "mask_known": 0.0}
    return {"seg_target": torch.from_numpy(np.stack(masks) >= MASK_THRESHOLD)[:, None].float(), "mask_known": 1.0}


class RoadworkDataset(Dataset):
    """Items: views, label (-1 unknown), weather/daytime/scene indices (0 unknown), gps, gps_known, image."""

    def __init__(self, samples: list[Sample], views, view_size: int, augment: Optional[Sequence] = None,
                 benchmark: Optional[BenchmarkTransform] = None, seed: int = 0, benchmark_random: bool = False,
                 cache_features: bool = False, masks: Optional[list[Optional[Path]]] = None,
                 image_cache: Optional[ImageCache] = None, feature_cache: Optional[FeatureCache] = None):
        if masks is not None and benchmark is not None:
            raise ValueError("data.masks with the benchmark transform levels: the levels rotate and crop the image "
                             "and its mask cannot follow; set data.train_benchmark_levels=false or data.masks=null")
        if masks is not None and len(masks) != len(samples):
            raise ValueError(f"{len(masks)} mask paths for {len(samples)} samples")
        self.samples = samples
        self.sample_weights = None  # training sets: one sampling weight per sample (data.gps_sampling), else None
        self.masks = masks          # per sample: its mask file or None; None = no masks configured
        if cache_features and (augment or benchmark is not None):
            raise ValueError("cached backbone features are of the clean views: a dataset with cache_features takes no "
                             "augmentation or benchmark levels (set data.cache_features=false)")
        self.cache_features = cache_features  # items carry one feature-cache key per view
        self.feature_cache = feature_cache    # with it, "views" is the stored tokens on a hit (nothing decoded)
        self.view_names = resolve_views(views)
        self.view_size = int(view_size)
        self.pipeline = build_augment(augment)     # None without augmentation
        self.benchmark = benchmark
        self.seed = seed
        self.benchmark_random = benchmark_random   # train: a fresh level per draw; eval: one fixed level per item
        # The benchmark levels transform the whole image randomly before the views are cut: nothing
        # deterministic is left to cache, so such a dataset bypasses the image cache.
        self.image_cache = None if benchmark is not None else image_cache
        # Everything that decides the cached arrays besides the files' contents (a change misses).
        self.preparation = f"roadwork|views={','.join(self.view_names)}|size={self.view_size}"

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, sample: Sample) -> Image.Image:
        try:
            with Image.open(sample.image) as img:
                return img.convert("RGB")
        except OSError as err:
            raise ValueError(f"{sample.image}: cannot decode image ({err})") from err

    def load_mask(self, index: int, size: tuple[int, int]) -> Optional[Image.Image]:
        path = None if self.masks is None else self.masks[index]
        if path is None:
            return None
        try:
            with Image.open(path) as mask:
                mask.load()
        except OSError as err:
            raise ValueError(f"{path}: cannot decode object mask ({err})") from err
        if mask.mode not in ("L", "1") or mask.size != size:
            raise ValueError(f"{path}: expected a single-channel mask (0 background, 255 roadwork object) of its "
                             f"image's size {size}, got mode {mask.mode} size {mask.size}")
        return mask.convert("L")

    def _prepared(self, index: int, with_views: bool = True) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
        """The deterministic part: views (V, S, S, 3) uint8 (None unless `with_views`) and mask views (V, S, S)
        (None without a mask)."""
        sample = self.samples[index]
        decoded = functools.cache(lambda: self.load_image(sample))       # decoded once, and only on a miss
        views = through(self.image_cache, sample.image, f"{self.preparation}|lanczos",
                        lambda: np.stack(cut_views(decoded(), self.view_names, self.view_size))) if with_views else None
        path = None if self.masks is None else self.masks[index]
        if path is None:
            return views, None
        # Keyed by the image; the mask file's digest in the id, so an edited mask misses too.
        mask_id = "" if self.image_cache is None else file_digest(path)
        masks = through(self.image_cache, sample.image, f"{self.preparation}|nearest|mask={mask_id}",
                        lambda: np.stack(cut_views(self.load_mask(index, header_size(sample.image)),
                                                   self.view_names, self.view_size, Image.NEAREST)))
        return views, masks

    def _benchmark_views(self, index: int) -> list[np.ndarray]:
        # Eval: index-seeded draws (level and all), so benchmark scores are reproducible. Train: the
        # transform's own generator, which the trainer reseeds per worker and epoch.
        seed = None if self.benchmark_random else self.seed * 100003 + index
        sample = self.samples[index]
        image = self.benchmark(np.asarray(self.load_image(sample)), seed, sample.mask_center)
        return cut_views(Image.fromarray(image), self.view_names, self.view_size)

    def _views(self, index: int) -> tuple[list[np.ndarray], Optional[list[np.ndarray]]]:
        if self.benchmark is not None:                       # no masks with the benchmark levels (__init__)
            return augment_views(self._benchmark_views(index), self.pipeline), None
        views, masks = self._prepared(index)
        if masks is None:
            return augment_views(list(views), self.pipeline), None
        return augment_views_and_masks(list(views), list(masks), self.pipeline)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        prepared = functools.cache(lambda: self._views(index))       # decoded once, and only when needed

        def pixels() -> torch.Tensor:
            return torch.from_numpy(np.stack(prepared()[0])).permute(0, 3, 1, 2).float().div_(255.0)
        keys = [image_key(sample.image, f"{name}-{self.view_size}") for name in self.view_names] \
            if self.cache_features else None
        views = pixels() if keys is None else pixels_or_features(self.feature_cache, keys, pixels)
        item = {"views": views, "label": sample.label, "image": sample.name}
        if self.masks is not None:        # a cache hit decodes the masks only (no augmentation with the cache)
            masks = prepared()[1] if isinstance(views, torch.Tensor) else self._prepared(index, with_views=False)[1]
            item.update(seg_target(None if masks is None else list(masks), len(self.view_names), self.view_size))
        if keys is not None:
            item["cache_key"] = keys
        for key, value in sample.meta.items():
            if key == "gps":
                item["gps"] = torch.tensor(value, dtype=torch.float32)
            elif key == "gps_known":
                item["gps_known"] = float(value)
            elif isinstance(value, str):          # raw text of a text field (sentence encoder input)
                item[key] = value
            else:
                item[key] = int(value)
        return item


def header_size(path: Path) -> tuple[int, int]:
    """(W, H) of an image from its header (nothing decoded)."""
    try:
        with Image.open(path) as img:
            return img.size
    except OSError as err:
        raise ValueError(f"{path}: cannot read the image header ({err})") from err


def split_indices(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train / val split of one labelled folder (used when data.val is null)."""
    from sklearn.model_selection import train_test_split
    idx = np.arange(len(labels))
    train, val = train_test_split(idx, test_size=val_fraction, random_state=seed, stratify=labels)
    return np.sort(train), np.sort(val)


def _log_index_notes(rel: str, index) -> None:
    """One warning per kind: skipped samples, orphan sidecars, per field the values outside its vocabulary
    and the malformed values of fields no input uses."""
    if index.skipped:
        log.warning("%s: skipped %d bad samples (data.skip_bad=true):\n  %s", rel, len(index.skipped),
                    "\n  ".join(reason for _, reason in index.skipped[:20]))
    if index.orphans:
        log.warning("%s: %d sidecars without an image (ignored): %s", rel, len(index.orphans),
                    ", ".join(index.orphans[:20]))
    for name, counts in sorted(index.unseen.items()):
        log.warning("%s: %d %s values outside data.vocabularies.%s became NULL (unknown): %s", rel,
                    sum(counts.values()), name, name, dict(counts.most_common(10)))
    for name, problems in sorted(index.ignored.items()):
        log.warning("%s: %d malformed %s values ignored (no input of this run uses %s), e.g. %s", rel,
                    len(problems), name, name, problems[0])


def load_index(root: Path, rel: str, data_cfg, require_label: bool):
    vocabularies, text_fields = metadata_spec(data_cfg)
    index = index_samples(Path(root) / rel, vocabularies, text_fields, require_label, bool(data_cfg.skip_bad),
                          gps_used="gps" in list(data_cfg.metadata))
    _log_index_notes(rel, index)
    return index
