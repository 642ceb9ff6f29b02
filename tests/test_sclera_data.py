"""Sclera data: SSBC layout, SBVPI release, mask encodings, bad input, mixing, augmentation."""
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from common.data.augment import GaussianHighlights, build_augment
from sclera.data import BadSample, ScleraDataset, read_mask, scan_sbvpi, scan_ssbc, validated
from sclera.sets import evaluation_items, training_items
from sclera.synth import SIP_COLOURS, SetSpec, encode_mask, render_eye, write_dataset, write_sample

CONF = Path(__file__).resolve().parents[1] / "conf" / "data" / "sclera" / "ssbc.yaml"


def data_cfg(**replacements):
    cfg = OmegaConf.load(CONF)
    for key, value in replacements.items():      # replace whole fields (merge would keep the file's sets)
        cfg[key] = value
    return cfg


@pytest.fixture(scope="module")
def ssbc_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ssbc")
    write_dataset(root, seed=1, train_per_set=3, val_per_set=2, eval_per_set=2)
    return root


def test_layout_is_the_ssbc_tree(ssbc_root):
    for name in ("SynCROI", "MASD", "SBVPI"):
        for split in ("Training", "Validation"):
            images = sorted(p.stem for p in (ssbc_root / name / split / "Images").iterdir())
            masks = sorted(p.stem for p in (ssbc_root / name / split / "Masks").iterdir())
            assert images == masks and len(images) == (3 if split == "Training" else 2)
    for name in ("MOBIUS", "SMD+SLD", "Synthetic"):
        image = next((ssbc_root / "Evaluation" / name / "Images").iterdir())
        with Image.open(image) as im:
            assert im.size == (400, 300)
        assert (ssbc_root / "Evaluation" / name / "Masks" / f"{image.stem}.png").is_file()
    # the two domains are visibly different (mean colour of the images)
    syn = np.mean([np.asarray(Image.open(p)) for p in (ssbc_root / "SynCROI/Training/Images").iterdir()])
    real = np.mean([np.asarray(Image.open(p)) for p in (ssbc_root / "MASD/Training/Images").iterdir()])
    assert abs(syn - real) > 10


def test_rendered_mask_is_the_eye_opening_minus_iris():
    rgb, labels = render_eye(np.random.default_rng(3), "synthetic")
    assert rgb.shape == (300, 400, 3) and labels.shape == (300, 400)
    sclera = rgb[labels == 1].mean(0)
    assert sclera.min() > 180                     # bright sclera
    assert rgb[labels == 3].mean() < 80           # dark pupil
    assert 0.05 < (labels == 1).mean() < 0.5


def test_mask_encodings(tmp_path):
    labels = np.zeros((6, 8), np.uint8)
    labels[1:3, 1:4], labels[3, 3], labels[4, 4] = 1, 2, 3
    encode_mask(labels, "binary").save(tmp_path / "bin.png")
    encode_mask(labels, "sip").save(tmp_path / "sip.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "bin.png", "binary"), labels == 1)
    np.testing.assert_array_equal(read_mask(tmp_path / "sip.png", "sip"), labels == 1)
    assert np.asarray(Image.open(tmp_path / "sip.png"))[labels == 2].tolist() == [list(SIP_COLOURS[2])]
    # a greyscale mask stored as RGB is still a valid 2-class mask
    Image.fromarray(np.stack([np.where(labels == 1, 255, 0)] * 3, -1).astype(np.uint8)).save(tmp_path / "g.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "g.png", "binary"), labels == 1)


@pytest.mark.parametrize("encoding, array, message", [
    ("binary", np.full((4, 4), 128, np.uint8), "grey values \\[128\\] outside the 'binary'"),
    ("binary", np.dstack([np.full((4, 4), 255, np.uint8), np.zeros((4, 4, 2), np.uint8)]), "colour pixels"),
    ("sip", np.dstack([np.full((4, 4), 255, np.uint8)] * 3), "colours \\[\\(255, 255, 255\\)\\] outside the 4-class"),
])
def test_mask_colours_outside_the_encoding_name_the_file(tmp_path, encoding, array, message):
    path = tmp_path / "bad_mask.png"
    Image.fromarray(array).save(path)
    with pytest.raises(BadSample, match=message) as err:
        read_mask(path, encoding)
    assert "bad_mask.png" in str(err.value)


def make_set(folder: Path, count: int, encoding: str = "binary") -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        write_sample(folder, f"img{i}", SetSpec("X", "synthetic", encoding), rng)


def test_image_without_mask_and_mask_without_image(tmp_path):
    make_set(tmp_path / "a", 2)
    (tmp_path / "a" / "Masks" / "img0.png").unlink()
    Image.new("L", (400, 300)).save(tmp_path / "a" / "Masks" / "orphan.png")
    items, problems = scan_ssbc(tmp_path / "a", "X", "binary")
    assert [it.image.name for it in items] == ["img1.png"]
    assert any("img0.png: image without a mask" in p for p in problems)
    assert any("orphan.png: mask without an image" in p for p in problems)
    with pytest.raises(BadSample, match="img0.png: image without a mask"):
        validated(items, list(problems), skip_bad=False)
    assert [it.image.name for it in validated(items, list(problems), skip_bad=True)] == ["img1.png"]


def test_mask_of_another_size_is_an_error_or_skipped(tmp_path):
    make_set(tmp_path / "a", 2)
    Image.new("L", (200, 150)).save(tmp_path / "a" / "Masks" / "img1.png")
    items, problems = scan_ssbc(tmp_path / "a", "X", "binary")
    with pytest.raises(BadSample, match="img1.png: mask is 200x150 but its image img1.png is 400x300"):
        validated(items, problems, skip_bad=False)
    problems = []
    assert [it.image.stem for it in validated(items, problems, skip_bad=True)] == ["img0"]
    assert len(problems) == 1


def test_missing_split_folder_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere/Training/Images"):
        scan_ssbc(tmp_path / "nowhere" / "Training", "X", "binary")


def test_sbvpi_release_layout(tmp_path):
    rng = np.random.default_rng(0)
    for subject in ("1", "2"):
        (tmp_path / subject).mkdir()
        for stem in (f"{subject}L_s_1", f"{subject}R_l_2"):
            rgb, labels = render_eye(rng, "real")
            Image.fromarray(rgb).save(tmp_path / subject / f"{stem}.jpg")
            encode_mask(labels, "binary").save(tmp_path / subject / f"{stem}_sclera.png")
            Image.fromarray(((labels == 2) * 255).astype(np.uint8)).save(tmp_path / subject / f"{stem}_iris.png")
    items, problems = scan_sbvpi(tmp_path, "SBVPI", "binary")
    assert problems == [] and len(items) == 4
    assert all(it.mask.name == f"{it.image.stem}_sclera.png" for it in items)
    (tmp_path / "2" / "2R_l_2_sclera.png").unlink()
    items, problems = scan_sbvpi(tmp_path, "SBVPI", "binary")
    assert len(items) == 3 and "2R_l_2.jpg: image without a mask" in problems[0]
    # per-subject validation split through the config
    (tmp_path / "2" / "2R_l_2.jpg").unlink()
    cfg = data_cfg(train_sets={"SBVPI": {"factor": 1, "layout": "sbvpi", "path": str(tmp_path)}},
                   sbvpi_val_fraction=0.5)
    train = training_items(cfg, tmp_path, ("Training",), oversample=False)
    val = training_items(cfg, tmp_path, ("Validation",), oversample=False)
    assert {it.group for it in train} == {"SBVPI/1"} and {it.group for it in val} == {"SBVPI/2"}
    (tmp_path / "1" / "1L_s_1.jpg").unlink()
    _, problems = scan_sbvpi(tmp_path, "SBVPI", "binary")
    assert problems == [f"{tmp_path / '1' / '1L_s_1_sclera.png'}: mask without an image (expected 1L_s_1.jpg)"]


def test_sets_are_mixed_with_oversampling_factors(ssbc_root):
    cfg = data_cfg(train_sets={"SynCROI": {"factor": 1, "layout": "ssbc", "path": None},
                               "MASD": {"factor": 3, "layout": "ssbc", "path": None}})
    items = training_items(cfg, ssbc_root, ("Training",), oversample=True)
    assert [it.set for it in items].count("SynCROI") == 3 and [it.set for it in items].count("MASD") == 9
    val = training_items(cfg, ssbc_root, ("Validation",), oversample=False)
    assert [it.set for it in val].count("MASD") == 2
    dropped = data_cfg(train_sets={"SynCROI": {"factor": 2, "layout": "ssbc", "path": None},
                                   "MASD": {"factor": 0, "layout": "ssbc", "path": None}})
    assert [it.set for it in training_items(dropped, ssbc_root, ("Validation",), oversample=False)] == ["SynCROI"] * 2
    assert len(training_items(dropped, ssbc_root, ("Training",), oversample=True)) == 6
    bad = data_cfg(train_sets={"MASD": {"factor": 1.5, "layout": "ssbc", "path": None}})
    with pytest.raises(ValueError, match="factor=1.5"):
        training_items(bad, ssbc_root, ("Training",), oversample=True)


def test_evaluation_masks_are_read_as_ssbc_reads_them(ssbc_root, tmp_path):
    items = evaluation_items(data_cfg(), ssbc_root, with_masks=True)
    assert sorted({it.set for it in items}) == ["MOBIUS", "SMD+SLD", "Synthetic"]
    assert {it.encoding for it in items} == {"ssbc"}                        # data.eval_masks=ssbc, every set
    every = evaluation_items(data_cfg(eval_sets=None), ssbc_root, with_masks=False)
    assert sorted({it.set for it in every}) == ["MOBIUS", "SMD+SLD", "Synthetic"] and every[0].mask is None
    declared = evaluation_items(data_cfg(eval_masks="encodings", encodings={"MOBIUS": "sip"}), ssbc_root,
                                with_masks=False)
    assert {it.encoding for it in declared if it.set == "MOBIUS"} == {"sip"}
    with pytest.raises(FileNotFoundError, match="Nope"):
        evaluation_items(data_cfg(eval_dir="Nope"), ssbc_root, with_masks=True)
    with pytest.raises(ValueError, match="data.eval_masks='greyscale'"):
        evaluation_items(data_cfg(eval_masks="greyscale"), ssbc_root, with_masks=True)
    # SSBC's reading: greyscale conversion, value // 255 (254 is background); colour masks are refused
    Image.fromarray(np.array([[0, 254, 255]], np.uint8)).save(tmp_path / "grey.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "grey.png", "ssbc"), [[0, 0, 1]])
    Image.fromarray(np.array([[[255, 0, 0], [0, 0, 0]]], np.uint8)).save(tmp_path / "sip.png")
    with pytest.raises(BadSample, match=r"sip.png: colour pixels .* \+data.encodings.<set>=sip"):
        read_mask(tmp_path / "sip.png", "ssbc")


def test_an_empty_evaluation_set_is_an_error(tmp_path):
    write_dataset(tmp_path, seed=0, train_per_set=0, val_per_set=0, eval_per_set=1)
    for path in (tmp_path / "Evaluation" / "SMD+SLD").rglob("*.*"):
        path.unlink()
    for with_masks in (True, False):
        with pytest.raises(ValueError, match="evaluation set SMD\\+SLD: no usable images"):
            evaluation_items(data_cfg(), tmp_path, with_masks=with_masks)


def test_dataset_resizes_image_and_mask_together(ssbc_root):
    items = evaluation_items(data_cfg(), ssbc_root, with_masks=True)
    ds = ScleraDataset(items, (56, 70), full_mask=True)
    sample = ds[0]
    assert sample["image"].shape == (3, 56, 70) and sample["mask"].shape == (1, 56, 70)
    assert sample["image"].dtype == torch.float32 and 0 <= sample["image"].min() and sample["image"].max() <= 1
    assert set(sample["mask"].unique().tolist()) == {0.0, 1.0}
    assert sample["mask_full"].shape == (300, 400) and (sample["height"], sample["width"]) == (300, 400)
    small = np.asarray(Image.fromarray(sample["mask_full"]).resize((70, 56), Image.NEAREST))
    np.testing.assert_array_equal(sample["mask"][0].numpy(), small)


def test_geometry_moves_mask_with_image_and_blobs_touch_the_image_only(ssbc_root):
    aug = OmegaConf.to_container(OmegaConf.load(CONF).augment)
    only_flip = [{"_target_": "albumentations.HorizontalFlip", "p": 1.0}]
    items = training_items(data_cfg(), ssbc_root, ("Training",), oversample=False)
    plain = ScleraDataset(items, (56, 56))[0]
    flipped = ScleraDataset(items, (56, 56), build_augment(only_flip))[0]
    torch.testing.assert_close(flipped["image"], plain["image"].flip(-1), atol=1 / 255, rtol=0)
    torch.testing.assert_close(flipped["mask"], plain["mask"].flip(-1))
    full = build_augment(aug)      # the whole pipeline keeps a 0/1 mask of the same shape
    out = full(image=np.zeros((56, 56, 3), np.uint8), mask=np.ones((56, 56), np.uint8))
    assert out["mask"].shape == (56, 56) and set(np.unique(out["mask"])) <= {0, 1}
    blob = GaussianHighlights(count=(1, 2), size=(0.1, 0.2), strength=(1.0, 1.0), relative_to="longer",
                              size_is="sigma", p=1.0)                # sclera's specular highlights
    res = blob(image=np.zeros((40, 40, 3), np.uint8), mask=np.zeros((40, 40), np.uint8))
    assert res["image"].max() > 200 and res["mask"].max() == 0


def test_image_resize_methods_are_pil_bilinear_and_cv2_linear(ssbc_root):
    """data.image_resize: PIL's antialiased bilinear (default) or the deck's cv2.resize INTER_LINEAR, pixel for
    pixel; the mask stays nearest neighbour either way."""
    import cv2
    items = evaluation_items(data_cfg(), ssbc_root, with_masks=True)
    decoded = np.asarray(Image.open(items[0].image).convert("RGB"))
    pil = ScleraDataset(items, (56, 70))[0]
    opencv = ScleraDataset(items, (56, 70), image_resize="cv2_linear")[0]
    want_pil = np.asarray(Image.fromarray(decoded).resize((70, 56), Image.BILINEAR))
    want_cv2 = cv2.resize(decoded, (70, 56), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal((pil["image"] * 255).round().byte().permute(1, 2, 0).numpy(), want_pil)
    np.testing.assert_array_equal((opencv["image"] * 255).round().byte().permute(1, 2, 0).numpy(), want_cv2)
    assert np.abs(want_pil.astype(int) - want_cv2).max() > 0          # shrinking 400x300: the two differ
    torch.testing.assert_close(pil["mask"], opencv["mask"])
    with pytest.raises(ValueError, match="data.image_resize='area'"):
        ScleraDataset(items, (56, 70), image_resize="area")
