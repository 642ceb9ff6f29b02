"""Sclera's own transforms for `data.augment` (built by common.data.augment.build_augment): the reference deck's table in
the deck's units, on the resized image and mask.

Geometry moves image and mask alike; photometric changes, occluding rectangles and specular highlight blobs
(common.data.augment.GaussianHighlights) touch the image only (the sclera behind a highlight or an occluder is still
sclera). The classes here take the deck's units and hand albumentations its own.
"""
from __future__ import annotations

import albumentations as A
import cv2
import numpy as np


class Rotate90(A.RandomRotate90):
    """RandomRotate90 with the quarter turns k drawn from `ks` (albumentations draws k from 0..3)."""

    def __init__(self, ks: tuple[int, ...] = (1, 2, 3), p: float = 0.5):
        super().__init__(p=p)
        self.ks = tuple(int(k) for k in ks)

    def get_params(self) -> dict[str, int]:
        return {"factor": self.py_random.choice(self.ks)}

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("ks",)


class BrightnessContrast(A.RandomBrightnessContrast):
    """pixel * alpha + beta, alpha drawn from `contrast_alpha`, beta from `brightness_beta` in pixel units (0..255)."""

    def __init__(self, contrast_alpha: tuple[float, float] = (0.8, 1.2),
                 brightness_beta: tuple[float, float] = (-30, 30), p: float = 0.5):
        alpha, beta = contrast_alpha, brightness_beta
        super().__init__(brightness_limit=(beta[0] / 255, beta[1] / 255), brightness_by_max=True,
                         contrast_limit=(alpha[0] - 1, alpha[1] - 1), p=p)
        self.contrast_alpha, self.brightness_beta = tuple(alpha), tuple(beta)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("contrast_alpha", "brightness_beta")


class HueSaturation(A.ImageOnlyTransform):
    """In HSV: hue shifted by a value drawn from `hue_shift` in OpenCV's uint8 units (180 = a full turn),
    saturation multiplied by a factor drawn from `saturation_scale` and clipped to [0, 1]; value untouched.
    Computed in float (OpenCV's float HSV, hue in degrees), rounded back to uint8 once. Not ColorJitter's
    saturation, which blends with the grey image instead of scaling S."""

    def __init__(self, hue_shift: tuple[float, float] = (-18, 18),
                 saturation_scale: tuple[float, float] = (0.7, 1.3), p: float = 0.5):
        super().__init__(p=p)
        self.hue_shift, self.saturation_scale = tuple(hue_shift), tuple(saturation_scale)

    def get_params(self) -> dict[str, float]:
        return {"hue": self.py_random.uniform(*self.hue_shift), "scale": self.py_random.uniform(*self.saturation_scale)}

    def apply(self, img: np.ndarray, hue: float = 0.0, scale: float = 1.0, **params) -> np.ndarray:
        return shift_hue_scale_saturation(img, hue, scale)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("hue_shift", "saturation_scale")


def shift_hue_scale_saturation(image: np.ndarray, hue: float, scale: float) -> np.ndarray:
    """(H, W, 3) uint8 RGB with its hue shifted by `hue` (OpenCV uint8 units, 2 degrees each) and its HSV
    saturation multiplied by `scale` (clipped to 1)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"HueSaturation: expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
    hsv = cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = np.mod(hsv[..., 0] + 2.0 * hue, 360.0)
    hsv[..., 1] = np.clip(hsv[..., 1] * scale, 0.0, 1.0)
    rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


class PixelGaussNoise(A.GaussNoise):
    """Gaussian noise, its standard deviation drawn from `sigma` in pixel units (0..255)."""

    def __init__(self, sigma: tuple[float, float] = (5, 20), p: float = 0.5):
        super().__init__(std_range=(sigma[0] / 255, sigma[1] / 255), p=p)
        self.sigma = tuple(sigma)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("sigma",)


class Occluders(A.CoarseDropout):
    """Random rectangles of random colour (image only): with probability p, a count drawn uniformly from
    `count` = [lo, hi], each side a fraction of the image's drawn from `size`. A count of 0 is a no-op, so lo = 0
    is drawn as counts 1..hi with probability p * hi / (hi + 1)."""

    def __init__(self, count: tuple[int, int] = (0, 3), size: tuple[float, float] = (0.05, 0.15), p: float = 0.5):
        lo, hi = int(count[0]), int(count[1])
        super().__init__(num_holes_range=(max(lo, 1), hi), hole_height_range=tuple(size),
                         hole_width_range=tuple(size), fill="random_uniform", fill_mask=None,
                         p=p * (hi / (hi + 1) if lo == 0 else 1.0))
        self.count, self.size = (lo, hi), tuple(size)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("count", "size")
