"""Synthetic CSIRO-format pasture data: 2:1 JPEGs whose green / dead / clover cover sets the targets.

Each image is a smooth random class map (soil, green, dead, clover) rendered with per-class colour,
texture noise and a per-image lighting change. Grams are `grams_per_cover[c] * cover_fraction[c]`
times a small multiplicative noise; GDM and Total are the exact sums of the rounded components, so
the label identities hold in the written CSV. NDVI and height are correlated with the cover.
A share of training images (missing_share) lacks 1-2 targets (their rows are absent), so masks are exercised.
Files written (same names and columns as the real release, plus test_solution.csv for scoring):
train.csv (long), test.csv, test_solution.csv, train/*.jpg, test/*.jpg.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image

from biomass.constants import COMPONENTS, ID_SEP, TARGETS
from common.utils.atomic import atomic_path

CLASS_COLOURS = np.array([[112, 86, 58],     # soil
                          [62, 150, 48],     # green grass
                          [196, 178, 112],   # dead matter
                          [28, 96, 92]],     # clover (blue-green)
                         dtype=np.float32)


@dataclass
class SynthConfig:
    n_train: int = 120
    n_test: int = 40
    width: int = 448
    height: int = 224
    blob_sigma: float = 3.0                    # smoothness of the class map, in pixels of the map
    map_downsample: int = 4                    # the class map is drawn at 1/map_downsample resolution
    grams_per_cover: tuple = (90.0, 50.0, 40.0)  # green, dead, clover grams at full cover
    gram_noise: float = 0.03                   # relative multiplicative label noise
    texture_noise: float = 14.0                # per-pixel colour noise (0-255 scale)
    lighting: float = 0.12                     # per-image brightness change (relative)
    jpeg_quality: int = 90
    dates: tuple = ("2015/1/15", "2015/2/20", "2015/4/2", "2015/5/19", "2015/7/8",
                    "2015/9/4", "2015/10/21", "2015/12/1")
    states: tuple = ("Tas", "Vic", "NSW", "WA")
    species: tuple = ("Ryegrass_Clover", "Phalaris", "Ryegrass", "Fescue", "Lucerne")
    dirichlet: tuple = field(default=(1.2, 1.5, 1.0, 0.8))  # prior over soil, green, dead, clover
    prior_strength: float = 1.0                # how strongly the prior tilts the noise argmax
    missing_share: float = 0.0                 # share of training images lacking 1-2 of the five targets


def _class_map(rng: np.random.Generator, cfg: SynthConfig) -> np.ndarray:
    """Argmax of smoothed noise fields shifted by a per-image Dirichlet prior -> (H, W) class ids."""
    h, w = cfg.height // cfg.map_downsample, cfg.width // cfg.map_downsample
    prior = rng.dirichlet(np.asarray(cfg.dirichlet))
    fields = np.stack([cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0),
                                        cfg.blob_sigma) for _ in range(4)])
    fields /= fields.std(axis=(1, 2), keepdims=True) + 1e-6
    scores = fields + cfg.prior_strength * np.log(prior + 1e-3)[:, None, None]
    small = scores.argmax(axis=0).astype(np.uint8)
    return cv2.resize(small, (cfg.width, cfg.height), interpolation=cv2.INTER_NEAREST)


def _render(rng: np.random.Generator, classes: np.ndarray, cfg: SynthConfig) -> np.ndarray:
    rgb = CLASS_COLOURS[classes]
    rgb = rgb + rng.normal(0.0, cfg.texture_noise, rgb.shape).astype(np.float32)
    rgb = rgb * (1.0 + rng.uniform(-cfg.lighting, cfg.lighting))
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _sample_image(rng: np.random.Generator, cfg: SynthConfig) -> tuple[np.ndarray, dict]:
    classes = _class_map(rng, cfg)
    cover = np.bincount(classes.ravel(), minlength=4) / classes.size
    noise = 1.0 + cfg.gram_noise * rng.standard_normal(3)
    comp = np.round(np.asarray(cfg.grams_per_cover) * cover[1:] * np.clip(noise, 0.5, 1.5), 4)
    grams = dict(zip(COMPONENTS, comp.tolist()))
    grams["GDM_g"] = round(grams["Dry_Green_g"] + grams["Dry_Clover_g"], 4)
    grams["Dry_Total_g"] = round(comp.sum(), 4)
    live = cover[1] + cover[3]
    meta = {"Pre_GSHH_NDVI": round(float(np.clip(0.15 + 0.75 * live + rng.normal(0, 0.03), 0, 1)), 2),
            "Height_Ave_cm": round(float(max(0.5, 1.0 + 20.0 * (1 - cover[0]) + rng.normal(0, 1.0))), 4)}
    return _render(rng, classes, cfg), {"grams": grams, "meta": meta}


def _write_jpeg(path: Path, rgb: np.ndarray, quality: int) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="JPEG", quality=quality)


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def _split_rows(rng: np.random.Generator, root: Path, split: str, n: int, cfg: SynthConfig,
                used_ids: set) -> list[dict]:
    (root / split).mkdir(parents=True, exist_ok=True)
    rows = []
    for _ in range(n):
        image_id = f"ID{rng.integers(10**9, 10**10)}"
        while image_id in used_ids:
            image_id = f"ID{rng.integers(10**9, 10**10)}"
        used_ids.add(image_id)
        rgb, labels = _sample_image(rng, cfg)
        rel = f"{split}/{image_id}.jpg"
        _write_jpeg(root / rel, rgb, cfg.jpeg_quality)
        info = {"image_path": rel, "Sampling_Date": str(rng.choice(cfg.dates)),
                "State": str(rng.choice(cfg.states)), "Species": str(rng.choice(cfg.species)),
                **labels["meta"]}
        for name in TARGETS:
            rows.append({"sample_id": f"{image_id}{ID_SEP}{name}", **info,
                         "target_name": name, "target": labels["grams"][name]})
    return rows


def drop_labels(train: pd.DataFrame, share: float, seed: int) -> pd.DataFrame:
    """Remove the rows of 1 or 2 random targets for round(share * images) random training images (targets
    "not measured", as real releases can have); a separate generator, so the images stay the same."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"data.synth.missing_share={share}: expected a share in [0, 1]")
    rng = np.random.default_rng([seed, 1])
    image_ids = train["sample_id"].str.split(ID_SEP, regex=False).str[0]
    unique = image_ids.unique()
    chosen = rng.choice(unique, size=int(round(share * len(unique))), replace=False)
    dropped = {(image_id, str(name)) for image_id in chosen
               for name in rng.choice(TARGETS, size=int(rng.integers(1, 3)), replace=False)}
    keep = [(i, n) not in dropped for i, n in zip(image_ids, train["target_name"])]
    return train[keep].reset_index(drop=True)


def write_synthetic(root: Path, seed: int, cfg: SynthConfig | None = None) -> None:
    """Write the synthetic dataset under `root` (deterministic in `seed` and `cfg`)."""
    cfg = cfg or SynthConfig()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    used: set = set()
    train = pd.DataFrame(_split_rows(rng, root, "train", cfg.n_train, cfg, used))
    test = pd.DataFrame(_split_rows(rng, root, "test", cfg.n_test, cfg, used))
    _write_csv(drop_labels(train, cfg.missing_share, seed), root / "train.csv")
    _write_csv(test[["sample_id", "image_path", "target_name"]], root / "test.csv")
    _write_csv(test[["sample_id", "target"]], root / "test_solution.csv")
