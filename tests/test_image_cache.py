"""common.data.image_cache and its use by the sclera and biomass datasets: hits return the stored array, writes
are atomic, corrupt files are named, preparations and contents get their own files; cached items equal
uncached ones (augmentation off and on, same seed), and a warm pass neither decodes nor resizes."""
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageFile

import common.data.image_cache as image_cache_module
from biomass.augment import build_transform
from biomass.data import BiomassDataset, load_rgb
from biomass.synth import SynthConfig, write_synthetic
from biomass.table import read_train_table
from common.data.augment import build_augment
from common.data.image_cache import ImageCache
from sclera.data import ScleraDataset
from sclera.sets import evaluation_items, training_items
from sclera.synth import write_dataset

CONF = Path(__file__).resolve().parents[1] / "conf" / "data"


def _no_decoding(monkeypatch, resize: bool = True) -> None:
    """From now on any PIL decode (and with `resize` any PIL or OpenCV resize) raises."""
    def refuse(*args, **kwargs):
        raise AssertionError("decoded or resized an image on a warm cache pass")
    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    if resize:
        monkeypatch.setattr(Image.Image, "resize", refuse)
        monkeypatch.setattr(cv2, "resize", refuse)


def _assert_items_equal(got: list[dict], want: list[dict]) -> None:
    for a, b in zip(got, want, strict=True):
        assert a.keys() == b.keys()
        for key, value in b.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(a[key], value, rtol=0, atol=0)
            elif isinstance(value, np.ndarray):
                np.testing.assert_array_equal(a[key], value)
            else:
                assert a[key] == value, key


def _items(dataset, seed: int = 0) -> list[dict]:
    if dataset.transform is not None:
        dataset.transform.set_random_seed(seed)     # albumentations keeps its own generators
    return [dataset[i] for i in range(len(dataset))]


# ---- common.data.image_cache ---------------------------------------------------------------------------
@pytest.fixture
def image_file(tmp_path) -> Path:
    path = tmp_path / "a.png"
    Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3)).save(path)
    return path


def test_hit_returns_the_stored_array_without_computing(tmp_path, image_file):
    cache = ImageCache(tmp_path / "cache")
    stored = np.random.default_rng(0).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    first = cache.get(image_file, "prep", lambda: stored)
    np.testing.assert_array_equal(first, stored)
    assert cache.path(image_file, "prep").is_file()

    def fail():
        raise AssertionError("computed on a hit")
    again = cache.get(image_file, "prep", fail)
    assert again.dtype == np.uint8 and again.shape == (5, 7, 3)
    np.testing.assert_array_equal(again, stored)
    np.testing.assert_array_equal(np.load(cache.path(image_file, "prep")), stored)


def test_preparation_and_content_each_get_their_own_file(tmp_path, image_file):
    cache = ImageCache(tmp_path / "cache")
    a = cache.get(image_file, "size=4", lambda: np.zeros(2))
    b = cache.get(image_file, "size=8", lambda: np.ones(3))
    assert cache.path(image_file, "size=4") != cache.path(image_file, "size=8")
    np.testing.assert_array_equal(cache.get(image_file, "size=4", lambda: np.full(9, 7.0)), a)
    np.testing.assert_array_equal(cache.get(image_file, "size=8", lambda: np.full(9, 7.0)), b)
    old = cache.path(image_file, "size=4")
    Image.fromarray(np.full((4, 4, 3), 9, np.uint8)).save(image_file)     # new pixels: a miss, not stale
    assert cache.path(image_file, "size=4") != old
    np.testing.assert_array_equal(cache.get(image_file, "size=4", lambda: np.full(2, 5.0)), np.full(2, 5.0))


def test_failed_write_leaves_no_file_and_no_temp(tmp_path, image_file, monkeypatch):
    cache = ImageCache(tmp_path / "cache")
    real_save = np.save

    def half_save(handle, array, allow_pickle):
        handle.write(b"\x93NUMPY partial")
        raise OSError("disk full")
    monkeypatch.setattr(image_cache_module.np, "save", half_save)
    with pytest.raises(OSError, match="disk full"):
        cache.get(image_file, "prep", lambda: np.ones((2, 2)))
    assert not cache.path(image_file, "prep").exists()
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []
    monkeypatch.setattr(image_cache_module.np, "save", real_save)
    np.testing.assert_array_equal(cache.get(image_file, "prep", lambda: np.ones((2, 2))), np.ones((2, 2)))
    arrays = [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.parent.name != "layouts"]
    assert arrays == [cache.path(image_file, "prep").name]      # and its preparation's layout under layouts/


def test_corrupt_file_is_an_error_naming_it(tmp_path, image_file):
    cache = ImageCache(tmp_path / "cache")
    cache.get(image_file, "prep", lambda: np.ones((3, 3)))
    path = cache.path(image_file, "prep")
    path.write_bytes(path.read_bytes()[:20])                       # truncated by a copy
    with pytest.raises(ValueError, match=f"image cache file {path} .*{image_file.name}.*unreadable"):
        cache.get(image_file, "prep", lambda: np.ones((3, 3)))


def test_from_config():
    assert ImageCache.from_config(None) is None
    assert ImageCache.from_config(OmegaConf.create({"enabled": False, "dir": "/x"})) is None
    cache = ImageCache.from_config(OmegaConf.create({"enabled": True, "dir": "/x/decoded"}))
    assert isinstance(cache, ImageCache) and cache.folder == Path("/x/decoded")
    with pytest.raises(ValueError, match="data.image_cache.dir"):
        ImageCache.from_config(OmegaConf.create({"enabled": True, "dir": None}))
    for task in ("sclera/ssbc", "biomass/csiro"):                  # shipped off, with a folder named
        section = OmegaConf.load(CONF / f"{task}.yaml").image_cache
        assert section.enabled is False and OmegaConf.to_container(section)["dir"] == "${paths.cache_dir}/decoded"


# ---- sclera ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ssbc_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ssbc")
    write_dataset(root, seed=2, train_per_set=2, val_per_set=1, eval_per_set=1)
    return root


@pytest.mark.parametrize("augment", [False, True])
def test_sclera_cached_items_equal_uncached_and_warm_pass_decodes_nothing(ssbc_root, tmp_path, monkeypatch, augment):
    cfg = OmegaConf.load(CONF / "sclera" / "ssbc.yaml")
    items = training_items(cfg, ssbc_root, ("Training",), oversample=True)      # MASD repeated: shared files
    size = (40, 56)

    def dataset(cache):
        return ScleraDataset(items, size, build_augment(cfg.augment) if augment else None, image_cache=cache)
    want = _items(dataset(None))
    if augment:                                                                 # the seed does matter
        assert any(not torch.equal(a["image"], b["image"]) for a, b in zip(_items(dataset(None), 1), want))
    cache = ImageCache(tmp_path / "decoded")
    cached = dataset(cache)
    _assert_items_equal(_items(cached), want)                                   # cold: computed and stored
    assert len(list(cache.folder.rglob("*.npy"))) == 2 * len({it.image for it in items})   # image + mask
    _no_decoding(monkeypatch)
    _assert_items_equal(_items(cached), want)                                   # warm: read back
    assert (want[0]["height"], want[0]["width"]) != size                        # original size kept
    with pytest.raises(AssertionError, match="warm cache pass"):               # the guard does bite
        dataset(None)[0]


def test_sclera_eval_items_and_other_sizes(ssbc_root, tmp_path):
    cfg = OmegaConf.load(CONF / "sclera" / "ssbc.yaml")
    items = evaluation_items(cfg, ssbc_root, with_masks=True)                   # MOBIUS: 'sip' masks
    cache = ImageCache(tmp_path / "decoded")
    for size in ((56, 70), (28, 28)):                                           # one cache, two sizes
        want = _items(ScleraDataset(items, size, full_mask=True))
        for _ in range(2):
            _assert_items_equal(_items(ScleraDataset(items, size, full_mask=True, image_cache=cache)), want)
        assert want[0]["image"].shape == (3, *size) and want[0]["mask_full"].shape == (want[0]["height"],
                                                                                      want[0]["width"])


# ---- biomass --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def biomass_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("biomass")
    write_synthetic(root, seed=5, cfg=SynthConfig(n_train=4, n_test=1, width=112, height=56))
    return root


AUG = OmegaConf.load(CONF / "biomass" / "csiro.yaml").augment
AUG[0].p_clean = 0.0                    # always augmented
SIZE, DRAFT = (14, 28), (56, 28)        # decode_scale=2: JPEG draft decoding at half the file's size


def test_biomass_split_pipeline_equals_the_whole_one(biomass_root):
    """Resize in the dataset then augment == the one albumentations pipeline of before, draw for draw."""
    table = read_train_table(biomass_root)
    ds = BiomassDataset(table, biomass_root, build_augment(AUG), draft_size=DRAFT, image_size=SIZE)
    whole = build_transform(AUG, SIZE, train=True)
    draws = []
    for seed in range(3):
        got = _items(ds, seed)
        draws.append(torch.stack([item["image"] for item in got]))
        whole.set_random_seed(seed)
        for item, path in zip(got, table["image_path"], strict=True):
            want = whole(image=load_rgb(biomass_root / path, DRAFT))["image"]
            torch.testing.assert_close(item["image"], torch.tensor(want).permute(2, 0, 1).float() / 255.0,
                                       rtol=0, atol=0)
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])


@pytest.mark.parametrize("augment", [False, True])
def test_biomass_cached_items_equal_uncached_and_warm_pass_decodes_nothing(biomass_root, tmp_path, monkeypatch,
                                                                          augment):
    table = read_train_table(biomass_root)

    def dataset(cache, draft=DRAFT):
        return BiomassDataset(table, biomass_root, build_augment(AUG) if augment else None,
                              draft_size=draft, image_size=SIZE, image_cache=cache)
    want = _items(dataset(None))
    if augment:                                                                 # the seed does matter
        assert any(not torch.equal(a["image"], b["image"]) for a, b in zip(_items(dataset(None), 1), want))
    cache = ImageCache(tmp_path / "decoded")
    cached = dataset(cache)
    _assert_items_equal(_items(cached), want)
    assert len(list(cache.folder.rglob("*.npy"))) == len(table)
    full_decode = dataset(cache, draft=None)                                    # another preparation: a miss
    assert full_decode.preparation != cached.preparation
    _items(full_decode)
    assert len(list(cache.folder.rglob("*.npy"))) == 2 * len(table)
    _no_decoding(monkeypatch, resize=not augment)      # the random crop resizes on every pass
    _assert_items_equal(_items(cached), want)
    with pytest.raises(AssertionError, match="warm cache pass"):
        dataset(None)[0]


def test_tasks_build_datasets_with_the_configured_cache(ssbc_root, biomass_root, tmp_path):
    from hydra import compose, initialize_config_dir

    from biomass.task import BiomassTask
    from sclera.task import ScleraTask
    with initialize_config_dir(config_dir=str(CONF.parent), version_base="1.3"):
        def build(task, enabled, extra):
            return compose(config_name="config", overrides=[f"task={task}", "logger=none", *extra,
                                                            f"paths.cache_dir={tmp_path}",
                                                            f"data.image_cache.enabled={enabled}"])
        for task, name, root, extra in ((ScleraTask, "sclera", ssbc_root, []),
                                        (BiomassTask, "biomass", biomass_root, ["data.n_folds=2"])):
            on = task(build(name, True, extra)).datasets(root, "fit")
            off = task(build(name, False, extra)).datasets(root, "fit")
            assert {k: d.image_cache.folder for k, d in on.items()} == {"train": tmp_path / "decoded",
                                                                        "val": tmp_path / "decoded"}
            assert all(d.image_cache is None for d in off.values())
            assert off["train"].transform is not None and off["val"].transform is None
