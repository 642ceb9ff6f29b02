"""Training augmentation for sclera segmentation (albumentations).

Geometry moves image and mask alike; photometric changes, occluding rectangles and specular
highlight blobs touch the image only (the sclera behind a highlight or an occluder is still sclera).
"""
from __future__ import annotations

from typing import Any

import albumentations as A
import numpy as np
from omegaconf import DictConfig


class SpecularBlobs(A.ImageOnlyTransform):
    """Adds count_range soft white Gaussian blobs (corneal reflections) at random positions, each blended
    towards white with a strength drawn from strength_range."""

    def __init__(self, count_range: tuple[int, int] = (1, 3), sigma_range: tuple[float, float] = (0.01, 0.04),
                 strength_range: tuple[float, float] = (0.3, 0.8), p: float = 0.5):
        super().__init__(p=p)
        self.count_range = tuple(count_range)
        self.sigma_range = tuple(sigma_range)
        self.strength_range = tuple(strength_range)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        n = int(self.py_random.randint(*self.count_range))
        blobs = [(self.py_random.uniform(0, w), self.py_random.uniform(0, h),
                  self.py_random.uniform(*self.sigma_range) * max(h, w),
                  self.py_random.uniform(*self.strength_range)) for _ in range(n)]
        return {"blobs": blobs}

    def apply(self, img: np.ndarray, blobs: list = (), **params) -> np.ndarray:
        yy, xx = np.mgrid[0:img.shape[0], 0:img.shape[1]].astype(np.float32)
        light = np.zeros(img.shape[:2], np.float32)
        for bx, by, sigma, strength in blobs:
            blob = strength * np.exp(-((xx - bx) ** 2 + (yy - by) ** 2) / (2 * sigma ** 2))
            light = np.maximum(light, blob)
        out = img.astype(np.float32)
        out += (255.0 - out) * light[..., None]
        return np.clip(out, 0, 255).astype(img.dtype)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("count_range", "sigma_range", "strength_range")


class Rotate90(A.RandomRotate90):
    """RandomRotate90 with the quarter turns k drawn from `ks` (albumentations draws k from 0..3)."""

    def __init__(self, ks: tuple[int, ...] = (1, 2, 3), p: float = 0.5):
        super().__init__(p=p)
        self.ks = tuple(int(k) for k in ks)

    def get_params(self) -> dict[str, int]:
        return {"factor": self.py_random.choice(self.ks)}

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("ks",)


def occluders(aug: DictConfig) -> A.CoarseDropout:
    """Random rectangles: a count drawn uniformly from occluder_count = [lo, hi] with probability occluder_p.
    A count of 0 is a no-op, so lo = 0 is drawn as counts 1..hi with probability p * hi / (hi + 1)."""
    lo, hi = int(aug.occluder_count[0]), int(aug.occluder_count[1])
    p = aug.occluder_p * (hi / (hi + 1) if lo == 0 else 1.0)
    return A.CoarseDropout(num_holes_range=(max(lo, 1), hi), hole_height_range=tuple(aug.occluder_size),
                           hole_width_range=tuple(aug.occluder_size), fill="random_uniform", fill_mask=None, p=p)


def build_train_transform(aug: DictConfig) -> A.Compose:
    """All probabilities and ranges come from `data.augment` (pixel units for brightness offsets, noise sigma)."""
    alpha, beta = aug.contrast_alpha, aug.brightness_beta
    return A.Compose([
        A.HorizontalFlip(p=aug.hflip),
        A.VerticalFlip(p=aug.vflip),
        A.Affine(rotate=(-aug.rotate_deg, aug.rotate_deg), p=aug.rotate_p),
        Rotate90(ks=tuple(aug.rot90_k), p=aug.rot90),
        A.RandomBrightnessContrast(brightness_limit=(beta[0] / 255, beta[1] / 255), brightness_by_max=True,
                                   contrast_limit=(alpha[0] - 1, alpha[1] - 1), p=aug.brightness_contrast_p),
        A.ColorJitter(brightness=(1, 1), contrast=(1, 1), saturation=tuple(aug.saturation_scale),
                      hue=(aug.hue_shift[0] / 180, aug.hue_shift[1] / 180), p=aug.hsv_p),
        A.GaussNoise(std_range=(aug.noise_sigma[0] / 255, aug.noise_sigma[1] / 255), p=aug.noise_p),
        A.OneOf([A.GaussianBlur(blur_limit=0, sigma_limit=tuple(aug.blur_sigma)),
                 A.MotionBlur(blur_limit=tuple(aug.motion_blur_kernel))], p=aug.blur_p),
        A.ImageCompression(quality_range=tuple(aug.jpeg_quality), p=aug.jpeg_p),
        occluders(aug),
        SpecularBlobs(count_range=tuple(aug.highlight_count), sigma_range=tuple(aug.highlight_sigma),
                      strength_range=tuple(aug.highlight_strength), p=aug.highlight_p),
    ])
