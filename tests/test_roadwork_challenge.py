"""The validator's image challenge (roadwork.challenge) against the source's parameter table and against
independent computations of each step (PIL, numpy), level by level on fixed images."""
import io
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from roadwork.challenge import BenchmarkTransform, blur, contrast, crop_params, keep_point, pixelate, saturation

CONF = Path(__file__).resolve().parents[1] / "conf"
# natixnetwork/streetvision-subnet natix/utils/image_transforms.py: get_distortion_parameter's table, the
# levels' distortion ranges (get_random_augmentations_medium / _hard), apply_augmentation_by_level's
# probabilities, RandomRotation(20), RandomResizedCrop(scale 0.2-1, ratio 1), TARGET_IMAGE_SIZE, and PIL's
# default JPEG quality used by protocol.py.
SOURCE = {"size": 224, "jpeg_quality": 75, "level_probs": [0.25, 0.25, 0.25, 0.25], "rotation_degrees": 20,
          "crop_scale": [0.2, 1.0], "crop_ratio": [1.0, 1.0], "mask_margin": 10, "flips": False,
          "distortion_params": {"CS": [0.4, 0.3, 0.2, 0.1, 0.0], "CC": [0.85, 0.725, 0.6, 0.475, 0.35],
                                "JPEG": [2, 3, 4, 5, 6], "GNC": [0.001, 0.002, 0.005, 0.01, 0.05],
                                "GB": [7, 9, 13, 17, 21]},
          "level_distortions": [{}, {}, {"CS": 1, "CC": 1, "JPEG": 1},
                                {"CS": 2, "CC": 2, "JPEG": 2, "GNC": 2, "GB": 2}]}


def _challenge_cfg(**overrides):
    with initialize_config_dir(str(CONF), version_base=None):
        cfg = compose("config", overrides=["task=roadwork"])
    return OmegaConf.merge(cfg.challenge, overrides)


def _jpeg(array: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def test_config_is_the_validators_table():
    assert OmegaConf.to_container(_challenge_cfg()) == SOURCE


def test_level0_is_centre_square_bilinear_then_jpeg75():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)
    out = BenchmarkTransform(_challenge_cfg()).render(Image.fromarray(image), 0, rng)
    square = Image.fromarray(image[:, 50:350]).resize((224, 224), Image.BILINEAR)
    np.testing.assert_array_equal(out, _jpeg(np.asarray(square), 75))


def test_distortions_follow_the_table():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    np.testing.assert_array_equal(contrast(image, 0.85, rng), np.floor(image * np.float32(0.85)).astype(np.uint8))
    checker = (np.indices((32, 48)).sum(0) % 2 * 255).astype(np.uint8)[..., None].repeat(3, -1)
    assert np.abs(pixelate(checker, 2, rng).astype(int) - 127.5).max() <= 1      # 2x2 means, upsampled
    # saturation: BT.601 chroma (cv2's float YCrCb, offset 0.5) scaled by the factor around the studio range
    bgr = image.astype(np.float64)
    y = 0.299 * bgr[..., 2] + 0.587 * bgr[..., 1] + 0.114 * bgr[..., 0]
    cr, cb = (bgr[..., 2] - y) * 0.713 + 0.5, (bgr[..., 0] - y) * 0.564 + 0.5
    scale = lambda c: 0.5 + (((c * 224 + 16) / 255) - 0.5) * 0.4                  # noqa: E731
    unscale = lambda c: (c * 255 - 16) / 224                                       # noqa: E731
    cr, cb = unscale(scale(cr)), unscale(scale(cb))
    expected = np.stack([y + 1.773 * (cb - 0.5), y - 0.714 * (cr - 0.5) - 0.344 * (cb - 0.5),
                         y + 1.403 * (cr - 0.5)], -1)
    inside = (expected > 1) & (expected < 254)
    assert np.abs(saturation(image, 0.4, rng).astype(float) - expected)[inside].max() <= 1.5
    # blur: kernel 7, sigma 7/6, separable Gaussian (interior pixels, away from the border rule)
    x = np.arange(7) - 3
    g = np.exp(-x ** 2 / (2 * (7 / 6) ** 2))
    g /= g.sum()
    flat = image[..., 0].astype(float)
    rows = np.apply_along_axis(lambda r: np.convolve(r, g, mode="same"), 1, flat)
    both = np.apply_along_axis(lambda c: np.convolve(c, g, mode="same"), 0, rows)
    assert np.abs(blur(image, 7, rng)[3:-3, 3:-3, 0] - both[3:-3, 3:-3]).max() <= 1


@pytest.mark.parametrize("level,contrasts", [(1, {1.0}), (2, {1.0, 0.85}), (3, {1.0, 0.85, 0.725})])
@pytest.mark.slow
def test_levels_draw_the_validators_distortion_levels(level, contrasts):
    """A flat grey image without rotation: only colour contrast moves its mean, by the table's factors."""
    bench = BenchmarkTransform(_challenge_cfg(rotation_degrees=0))
    image = Image.new("RGB", (320, 240), (200, 200, 200))
    means = {round(float(bench.render(image, level, np.random.default_rng(s)).mean()) / 200, 2) for s in range(40)}
    assert all(min(abs(m - c) for m in means) < 0.02 for c in contrasts), means          # each factor drawn
    assert all(min(abs(m - c) for c in contrasts) < 0.02 for m in means), means


def test_draws_are_reproducible_and_224_jpegs():
    bench = BenchmarkTransform(_challenge_cfg())
    image = np.random.default_rng(3).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    out = bench(image, seed=5)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, bench(image, seed=5))
    levels = [bench.draw_level(np.random.default_rng(s)) for s in range(400)]
    assert sorted(set(levels)) == [0, 1, 2, 3] and max(np.bincount(levels)) < 130


def test_crop_keeps_mask_center_as_the_validator_moves_it():
    rng = np.random.default_rng(0)
    top, left, h, w = crop_params(300, 400, [0.2, 1.0], [1.0, 1.0], rng)
    assert h == w and 0.2 * 120000 * 0.95 <= h * w <= 120000 and top + h <= 300 and left + w <= 400
    # the validator reads (H, W) as (width, height): x is clamped by H and y by W
    assert keep_point((0, 0, 100, 100), (250, 20), (300, 400), 10) == (0, 160, 100, 100)
    assert keep_point((150, 150, 100, 100), (20, 30), (300, 400), 10) == (20, 10, 100, 100)
