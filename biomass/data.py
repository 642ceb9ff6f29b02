"""Biomass dataset, grouped folds and training-split statistics.

Items are independent of the statistics: they carry grams (NaN where not measured) and raw metadata
strings; the criterion normalises with the statistics of the training split, so a dataset can be
built before `fit_stats` and reused in every fold.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from biomass.augment import build_resize
from biomass.constants import TARGETS
from common.data.feature_cache import FeatureCache, image_key, pixels_or_features
from common.data.image_cache import ImageCache, through


def load_rgb(path: Path, draft_size: Optional[tuple[int, int]] = None) -> np.ndarray:
    """Decode an image to RGB uint8 (H, W, 3); JPEG decoding is scaled down towards `draft_size` (W, H)."""
    try:
        with Image.open(path) as img:
            if draft_size is not None:
                img.draft("RGB", draft_size)
            return np.asarray(img.convert("RGB"))
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {path} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"image file {path} cannot be decoded as an image: {err}") from err


def _float_or_nan(value) -> float:
    out = pd.to_numeric(value, errors="coerce")
    return float(out) if pd.notna(out) else float("nan")


class BiomassDataset(Dataset):
    """One item per image of a wide table (see biomass.table).

    Item: image (3, H, W) float in [0, 1]; image_id; targets_g (5,) grams, NaN where missing;
    target_mask (5,); height, ndvi (NaN where missing) with height_mask, ndvi_mask; state, species
    strings ("" where missing).
    Pixels: decode (JPEG draft towards `draft_size`), resize to `image_size` [H, W] when given (INTER_AREA,
    augment.build_resize), then `transform` (None = none). With an `image_cache` the resized image is read
    from disk after the first time, so later epochs decode and resize nothing.
    hires_scale (tiled inference, inference.tta.tiles.scale): items also carry image_hires, the ORIGINAL image (decoded
    at full resolution) resized to hires_scale x image_size, for tiles of image_size at that resolution.
    cache_view (backbone features cached): items carry cache_key, and with `feature_cache` their "image" is the
    stored tokens when the cache has them (nothing decoded; common.data.feature_cache.pixels_or_features).
    """

    def __init__(self, table: pd.DataFrame, root: Path, transform: Optional[Callable], draft_size=None,
                 cache_view: Optional[str] = None, image_size=None, image_cache: Optional[ImageCache] = None,
                 hires_scale: Optional[float] = None, feature_cache: Optional[FeatureCache] = None):
        if cache_view is not None and transform is not None:
            raise ValueError("cached backbone features are of the clean, resized image: a dataset with a cache_view "
                             "takes no transform (set data.augment=[] or data.cache_features=false)")
        self.table = table.reset_index(drop=True)
        self.cache_view = cache_view  # set when backbone features are cached: items carry a cache_key
        self.feature_cache = feature_cache
        self.root = Path(root)
        self.transform = transform
        self.draft_size = tuple(draft_size) if draft_size is not None else None
        self.image_size = (int(image_size[0]), int(image_size[1])) if image_size is not None else None
        self.resize = build_resize(self.image_size) if self.image_size is not None else None
        self.image_cache = image_cache
        self.hires = None
        if hires_scale is not None:
            if self.image_size is None:
                raise ValueError("tiled inference (inference.tta.tiles) needs data.image_size: tiles are of that size")
            self.hires = build_resize([round(side * float(hires_scale)) for side in self.image_size])
        self.has_targets = all(t in self.table.columns for t in TARGETS)
        self.baseline_g: list[float] | None = None   # training sets: mean grams per target of the full labelled table

    @property
    def preparation(self) -> str:
        """Everything that decides the cached array: decoder draft size, resize target and interpolation."""
        draft = "full" if self.draft_size is None else "x".join(map(str, self.draft_size))
        size = "none" if self.image_size is None else "x".join(map(str, self.image_size)) + "|area"
        return f"biomass/rgb|draft={draft}|resize={size}"

    def _prepared(self, path: Path) -> np.ndarray:
        def compute() -> np.ndarray:
            rgb = load_rgb(path, self.draft_size)
            return rgb if self.resize is None else self.resize(image=rgb)["image"]
        return through(self.image_cache, path, self.preparation, compute)

    def __len__(self) -> int:
        return len(self.table)

    @staticmethod
    def _targets(row: pd.Series) -> dict:
        targets = torch.tensor([_float_or_nan(row[t]) for t in TARGETS], dtype=torch.float32)
        return {"targets_g": targets, "target_mask": (~torch.isnan(targets)).float()}

    @staticmethod
    def _metadata(row: pd.Series) -> dict:
        """Auxiliary labels / metadata inputs; NaN or "" (mask 0) where the table lacks them."""
        out = {}
        for key, col in (("height", "Height_Ave_cm"), ("ndvi", "Pre_GSHH_NDVI")):
            value = _float_or_nan(row[col]) if col in row.index else float("nan")
            out[key] = torch.tensor(value, dtype=torch.float32)
            out[f"{key}_mask"] = torch.tensor(float(not np.isnan(value)))
        for key, col in (("state", "State"), ("species", "Species")):
            value = row[col] if col in row.index else None
            out[key] = str(value) if isinstance(value, str) else ""
        return out

    def __getitem__(self, index: int) -> dict:
        row = self.table.iloc[index]
        path = self.root / row["image_path"]

        def pixels() -> torch.Tensor:
            image = self._prepared(path)
            if self.transform is not None:           # never with a cache_view (__init__)
                image = self.transform(image=image)["image"]
            return torch.tensor(image).permute(2, 0, 1).float() / 255.0

        key = None if self.cache_view is None else image_key(path, self.cache_view)
        item = {"image": pixels() if key is None else pixels_or_features(self.feature_cache, key, pixels),
                "image_id": str(row["image_id"])}
        if self.hires is not None:
            original = load_rgb(path, None)
            item["image_hires"] = torch.tensor(self.hires(image=original)["image"]).permute(2, 0, 1).float() / 255.0
        if key is not None:
            item["cache_key"] = key
        item.update(self._metadata(row))
        if self.has_targets:
            item.update(self._targets(row))
        return item


def group_keys(table: pd.DataFrame) -> np.ndarray:
    """CV group of each image: its (Sampling_Date, State) pair."""
    return (table["Sampling_Date"].astype(str) + "|" + table["State"].astype(str)).to_numpy()


def _mean_std(values: np.ndarray) -> tuple[float, float]:
    values = values[~np.isnan(values)]
    if values.size == 0:
        return 0.0, 1.0
    return float(values.mean()), float(max(values.std(), 1e-6))


def fit_stats(table: pd.DataFrame, quadrat_area: float) -> dict:
    """Normalisation statistics of the training split: per-target g/m2 and log1p-gram mean/std,
    height and NDVI mean/std, and the state / species vocabularies."""
    grams = table[list(TARGETS)].to_numpy(dtype=float)
    gm2 = [_mean_std(grams[:, j] / quadrat_area) for j in range(len(TARGETS))]
    log = [_mean_std(np.log1p(grams[:, j])) for j in range(len(TARGETS))]
    total_mean = gm2[TARGETS.index("Dry_Total_g")][0]
    stats = {"quadrat_area": float(quadrat_area), "targets": list(TARGETS),
             "gm2_mean": [m for m, _ in gm2], "gm2_std": [s for _, s in gm2],
             "log1p_mean": [m for m, _ in log], "log1p_std": [s for _, s in log],
             "total_gm2_mean": float(total_mean if total_mean > 0 else 1.0)}
    for key, col in (("height", "Height_Ave_cm"), ("ndvi", "Pre_GSHH_NDVI")):
        values = pd.to_numeric(table[col], errors="coerce").to_numpy(dtype=float) \
            if col in table.columns else np.array([])
        stats[f"{key}_mean"], stats[f"{key}_std"] = _mean_std(values)
    for key, col in (("states", "State"), ("species", "Species")):
        values = table[col].dropna().astype(str) if col in table.columns else pd.Series([], dtype=str)
        stats[key] = sorted(set(values))
    return stats
