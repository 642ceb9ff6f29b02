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
    """Adds 1..max_blobs soft white Gaussian blobs (corneal reflections) at random positions."""

    def __init__(self, max_blobs: int = 3, sigma_range: tuple[float, float] = (0.01, 0.04), p: float = 0.5):
        super().__init__(p=p)
        self.max_blobs = max_blobs
        self.sigma_range = tuple(sigma_range)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        n = int(self.py_random.randint(1, self.max_blobs))
        blobs = [(self.py_random.uniform(0, w), self.py_random.uniform(0, h),
                  self.py_random.uniform(*self.sigma_range) * max(h, w)) for _ in range(n)]
        return {"blobs": blobs}

    def apply(self, img: np.ndarray, blobs: list = (), **params) -> np.ndarray:
        yy, xx = np.mgrid[0:img.shape[0], 0:img.shape[1]].astype(np.float32)
        light = np.zeros(img.shape[:2], np.float32)
        for bx, by, sigma in blobs:
            light = np.maximum(light, np.exp(-((xx - bx) ** 2 + (yy - by) ** 2) / (2 * sigma ** 2)))
        out = img.astype(np.float32)
        out += (255.0 - out) * light[..., None]
        return np.clip(out, 0, 255).astype(img.dtype)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("max_blobs", "sigma_range")


def build_train_transform(aug: DictConfig) -> A.Compose:
    """All probabilities and ranges come from `data.augment`."""
    return A.Compose([
        A.HorizontalFlip(p=aug.hflip),
        A.VerticalFlip(p=aug.vflip),
        A.Affine(rotate=(-aug.rotate_deg, aug.rotate_deg), p=aug.rotate_p),
        A.RandomRotate90(p=aug.rot90),
        A.RandomBrightnessContrast(brightness_limit=aug.brightness, contrast_limit=aug.contrast,
                                   p=aug.brightness_contrast_p),
        A.HueSaturationValue(hue_shift_limit=aug.hue, sat_shift_limit=aug.saturation,
                             val_shift_limit=aug.value, p=aug.hsv_p),
        A.GaussNoise(std_range=tuple(aug.noise_std), p=aug.noise_p),
        A.GaussianBlur(sigma_limit=tuple(aug.blur_sigma), p=aug.blur_p),
        A.ImageCompression(quality_range=tuple(aug.jpeg_quality), p=aug.jpeg_p),
        A.CoarseDropout(num_holes_range=tuple(aug.occluder_count), hole_height_range=tuple(aug.occluder_size),
                        hole_width_range=tuple(aug.occluder_size), fill="random_uniform", fill_mask=None,
                        p=aug.occluder_p),
        SpecularBlobs(max_blobs=aug.highlight_max, sigma_range=tuple(aug.highlight_sigma), p=aug.highlight_p),
    ])
