"""Broken images and non-finite targets are refused by name at indexing (or skipped and counted)."""
import json
import logging
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from biomass.synth import SynthConfig, write_synthetic
from biomass.table import read_train_table
from common.data import image_check
from common.data.image_check import CheckSettings, broken_images, content_key, decode_error
from roadwork.data import mask_files
from roadwork.samples import index_samples
from sclera.data import BadSample, scan_ssbc, validated
from sclera.synth import SetSpec, write_sample


def _noise_image(path, size=(96, 80)):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _truncate(path, keep=0.6):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    return path


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_truncated_file_passes_the_header_but_not_the_full_decode(tmp_path, suffix):
    path = _truncate(_noise_image(tmp_path / f"x{suffix}"))
    with Image.open(path) as image:              # what the old checks saw: a valid header and size
        assert image.size == (96, 80)
    assert decode_error(path).startswith(f"{path}: cannot decode image (OSError")
    assert decode_error(_noise_image(tmp_path / f"ok{suffix}")) is None


def test_cache_skips_good_files_and_rechecks_changed_ones(tmp_path, monkeypatch):
    good, bad = _noise_image(tmp_path / "good.jpg"), _truncate(_noise_image(tmp_path / "bad.jpg"))
    settings = CheckSettings(workers=2, cache_dir=tmp_path / "cache")
    assert list(broken_images([good, bad], settings)) == [bad]
    assert (tmp_path / "cache" / content_key(good)[:2] / content_key(good)).is_file()
    decoded = []
    monkeypatch.setattr(image_check, "decode_error", lambda p: decoded.append(p))
    assert broken_images([good, bad], settings) == {}            # stub decodes everything as good ...
    assert decoded == [bad]                                       # ... but only the uncached file was decoded
    monkeypatch.undo()
    _truncate(good)                                               # the file changes: its key changes, rechecked
    assert list(broken_images([good], settings)) == [good]


def test_parallel_and_serial_checks_agree(tmp_path):
    paths = [_noise_image(tmp_path / f"{i}.png", (32, 24)) for i in range(6)]
    for path in paths[1::2]:
        _truncate(path, 0.5)
    serial = broken_images(paths, CheckSettings(workers=1, cache_dir=None))
    parallel = broken_images(paths, CheckSettings(workers=3, cache_dir=None))
    assert serial == parallel and sorted(parallel) == sorted(paths[1::2])


def test_configure_reads_the_config(tmp_path):
    from hydra import compose, initialize_config_dir

    from tests.cli import REPO
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"paths.cache_dir={tmp_path}", "image_check.workers=3"])
    try:
        assert image_check.configure(cfg) == CheckSettings(workers=3, cache_dir=tmp_path / "image_check")
        cfg.image_check.workers = 0
        with pytest.raises(ValueError, match="image_check.workers=0"):
            image_check.configure(cfg)
    finally:
        image_check._settings = CheckSettings(workers=1, cache_dir=None)


# ---- biomass --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def biomass_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("biomass")
    write_synthetic(root, seed=3, cfg=SynthConfig(n_train=4, n_test=2, width=112, height=56))
    return root


def _biomass_copy(biomass_root, tmp_path):
    root = tmp_path / "d"
    shutil.copytree(biomass_root, root)
    return root, pd.read_csv(root / "train.csv")


def test_biomass_truncated_image_named_with_its_line_or_skipped(tmp_path, biomass_root, caplog):
    root, df = _biomass_copy(biomass_root, tmp_path)
    image = df["image_path"].iloc[5]                              # the second image, lines 7-11
    _truncate(root / image)
    with pytest.raises(ValueError, match=rf"train.csv: line 7 .*{image}: cannot decode image"):
        read_train_table(root)
    with caplog.at_level(logging.WARNING):
        wide = read_train_table(root, skip_bad=True)
    assert len(wide) == 3 and image not in set(wide["image_path"])
    assert "skipping 1 image(s) that cannot be decoded" in caplog.text


def test_biomass_infinite_target_named_with_its_line(tmp_path, biomass_root):
    root, df = _biomass_copy(biomass_root, tmp_path)
    df["target"] = df["target"].astype(object)
    df.loc[3, "target"] = "inf"
    df.to_csv(root / "train.csv", index=False)
    with pytest.raises(ValueError, match=r"train.csv: line 5 .*target inf is not finite"):
        read_train_table(root)
    assert len(read_train_table(root, skip_bad=True)) == 4


def test_biomass_table_without_a_finite_target_is_refused(tmp_path, biomass_root):
    root, df = _biomass_copy(biomass_root, tmp_path)
    df.assign(target=np.nan).to_csv(root / "train.csv", index=False)
    with pytest.raises(ValueError, match=r"train.csv: none of its 20 target rows holds a finite number"):
        read_train_table(root)


# ---- sclera ---------------------------------------------------------------------------------
@pytest.mark.parametrize("broken", ["Images/img1.png", "Masks/img0.png"])
def test_sclera_truncated_image_or_mask_named_or_skipped(tmp_path, broken):
    rng = np.random.default_rng(0)
    for i in range(3):
        write_sample(tmp_path / "a", f"img{i}", SetSpec("X", "synthetic", "binary"), rng)
    _truncate(tmp_path / "a" / broken)
    items, problems = scan_ssbc(tmp_path / "a", "X", "binary")
    with pytest.raises(BadSample, match=rf"{broken}: cannot decode image"):
        validated(items, list(problems), skip_bad=False)
    kept = validated(items, problems, skip_bad=True)
    assert len(kept) == 2 and len(problems) == 1


# ---- roadwork -------------------------------------------------------------------------------
def _sample(folder, stem, record):
    folder.mkdir(parents=True, exist_ok=True)
    _noise_image(folder / f"{stem}.jpg", (56, 42))
    (folder / f"{stem}.json").write_text(record)


def test_roadwork_truncated_jpeg_named_or_skipped(tmp_path):
    _sample(tmp_path, "good", '{"label": 1}')
    _sample(tmp_path, "cut", '{"label": 0}')
    _truncate(tmp_path / "cut.jpg", 0.5)
    with pytest.raises(ValueError, match=r"cut.jpg: cannot decode image"):
        index_samples(tmp_path, {}, [], True, skip_bad=False)
    index = index_samples(tmp_path, {}, [], True, skip_bad=True)
    assert [s.name for s in index.samples] == ["good.jpg"] and len(index.skipped) == 1


@pytest.mark.parametrize("label", ["Infinity", "NaN", '"inf"'])
def test_roadwork_non_finite_label_named(tmp_path, label):
    _sample(tmp_path, "good", '{"label": 1}')
    _sample(tmp_path, "odd", '{"label": %s}' % label)
    assert json.loads((tmp_path / "odd.json").read_text())      # valid to Python's json module
    with pytest.raises(ValueError, match=r"odd.json: label"):
        index_samples(tmp_path, {}, [], True, skip_bad=False)


def test_roadwork_truncated_mask_named(tmp_path):
    _sample(tmp_path / "train", "a", '{"label": 1}')
    (tmp_path / "masks" / "train").mkdir(parents=True)
    Image.new("L", (56, 42)).save(tmp_path / "masks" / "train" / "a.png")
    samples = index_samples(tmp_path / "train", {}, [], True, skip_bad=False).samples
    assert mask_files(samples, tmp_path, "masks") == [tmp_path / "masks" / "train" / "a.png"]
    _noise_image(tmp_path / "masks" / "train" / "a.png", (56, 42))
    _truncate(tmp_path / "masks" / "train" / "a.png")
    with pytest.raises(ValueError, match=r"masks/train/a.png: cannot decode image"):
        mask_files(samples, tmp_path, "masks")


def test_image_cache_write_failure_names_the_config_key(tmp_path):
    from common.data.image_cache import ImageCache
    (tmp_path / "a_file").write_text("")
    cache = ImageCache(tmp_path / "a_file" / "decoded")       # a folder below a file: not writable, even by root
    image = _noise_image(tmp_path / "x.png", (8, 8))
    with pytest.raises(OSError, match=rf"cannot write .*x.png.*data.image_cache.dir={tmp_path / 'a_file'}/decoded"):
        cache.get(image, "prep", lambda: np.ones((2, 2)))
