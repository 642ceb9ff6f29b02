"""biomass: synthetic data, train.csv parsing and its errors, statistics, dataset items, augmentation."""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from biomass.augment import build_transform
from biomass.constants import TARGETS
from biomass.data import BiomassDataset, fit_stats, group_keys
from biomass.synth import SynthConfig, write_synthetic
from biomass.table import read_solution_table, read_test_table, read_train_table

SMALL = SynthConfig(n_train=8, n_test=3, width=112, height=56)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("biomass_synth")
    write_synthetic(root, seed=3, cfg=SMALL)
    return root


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_synth_is_deterministic_and_seed_dependent(tmp_path, synth_root):
    write_synthetic(tmp_path / "a", seed=3, cfg=SMALL)
    write_synthetic(tmp_path / "b", seed=4, cfg=SMALL)
    assert _digest(tmp_path / "a") == _digest(synth_root)
    assert _digest(tmp_path / "b") != _digest(synth_root)


def test_synth_format_and_label_identities(synth_root):
    train = pd.read_csv(synth_root / "train.csv")
    assert list(train.columns) == ["sample_id", "image_path", "Sampling_Date", "State", "Species",
                                   "Pre_GSHH_NDVI", "Height_Ave_cm", "target_name", "target"]
    assert len(train) == 5 * SMALL.n_train
    assert list(pd.read_csv(synth_root / "test.csv").columns) == ["sample_id", "image_path", "target_name"]
    sol = pd.read_csv(synth_root / "test_solution.csv")
    assert list(sol.columns) == ["sample_id", "target"] and len(sol) == 5 * SMALL.n_test
    wide = read_train_table(synth_root)
    g, d, c, gdm, tot = (wide[t].to_numpy() for t in TARGETS)
    np.testing.assert_allclose(gdm, g + c, atol=2e-4)
    np.testing.assert_allclose(tot, g + d + c, atol=2e-4)
    from PIL import Image
    with Image.open(synth_root / wide["image_path"].iloc[0]) as img:
        assert img.format == "JPEG" and img.size == (SMALL.width, SMALL.height)


def _write(root: Path, df: pd.DataFrame, name: str = "train.csv") -> None:
    df.to_csv(root / name, index=False)


def _copy_tree(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_missing_targets_are_masked_not_zero(tmp_path, synth_root):
    root = _copy_tree(synth_root, tmp_path / "d")
    df = pd.read_csv(root / "train.csv")
    first = df["sample_id"].str.split("__").str[0].iloc[0]
    dead_row = df.index[(df["sample_id"] == f"{first}__Dry_Dead_g")][0]
    df.loc[dead_row, "target"] = np.nan                                           # NaN value
    df = df[df["sample_id"] != f"{first}__Dry_Clover_g"]                          # absent row
    _write(root, df)
    wide = read_train_table(root).set_index("image_id")
    assert math.isnan(wide.loc[first, "Dry_Dead_g"]) and math.isnan(wide.loc[first, "Dry_Clover_g"])
    assert wide.loc[first, "mask_Dry_Dead_g"] == 0 and wide.loc[first, "mask_Dry_Clover_g"] == 0
    assert wide.loc[first, "mask_Dry_Green_g"] == 1
    item = BiomassDataset(wide.reset_index(), root, build_transform(None, [56, 112], False))[0]
    assert item["target_mask"].tolist() == [1.0, 0.0, 0.0, 1.0, 1.0]
    assert torch.isnan(item["targets_g"][1]) and torch.isnan(item["targets_g"][2])


@pytest.mark.parametrize("change, error, words", [
    (lambda df: df.drop(columns=["Sampling_Date"]), ValueError, ["missing column", "Sampling_Date"]),
    (lambda df: df.assign(target_name=df["target_name"].replace("GDM_g", "GDM")), ValueError,
     ["line 5", "'GDM'", "target_name"]),
    (lambda df: df.assign(target=df["target"].astype(object).where(df.index != 2, "abc")), ValueError,
     ["line 4", "'abc'", "not a number"]),
    (lambda df: df.assign(target=df["target"].where(df.index != 6, -1.0)), ValueError, ["line 8", "negative"]),
    (lambda df: df.assign(image_path=df["image_path"].where(df.index >= 5, "train/nope.jpg")),
     FileNotFoundError, ["line 2", "nope.jpg", "does not exist"]),
])
def test_bad_train_rows_raise_clear_errors(tmp_path, synth_root, change, error, words):
    root = _copy_tree(synth_root, tmp_path / "d")
    _write(root, change(pd.read_csv(root / "train.csv")))
    with pytest.raises(error) as info:
        read_train_table(root)
    for word in words:
        assert word in str(info.value)
    assert "train.csv" in str(info.value) or "missing column" not in words


def test_skip_bad_drops_and_counts(tmp_path, synth_root, caplog):
    root = _copy_tree(synth_root, tmp_path / "d")
    df = pd.read_csv(root / "train.csv")
    df.loc[0, "target"] = -3.0
    df.loc[df.index[-5:], "image_path"] = "train/missing.jpg"
    _write(root, df)
    wide = read_train_table(root, skip_bad=True)
    assert len(wide) == SMALL.n_train - 1
    assert math.isnan(wide["Dry_Green_g"].iloc[0]) and wide["mask_Dry_Green_g"].iloc[0] == 0
    assert "skipping 1 row" in caplog.text and "skipping 1 image" in caplog.text


def test_undecodable_image_names_the_file(tmp_path, synth_root):
    root = _copy_tree(synth_root, tmp_path / "d")
    wide = read_train_table(root)
    (root / wide["image_path"].iloc[1]).write_bytes(b"not a jpeg")
    ds = BiomassDataset(wide, root, build_transform(None, [56, 112], False))
    with pytest.raises(ValueError, match=wide["image_path"].iloc[1].split("/")[-1] + ".*cannot be decoded"):
        ds[1]


def test_test_and_solution_tables(synth_root):
    long, wide = read_test_table(synth_root)
    assert len(long) == 5 * SMALL.n_test and len(wide) == SMALL.n_test
    assert list(long["sample_id"]) == list(pd.read_csv(synth_root / "test.csv")["sample_id"])
    solved = read_solution_table(synth_root)
    sol = pd.read_csv(synth_root / "test_solution.csv").set_index("sample_id")["target"]
    image = solved["image_id"].iloc[2]
    assert solved["Dry_Total_g"].iloc[2] == pytest.approx(sol[f"{image}__Dry_Total_g"])


def test_stats_come_from_the_given_split_only(synth_root):
    wide = read_train_table(synth_root)
    part = wide.iloc[:5]
    stats = fit_stats(part, quadrat_area=0.21)
    j = TARGETS.index("Dry_Total_g")
    assert stats["gm2_mean"][j] == pytest.approx((part["Dry_Total_g"] / 0.21).mean())
    assert stats["gm2_std"][j] == pytest.approx((part["Dry_Total_g"] / 0.21).std(ddof=0))
    assert stats["log1p_mean"][0] == pytest.approx(np.log1p(part["Dry_Green_g"]).mean())
    assert stats["height_mean"] == pytest.approx(part["Height_Ave_cm"].mean())
    assert stats["states"] == sorted(set(part["State"]))


def test_group_keys_pair_date_and_state(synth_root):
    wide = read_train_table(synth_root)
    keys = group_keys(wide)
    assert keys[0] == f"{wide['Sampling_Date'].iloc[0]}|{wide['State'].iloc[0]}"


def _block(p_clean: float, *transforms: dict) -> list[dict]:
    """A data.augment list: the transforms in order, bypassed with probability p_clean."""
    return [{"_target_": "common.data.augment.SequentialOrClean", "p_clean": p_clean, "transforms": list(transforms)}]


AUG = _block(0.0, {"_target_": "albumentations.HorizontalFlip", "p": 0.5},
             {"_target_": "albumentations.VerticalFlip", "p": 0.5},
             {"_target_": "biomass.augment.AspectCrop", "min_scale": 0.5, "p": 1.0},
             {"_target_": "albumentations.Affine", "scale": [0.95, 1.05], "translate_percent": [-0.03, 0.03],
              "rotate": [-5, 5], "shear": [0.0, 0.0], "border_mode": 4, "p": 0.5},
             {"_target_": "albumentations.ColorJitter", "brightness": 0.1, "contrast": 0.1, "saturation": 0.1,
              "hue": 0.02, "p": 0.5},
             {"_target_": "albumentations.GaussianBlur", "blur_limit": [0, 0], "sigma_limit": [0.3, 1.0], "p": 0.5},
             {"_target_": "albumentations.GaussNoise", "std_range": [0.01, 0.04], "p": 0.5},
             {"_target_": "albumentations.CoarseDropout", "num_holes_range": [1, 2], "hole_height_range": [0.05, 0.1],
              "hole_width_range": [0.05, 0.1], "fill": 0, "p": 0.5})


def test_train_pipeline_keeps_size_and_crop_keeps_aspect():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (100, 200, 3), dtype=np.uint8)
    out = build_transform(AUG, [28, 56], train=True)(image=image)["image"]
    assert out.shape == (28, 56, 3)
    crop = build_transform(AUG, [28, 56], train=True).transforms[1].transforms[2]
    params = crop.get_params_dependent_on_data({"shape": (28, 56, 3)}, {"image": image[:28, :56]})
    x0, y0, x1, y1 = params["crop_coords"]
    assert (x1 - x0) == 2 * (y1 - y0) and 14 <= (y1 - y0) <= 28
    assert crop(image=image[:30, :90])["image"].shape == (30, 90, 3)      # back to the size of the image it gets


def test_p_clean_one_is_plain_resize():
    image = np.random.default_rng(1).integers(0, 255, (60, 120, 3), dtype=np.uint8)
    clean = _block(1.0, *AUG[0]["transforms"])
    a = build_transform(clean, [28, 56], train=True)(image=image)["image"]
    b = build_transform(None, [28, 56], train=False)(image=image)["image"]
    np.testing.assert_array_equal(a, b)


def test_augment_entries_must_be_transforms():
    for bad, words in (({"p_clean": 0.3, "hflip": 0.5}, "expected a list.*older|configs written before"),
                       ([{"name": "GridDistortion"}], r"expected \{_target_"),
                       ([{"_target_": "albumentations.NoSuchTransform"}], "does not name a class"),
                       (_block(0.0, {"_target_": "torch.nn.Identity"}),
                        r"data\.augment\[0\]\.transforms\[0\]\._target_=.*not an albumentations transform")):
        with pytest.raises(ValueError, match=words):
            build_transform(bad, [28, 56], train=True)


def test_timestamp_overlay_draws_only_in_one_corner():
    from biomass.augment import TimestampOverlay
    image = np.full((56, 112, 3), 90, np.uint8)
    out = TimestampOverlay(font_scale=(0.3, 0.3), p=1.0)(image=image)["image"]
    changed = np.argwhere((out != image).any(-1))
    assert len(changed) > 20
    rows, cols = changed[:, 0], changed[:, 1]
    assert (rows.max() < 28) or (rows.min() >= 28)          # one horizontal half
    assert (cols.max() < 80) or (cols.min() >= 32)           # one side


def test_light_spots_only_brighten():
    from common.data.augment import GaussianHighlights
    image = np.random.default_rng(0).integers(0, 200, (56, 112, 3), dtype=np.uint8)
    spots = GaussianHighlights(count=(2, 2), size=(0.2, 0.2), strength=(0.5, 0.5), relative_to="height",
                               size_is="radius", min_size=1.0, p=1.0)     # biomass's light spots
    out = spots(image=image)["image"]
    assert (out.astype(int) >= image.astype(int)).all() and (out.astype(int) - image).max() > 40


def test_default_config_builds_every_augmentation():
    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "data" / "biomass" / "csiro.yaml")
    augment = OmegaConf.to_container(cfg.augment)
    assert augment[0]["_target_"] == "common.data.augment.SequentialOrClean" and augment[0]["p_clean"] == 0.3
    pipeline = build_transform(_block(0.0, *augment[0]["transforms"]), cfg.image_size, train=True)
    names = {type(t).__name__ for t in pipeline.transforms[1].transforms}
    assert {"TimestampOverlay", "GaussianHighlights", "AspectCrop", "CoarseDropout"} <= names
    image = np.random.default_rng(0).integers(0, 255, (300, 600, 3), dtype=np.uint8)
    assert pipeline(image=image)["image"].shape == (224, 448, 3)


def test_skip_bad_drops_undecodable_images(tmp_path, synth_root, caplog):
    root = _copy_tree(synth_root, tmp_path / "d")
    first = read_train_table(root)
    broken = first["image_path"].iloc[2]
    (root / broken).write_bytes(b"not a jpeg")
    wide = read_train_table(root, skip_bad=True)
    assert len(wide) == len(first) - 1 and broken not in set(wide["image_path"])
    assert "skipping 1 image(s) that cannot be decoded" in caplog.text and broken in caplog.text


def test_any_albumentations_transform_joins_the_list():
    import albumentations as A

    from common.data.augment import build_augment
    more = [{"_target_": "albumentations.GridDistortion", "num_steps": 3, "p": 1.0},
            {"_target_": "albumentations.ElasticTransform", "alpha": 2.0, "p": 1.0},
            {"_target_": "albumentations.HueSaturationValue", "p": 0.5},
            {"_target_": "albumentations.Transpose", "p": 0.0}]
    pipeline = build_augment(_block(0.0, *AUG[0]["transforms"], *more))
    steps = pipeline.transforms[0].transforms
    assert [type(t) for t in steps[-4:]] == [A.GridDistortion, A.ElasticTransform, A.HueSaturationValue, A.Transpose]
    assert steps[-4].num_steps == 3 and steps[-3].alpha == 2.0
    image = np.random.default_rng(0).integers(0, 255, (28, 56, 3), dtype=np.uint8)
    assert pipeline(image=image)["image"].shape == (28, 56, 3)


def test_augment_overrides_from_the_command_line_compose():
    """README's overrides: a value by its place in the list, the block's list replaced whole (Hydra cannot append)."""
    from hydra import compose, initialize_config_dir

    from common.data.augment import build_augment
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["task=biomass", "data.augment.0.p_clean=0.5",
                                           "data.augment.0.transforms.2.min_scale=0.7"])
        listed = compose("config", overrides=["task=biomass", "data.augment.0.transforms=[{_target_: "
                                              "albumentations.HorizontalFlip, p: 0.5}, {_target_: "
                                              "albumentations.GridDistortion, p: 0.2}]"])
    block = build_augment(cfg.data.augment).transforms[0]
    assert block.p == pytest.approx(0.5) and block.transforms[2].min_scale == 0.7
    steps = build_augment(listed.data.augment).transforms[0].transforms
    assert [type(t).__name__ for t in steps] == ["HorizontalFlip", "GridDistortion"]


@pytest.mark.parametrize("size", [(28, 56), (30, 95)])
def test_aspect_crops_are_albumentations_crops_sized_by_the_image_draw_for_draw(size):
    """AspectCrop / AspectResizedCrop == RandomSizedCrop / RandomResizedCrop given the image's size and aspect."""
    import albumentations as A

    from biomass.augment import AspectCrop, AspectResizedCrop
    h, w = size
    image = np.random.default_rng(2).integers(0, 255, (h, w, 3), dtype=np.uint8)
    pairs = [(AspectCrop(min_scale=0.6, p=0.7),
              A.RandomSizedCrop(min_max_height=(max(1, int(round(0.6 * h))), h), size=(h, w), w2h_ratio=w / h, p=0.7)),
             (AspectResizedCrop(area=(0.5, 1.0), p=0.7),
              A.RandomResizedCrop(size=(h, w), scale=(0.5, 1.0), ratio=(w / h, w / h), p=0.7))]
    for ours, theirs in pairs:
        ours, theirs = A.Compose([ours]), A.Compose([theirs])
        for seed in range(20):
            ours.set_random_seed(seed)
            theirs.set_random_seed(seed)
            np.testing.assert_array_equal(ours(image=image)["image"], theirs(image=image)["image"])
