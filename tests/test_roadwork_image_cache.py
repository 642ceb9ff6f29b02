"""Roadwork + data.image_cache: cached items equal uncached ones, warm passes never decode, changed views,
sizes or masks miss, benchmark datasets bypass the cache, corrupt files surface with their name."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from common.data.image_cache import ImageCache
from roadwork.challenge import BenchmarkTransform
from roadwork.data import RoadworkDataset, mask_files
from roadwork.samples import index_samples
from roadwork.task import RoadworkTask

CONF = Path(__file__).resolve().parents[1] / "conf"
VOCAB = {"weather": ["clear"], "daytime": ["day"], "scene": ["urban"]}
AUGMENT = [{"_target_": "albumentations.HorizontalFlip", "p": 0.5},
           {"_target_": "albumentations.Affine", "rotate": [-20, 20], "p": 0.7},      # moves the masks too
           {"_target_": "albumentations.RandomBrightnessContrast", "p": 1.0}]


@pytest.fixture
def folder(tmp_path):
    """3 noise images (LANCZOS matters) + sidecars under root/train, a mask for the first two only."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    (root / "train").mkdir(parents=True)
    (root / "masks" / "train").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (42, 60, 3), dtype=np.uint8)).save(root / "train" / f"im{i}.jpg")
        (root / "train" / f"im{i}.json").write_text(json.dumps({"label": i % 2, "weather": "clear"}))
        if i < 2:
            mask = np.zeros((42, 60), np.uint8)
            mask[5 + 3 * i:30, 10:40 + 5 * i] = 255
            Image.fromarray(mask).save(root / "masks" / "train" / f"im{i}.png")
    samples = index_samples(root / "train", VOCAB, [], True, False).samples
    return root, samples, mask_files(samples, root, "masks")


def _items(data: RoadworkDataset, seed: int = 0) -> list[dict]:
    if data.pipeline is not None:
        data.pipeline.set_random_seed(seed)
    return [data[i] for i in range(len(data))]


def _assert_same(items, expected):
    for got, want in zip(items, expected, strict=True):
        assert got.keys() == want.keys()
        for key in {"views", "seg_target"} & want.keys():
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
        assert got.get("mask_known") == want.get("mask_known") and got["label"] == want["label"]


def _files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.npy")) if folder.exists() else []


@pytest.mark.parametrize("augment", [None, AUGMENT])
def test_cached_items_equal_uncached_ones(folder, tmp_path, augment):
    root, samples, masks = folder
    cache = ImageCache(tmp_path / "cache")
    plain = _items(RoadworkDataset(samples, "highres12", 28, augment=augment, masks=masks))
    cached = RoadworkDataset(samples, "highres12", 28, augment=augment, masks=masks, image_cache=cache)
    _assert_same(_items(cached), plain)                       # cold: computed and written
    assert len(_files(cache.folder)) == 3 + 2                 # views of 3 images, mask views of 2
    _assert_same(_items(cached), plain)                       # warm: read back
    assert plain[2]["mask_known"] == 0.0 and plain[0]["seg_target"].sum() > 0
    if augment:                                               # the pipeline really ran (and drew per seed)
        unaugmented = _items(RoadworkDataset(samples, "highres12", 28, masks=masks))
        assert not torch.equal(plain[0]["views"], unaugmented[0]["views"])
        assert not torch.equal(_items(cached, seed=1)[0]["views"], plain[0]["views"])


def test_warm_pass_does_not_decode(folder, tmp_path, monkeypatch):
    root, samples, masks = folder
    data = RoadworkDataset(samples, "single", 28, masks=masks, image_cache=ImageCache(tmp_path / "cache"))
    first = _items(data)

    def no_decoding(*args, **kwargs):
        raise AssertionError("the image cache should have served this item")
    monkeypatch.setattr("roadwork.data.Image.open", no_decoding)
    with pytest.raises(AssertionError, match="should have served"):   # the patch bites an uncached dataset
        RoadworkDataset(samples, "single", 28)[0]
    _assert_same(_items(data), first)


def test_other_views_sizes_or_masks_miss(folder, tmp_path):
    root, samples, masks = folder
    cache = ImageCache(tmp_path / "cache")
    small = RoadworkDataset(samples[:1], "single", 28, masks=masks[:1], image_cache=cache)
    _items(small)
    written = set(_files(cache.folder))
    for views, size in (("single", 32), ("global", 28)):
        other = RoadworkDataset(samples[:1], views, size, masks=masks[:1], image_cache=cache)
        item = other[0]
        assert item["views"].shape == (1, 3, size, size)
        _assert_same([item], [RoadworkDataset(samples[:1], views, size, masks=masks[:1])[0]])
        new = set(_files(cache.folder)) - written
        assert len(new) == 2                                   # its own views file and mask file
        written |= new
    before = small[0]["seg_target"]
    Image.fromarray(255 - np.asarray(Image.open(masks[0]))).save(masks[0])   # an edited mask is not served stale
    _assert_same([small[0]], [RoadworkDataset(samples[:1], "single", 28, masks=masks[:1])[0]])
    assert not torch.equal(small[0]["seg_target"], before)
    assert len(_files(cache.folder)) == len(written) + 1


def test_benchmark_datasets_bypass_the_cache(folder, tmp_path):
    root, samples, _ = folder
    with initialize_config_dir(str(CONF), version_base=None):
        bench = BenchmarkTransform(compose("config", overrides=["task=roadwork"]).challenge)
    data = RoadworkDataset(samples, "single", 28, benchmark=bench, image_cache=ImageCache(tmp_path / "cache"))
    items = _items(data)
    assert data.image_cache is None and _files(tmp_path / "cache") == []
    _assert_same(items, _items(RoadworkDataset(samples, "single", 28, benchmark=bench)))


def test_task_builds_the_cache_from_config_and_bypasses_it_for_benchmark(folder, tmp_path):
    root, _, _ = folder
    overrides = ["task=roadwork", "data.image_cache.enabled=true", f"data.image_cache.dir={tmp_path / 'dec'}",
                 "data.eval=train", "data.predict=train", "benchmark=true"]
    with initialize_config_dir(str(CONF), version_base=None):
        cfg = compose("config", overrides=overrides)
        default = compose("config", overrides=["task=roadwork", f"paths.cache_dir={tmp_path}"])
    assert not default.data.image_cache.enabled and default.data.image_cache.dir == f"{tmp_path}/decoded"
    task = RoadworkTask(cfg)
    assert task.datasets(root, "eval")["eval"].image_cache is None
    predict = task.datasets(root, "predict")["predict"]
    assert predict.image_cache.folder == tmp_path / "dec"
    predict[0]
    assert len(_files(tmp_path / "dec")) == 1


def test_corrupt_cache_file_names_the_file(folder, tmp_path):
    root, samples, _ = folder
    cache = ImageCache(tmp_path / "cache")
    data = RoadworkDataset(samples[:1], "single", 28, image_cache=cache)
    data[0]
    (path,) = _files(cache.folder)
    path.write_bytes(b"\x93NUMPY truncated")
    with pytest.raises(ValueError, match=f"{path.name}.*unreadable"):
        data[0]
