"""The live validator's image challenge, reimplemented: `mode=eval benchmark=true` scores on it and
`data.train_benchmark_levels=true` trains on it.

Source read (never copied): natixnetwork/streetvision-subnet at 28a1755 (the commit the suite is compared
with), `natix/utils/image_transforms.py` (read at bfb2a01, apply_augmentation_by_level and the
DeeperForensics distortions), `natix/validator/forward.py` and `natix/protocol.py`. A challenge is
- a level drawn with `level_probs` (0.25 each);
- level 0: centre square, resized to 224 x 224 (PIL bilinear with antialiasing);
- levels 1-3: rotation by a uniform angle in [-20, 20] degrees (nearest neighbour: the validator's wrapper
  drops its bilinear setting), a square random resized crop of 20-100 % of the area (bilinear, antialiased)
  moved to keep `mask_center` with a 10 px margin (with the validator's (height, width) reading of the
  image size), and flips that never happen (the wrappers' parameter dicts start empty; `flips`);
- levels 2 and 3: DeeperForensics distortions in the order CS, CC, JPEG, GNC, GB, each at a level drawn
  uniformly in 0..max (level 2: CS, CC, JPEG up to 1; level 3: all five up to 2; 0 = not applied), on the
  uint8 BGR image (truncated from the float tensor) with the parameter table `distortion_params`:
  CS colour saturation (chroma scaled in YCbCr), CC colour contrast (x param), JPEG down- and up-sampling by
  the factor (cv2 bilinear), GNC Gaussian noise in YCbCr (variance param), GB Gaussian blur (kernel param,
  sigma param / 6);
- then the float tensor to PIL (x 255, truncated) and JPEG at PIL's default quality 75.
"""
from __future__ import annotations

import io
import math
from typing import Optional, Sequence

import cv2
import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

DISTORTION_ORDER = ("CS", "CC", "JPEG", "GNC", "GB")


def bgr_to_ycbcr(bgr: np.ndarray) -> np.ndarray:
    """DeeperForensics' YCbCr: cv2 YCrCb of the float image, channels reordered, studio-range scaled."""
    ycrcb = cv2.cvtColor(bgr.astype(np.float32), cv2.COLOR_BGR2YCR_CB)
    out = ycrcb[:, :, (0, 2, 1)].astype(np.float32)
    out[:, :, 0] = (out[:, :, 0] * (235 - 16) + 16) / 255.0
    out[:, :, 1:] = (out[:, :, 1:] * (240 - 16) + 16) / 255.0
    return out


def ycbcr_to_bgr(ycbcr: np.ndarray) -> np.ndarray:
    out = ycbcr.astype(np.float32)
    out[:, :, 0] = (out[:, :, 0] * 255.0 - 16) / (235 - 16)
    out[:, :, 1:] = (out[:, :, 1:] * 255.0 - 16) / (240 - 16)
    return cv2.cvtColor(out[:, :, (0, 2, 1)].astype(np.float32), cv2.COLOR_YCR_CB2BGR)


def saturation(bgr: np.ndarray, factor: float, rng) -> np.ndarray:
    ycbcr = bgr_to_ycbcr(bgr)
    ycbcr[:, :, 1:] = 0.5 + (ycbcr[:, :, 1:] - 0.5) * factor
    return ycbcr_to_bgr(ycbcr).astype(np.uint8)


def contrast(bgr: np.ndarray, factor: float, rng) -> np.ndarray:
    return (bgr.astype(np.float32) * factor).astype(np.uint8)


def pixelate(bgr: np.ndarray, factor: int, rng) -> np.ndarray:
    height, width = bgr.shape[:2]
    small = cv2.resize(bgr, (width // int(factor), height // int(factor)))
    return cv2.resize(small, (width, height))


def colour_noise(bgr: np.ndarray, variance: float, rng) -> np.ndarray:
    ycbcr = bgr_to_ycbcr(bgr) / 255
    noisy = (ycbcr + math.sqrt(variance) * rng.standard_normal(ycbcr.shape)) * 255
    return np.clip(ycbcr_to_bgr(noisy), 0, 255).astype(np.uint8)


def blur(bgr: np.ndarray, kernel: int, rng) -> np.ndarray:
    return cv2.GaussianBlur(bgr, (int(kernel), int(kernel)), int(kernel) / 6)


DISTORTIONS = {"CS": saturation, "CC": contrast, "JPEG": pixelate, "GNC": colour_noise, "GB": blur}


def distort(tensor: torch.Tensor, name: str, param, rng) -> torch.Tensor:
    """One distortion on a (3, H, W) RGB float tensor, through the uint8 BGR image as the validator does."""
    bgr = (tensor[[2, 1, 0]].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    out = DISTORTIONS[name](bgr, param, rng)
    return torch.from_numpy(out.astype(np.float32) / 255.0).permute(2, 0, 1)[[2, 1, 0]]


def crop_params(height: int, width: int, scale: Sequence[float], ratio: Sequence[float], rng) -> tuple:
    """(top, left, h, w) as torchvision's RandomResizedCrop draws them (10 tries, then a centred crop)."""
    area, log_ratio = height * width, (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def keep_point(crop: tuple, point: Sequence[float], size: tuple[int, int], margin: int) -> tuple:
    """The validator's move of the crop towards `point` (x, y); `size` is what it calls (width, height),
    the tensor's (H, W)."""
    top, left, h, w = crop
    x, y = point
    width, height = size
    if x < left:
        left = max(0, x - margin)
    elif x > left + w:
        left = min(width - w, x - w + margin)
    if y < top:
        top = max(0, y - margin)
    elif y > top + h:
        top = min(height - h, y - h + margin)
    return int(top), int(left), h, w


class BenchmarkTransform:
    """The validator's challenge (module docstring) as configured in `challenge`."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.size = [int(cfg.size), int(cfg.size)]
        self.level_probs = np.asarray(list(cfg.level_probs), dtype=np.float64)
        if not math.isclose(self.level_probs.sum(), 1.0, rel_tol=1e-9):
            raise ValueError(f"challenge.level_probs={list(cfg.level_probs)} must sum to 1")
        if len(cfg.level_distortions) != len(self.level_probs):
            raise ValueError("challenge.level_distortions needs one entry per level of level_probs")
        self.rng = np.random.default_rng()

    def set_random_seed(self, seed: int) -> None:
        """Fresh draws per worker and epoch (common.data.datasets.reseed_augmentations)."""
        self.rng = np.random.default_rng(seed)

    def draw_level(self, rng) -> int:
        return int(np.searchsorted(np.cumsum(self.level_probs), rng.random(), side="left"))

    def _base(self, image: Image.Image) -> torch.Tensor:
        side = min(image.size)
        return TF.to_tensor(TF.resize(TF.center_crop(image, [side, side]), self.size))

    def _random(self, image: Image.Image, rng, mask_center) -> torch.Tensor:
        c = self.cfg
        tensor = TF.rotate(TF.to_tensor(image), float(rng.uniform(-c.rotation_degrees, c.rotation_degrees)))
        height, width = tensor.shape[1:]
        crop = crop_params(height, width, list(c.crop_scale), list(c.crop_ratio), rng)
        if mask_center is not None:
            crop = keep_point(crop, mask_center, (height, width), int(c.mask_margin))
        tensor = TF.resized_crop(tensor, *crop, self.size, InterpolationMode.BILINEAR, antialias=True)
        if c.flips:
            tensor = TF.hflip(tensor) if rng.random() < 0.5 else tensor
            tensor = TF.vflip(tensor) if rng.random() < 0.5 else tensor
        return tensor

    def _distort(self, tensor: torch.Tensor, level: int, rng) -> torch.Tensor:
        table, maxima = self.cfg.distortion_params, self.cfg.level_distortions[level]
        for name in DISTORTION_ORDER:
            if name in maxima:
                strength = int(rng.integers(0, int(maxima[name]) + 1))
                if strength > 0:
                    tensor = distort(tensor, name, table[name][strength - 1], rng)
        return tensor

    def render(self, image: Image.Image, level: int, rng, mask_center=None) -> np.ndarray:
        """One challenge at `level`: the uint8 RGB array the miner decodes."""
        image = image.convert("RGB")
        tensor = self._base(image) if level == 0 else self._distort(self._random(image, rng, mask_center), level, rng)
        buffer = io.BytesIO()
        TF.to_pil_image(tensor).save(buffer, format="JPEG", quality=int(self.cfg.jpeg_quality))
        buffer.seek(0)
        return np.asarray(Image.open(buffer).convert("RGB"))

    def __call__(self, image: np.ndarray, seed: Optional[int] = None, mask_center=None) -> np.ndarray:
        """A challenge with a drawn level; `seed` fixes every draw (reproducible evaluation)."""
        rng = self.rng if seed is None else np.random.default_rng(seed)
        return self.render(Image.fromarray(image), self.draw_level(rng), rng, mask_center)
