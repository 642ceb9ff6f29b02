"""common.data.augment: GaussianHighlights (biomass light spots, sclera specular highlights) against the formula
written out by hand; build_augment (every task's data.augment list), SequentialOrClean and find_transform."""
import math

import albumentations as A
import numpy as np
import pytest

from common.data.augment import GaussianHighlights, SequentialOrClean, build_augment, find_transform


def _reference(image: np.ndarray, x: float, y: float, sigma: float, strength: float) -> np.ndarray:
    """One blob, pixel by pixel in float64: img + (255 - img) * strength * exp(-d^2 / (2 sigma^2)), truncated."""
    out = np.empty_like(image)
    for i in range(image.shape[0]):
        for j in range(image.shape[1]):
            light = strength * math.exp(-((j - x) ** 2 + (i - y) ** 2) / (2 * sigma ** 2))
            for c in range(image.shape[2]):
                value = float(image[i, j, c])
                out[i, j, c] = int(value + (255.0 - value) * light)
    return out


@pytest.mark.parametrize("relative_to,size_is", [("longer", "sigma"), ("height", "radius")])
def test_one_blob_is_the_hand_written_gaussian(relative_to, size_is):
    h, w = 30, 50
    image = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    blob = GaussianHighlights(count=(1, 1), size=(0.1, 0.1), strength=(0.6, 0.6), relative_to=relative_to,
                              size_is=size_is, p=1.0)
    blob.set_random_seed(3)
    params = blob.get_params_dependent_on_data({"shape": image.shape}, {"image": image})
    ((x, y, size, strength),) = params["blobs"]
    assert size == pytest.approx(0.1 * (h if relative_to == "height" else w)) and strength == pytest.approx(0.6)
    assert 0 <= x <= w and 0 <= y <= h
    sigma = size if size_is == "sigma" else size / math.sqrt(2)        # radius = sqrt(2) sigma
    expected = _reference(image, x, y, sigma, strength)
    out = blob.apply(image, **params)
    diff = np.abs(out.astype(int) - expected.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99        # float32 vs float64 may round across an integer
    assert (out > image).any() and (out >= image).all()
    blob.set_random_seed(3)
    np.testing.assert_array_equal(blob(image=image)["image"], out)   # the transform draws what get_params drew


def test_sizes_are_a_fraction_of_the_chosen_side_and_min_size_clamps():
    image = np.zeros((20, 80, 3), np.uint8)
    by_side = {side: GaussianHighlights(count=(1, 1), size=(0.25, 0.25), relative_to=side, p=1.0)
               .get_params_dependent_on_data({"shape": image.shape}, {})["blobs"][0][2] for side in ("height", "longer")}
    assert by_side == {"height": 5.0, "longer": 20.0}
    tiny, clamped = (GaussianHighlights(size_is="radius", min_size=m, p=1.0) for m in (0.0, 1.0))
    blob = [(40.0, 10.0, 0.1, 1.0)]
    np.testing.assert_array_equal(clamped.apply(image, blobs=blob), tiny.apply(image, blobs=[(40.0, 10.0, 1.0, 1.0)]))
    assert tiny.apply(image, blobs=blob).sum() == 3 * 255        # a 0.1 px radius lights only its own pixel


def test_unknown_side_or_size_kind_is_refused():
    with pytest.raises(ValueError, match="relative_to='width'"):
        GaussianHighlights(relative_to="width")
    with pytest.raises(ValueError, match="size_is='fwhm'"):
        GaussianHighlights(size_is="fwhm")


FLIP_AND_NOISE = [{"_target_": "albumentations.HorizontalFlip", "p": 0.5},
                  {"_target_": "albumentations.GaussNoise", "std_range": [0.05, 0.1], "p": 0.5}]


def test_sequential_or_clean_is_a_sequential_bypassed_with_p_clean_draw_for_draw():
    image = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    ours = build_augment([{"_target_": "common.data.augment.SequentialOrClean", "p_clean": 0.3,
                           "transforms": FLIP_AND_NOISE}])
    theirs = A.Compose([A.Sequential([A.HorizontalFlip(p=0.5), A.GaussNoise(std_range=(0.05, 0.1), p=0.5)], p=0.7)])
    assert isinstance(ours.transforms[0], SequentialOrClean) and ours.transforms[0].p == 1.0 - 0.3
    clean = 0
    for seed in range(40):
        ours.set_random_seed(seed)
        theirs.set_random_seed(seed)
        a, b = ours(image=image)["image"], theirs(image=image)["image"]
        np.testing.assert_array_equal(a, b)
        clean += np.array_equal(a, image)
    assert 0 < clean < 40


def test_build_augment_nests_containers_and_refuses_what_is_not_a_transform():
    assert build_augment([]) is None and build_augment(None) is None
    pipeline = build_augment([{"_target_": "albumentations.OneOf", "p": 0.5, "transforms": FLIP_AND_NOISE},
                              {"_target_": "common.data.augment.GaussianHighlights", "count": [1, 2], "p": 0.2}])
    one_of, blobs = pipeline.transforms
    assert [type(t) for t in one_of.transforms] == [A.HorizontalFlip, A.GaussNoise] and blobs.count == (1, 2)
    for bad, words in (({"hflip": 0.5}, "expected a list"),
                       ([{"p": 0.5}], r"data\.augment\[0\]: expected \{_target_"),
                       ([{"_target_": "albumentations.OneOf", "transforms": [{"_target_": "pathlib.Path"}]}],
                        r"data\.augment\[0\]\.transforms\[0\]\._target_='pathlib\.Path' is not an albumentations"),
                       ([{"_target_": "albumentations.NoSuchThing"}], "does not name a class")):
        with pytest.raises(ValueError, match=words):
            build_augment(bad)


def test_find_transform_looks_inside_containers():
    specs = [{"_target_": "common.data.augment.SequentialOrClean", "p_clean": 0.1, "transforms": FLIP_AND_NOISE}]
    assert find_transform(specs, "albumentations.GaussNoise")["std_range"] == [0.05, 0.1]
    assert find_transform(specs, "common.data.augment.SequentialOrClean")["p_clean"] == 0.1
    with pytest.raises(LookupError, match="0 transforms albumentations.Affine"):
        find_transform(specs, "albumentations.Affine")
