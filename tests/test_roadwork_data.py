"""Roadwork data: NULL-safe metadata, leakage refusal, view geometry, bad-input errors, manifests."""
import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from roadwork.data import RoadworkDataset, check_leakage, metadata_spec
from roadwork.samples import index_samples
from roadwork.sidecar import category_index, is_missing, parse_gps, parse_label, parse_metadata
from roadwork.views import PRESETS, cut_views, resolve_views, tile_boxes, view_box

VOCAB = {"weather": ["clear", "rain"], "daytime": ["day", "night"], "scene": ["urban"]}


@pytest.mark.parametrize("value", [None, "", "null", "NULL", " null ", float("nan")])
def test_missing_spellings_are_unknown(value):
    assert is_missing(value)
    assert category_index(value, ["clear"]) == 0
    assert parse_gps(value, "x") is None


def test_gps_forms_and_ranges():
    assert parse_gps([52.5, 13.4], "f") == (52.5, 13.4)
    assert parse_gps("52.5, 13.4", "f") == (52.5, 13.4)
    assert parse_gps(["null", 13.4], "f") is None
    for bad in ([91.0, 0.0], "0,181", [1.0], "a,b", 7):
        with pytest.raises(ValueError, match="f.json"):
            parse_gps(bad, "f.json")


def test_categories_and_labels():
    assert category_index("Rain", ["clear", "rain"]) == 2
    assert category_index("hail", ["clear", "rain"]) == 0          # unseen -> NULL
    assert parse_label("1", "f", True) == 1 and parse_label(0.0, "f", True) == 0
    assert parse_label(None, "f", required=False) == -1
    with pytest.raises(ValueError, match="outside"):
        parse_label(2, "f.json", True)
    with pytest.raises(ValueError, match="missing"):
        parse_label("null", "f.json", True)
    meta = parse_metadata({"weather": "rain", "gps": "null"}, VOCAB, "f")
    assert meta == {"weather": 2, "daytime": 0, "scene": 0, "gps": (0.0, 0.0), "gps_known": False}


def _data_cfg(**over):
    base = {"metadata": ["gps", "weather", "daytime", "scene"], "leaky_fields": ["scene_description"],
            "allow_leaky_fields": False, "vocabularies": VOCAB}
    return OmegaConf.create({**base, **over})


def test_leaky_field_refused_with_reason_and_overridable():
    with pytest.raises(ValueError, match="presence predicts the label"):
        metadata_spec(_data_cfg(metadata=["gps", "scene_description"]))
    vocab, text = metadata_spec(_data_cfg(metadata=["gps", "scene_description"], allow_leaky_fields=True))
    assert text == ["scene_description"] and set(vocab) == {"weather", "daytime", "scene"}
    check_leakage(["gps", "weather"], ["scene_description"], False)  # no error


def test_tile_geometry():
    boxes = tile_boxes(1200, 900)
    assert len(boxes) == 9
    side = 400                                                      # a third of the width
    assert all(r - l == side and b - t == side for l, t, r, b in boxes)
    xs = sorted({b[0] for b in boxes})
    assert np.allclose(np.diff(xs), 0.75 * side, atol=1)           # 25 % overlap
    assert xs[0] == (1200 - (side + 2 * 300)) // 2                  # grid centred horizontally
    assert all(0 <= l and r <= 1200 and 0 <= t and b <= 900 for l, t, r, b in boxes)
    # too short for 25 % overlap vertically: tiles spread from edge to edge
    ys = sorted({b[1] for b in tile_boxes(1200, 500)})
    assert ys[0] == 0 and ys[-1] == 500 - 400
    assert view_box("center", 1200, 900) == (150, 0, 1050, 900)
    assert view_box("right", 1200, 900) == (300, 0, 1200, 900)
    assert len(resolve_views("highres12")) == 12 and resolve_views("single") == PRESETS["single"]
    with pytest.raises(ValueError, match="unknown view"):
        resolve_views(["global", "tile_33"])


def test_cut_views_uses_lanczos_on_the_box():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8))
    views = cut_views(img, ["tile_11", "center"], 28)
    box = view_box("tile_11", 120, 90)
    expected = np.asarray(img.crop(box).resize((28, 28), Image.LANCZOS))
    assert views[0].shape == (28, 28, 3)
    np.testing.assert_array_equal(views[0], expected)


def _write(folder: Path, stem: str, record, image=True):
    folder.mkdir(parents=True, exist_ok=True)
    if image:
        Image.new("RGB", (56, 42), (200, 100, 0)).save(folder / f"{stem}.jpg")
    if record is not None:
        (folder / f"{stem}.json").write_text(record if isinstance(record, str) else json.dumps(record))


@pytest.mark.parametrize("stem,record,message", [
    ("badjson", "{not json", "not valid JSON"),
    ("badlabel", {"label": 3}, "outside"),
    ("badgps", {"label": 1, "gps": [100, 0]}, "out of range"),
])
def test_bad_sidecars_name_the_file_or_are_skipped(tmp_path, stem, record, message):
    _write(tmp_path, "good", {"label": 0, "weather": "null"})
    _write(tmp_path, stem, record)
    with pytest.raises(ValueError, match=message) as err:
        index_samples(tmp_path, VOCAB, [], True, skip_bad=False)
    assert stem in str(err.value)
    index = index_samples(tmp_path, VOCAB, [], True, skip_bad=True)
    assert [s.name for s in index.samples] == ["good.jpg"] and len(index.skipped) == 1


def test_undecodable_image(tmp_path):
    _write(tmp_path, "good", {"label": 1})
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp_path / "broken.json").write_text('{"label": 0}')
    with pytest.raises(ValueError, match="broken.jpg.*cannot decode"):
        index_samples(tmp_path, VOCAB, [], True, skip_bad=False)
    assert len(index_samples(tmp_path, VOCAB, [], True, skip_bad=True).skipped) == 1


def test_missing_sidecar_fine_at_predict_not_at_train(tmp_path):
    _write(tmp_path, "nolabel", None)
    with pytest.raises(FileNotFoundError, match="nolabel"):
        index_samples(tmp_path, VOCAB, [], True, skip_bad=False)
    sample = index_samples(tmp_path, VOCAB, [], False, skip_bad=False).samples[0]
    assert sample.label == -1 and sample.meta["gps_known"] is False


def test_manifest_and_dataset_item(tmp_path):
    _write(tmp_path / "img", "a", None)
    _write(tmp_path / "img", "b", None)
    (tmp_path / "m.csv").write_text("image_path,label,gps,weather\nimg/a.jpg,1,\"52.5,13.4\",rain\nimg/b.jpg,0,,null\n")
    samples = index_samples(tmp_path / "m.csv", VOCAB, [], True, False).samples
    assert [s.label for s in samples] == [1, 0]
    assert samples[0].meta["gps"] == (52.5, 13.4) and samples[1].meta["weather"] == 0
    (tmp_path / "bad.csv").write_text("image_path,label\nimg/a.jpg,5\n")
    with pytest.raises(ValueError, match="bad.csv row 2"):
        index_samples(tmp_path / "bad.csv", VOCAB, [], True, False)
    item = RoadworkDataset(samples, "highres12", 28)[0]
    assert item["views"].shape == (12, 3, 28, 28) and 0.0 <= float(item["views"].min())
    assert float(item["views"].max()) <= 1.0 and item["weather"] == 2 and item["gps_known"] == 1.0


def test_predict_ignores_malformed_fields_it_does_not_use(tmp_path):
    _write(tmp_path, "a", {"label": "maybe", "gps": "north", "weather": "rain"})
    _write(tmp_path, "b", {"label": 1, "gps": [1, 2]})
    with pytest.raises(ValueError, match="a.json.*gps"):                 # gps is a model input: still an error
        index_samples(tmp_path, VOCAB, [], False, skip_bad=False, gps_used=True)
    index = index_samples(tmp_path, VOCAB, [], False, skip_bad=False, gps_used=False)
    assert [s.label for s in index.samples] == [-1, 1]
    assert index.samples[0].meta["gps_known"] is False and index.samples[0].meta["weather"] == 2
    assert sorted(index.ignored) == ["gps", "label"] and "maybe" in index.ignored["label"][0]
    with pytest.raises(ValueError, match="maybe"):                     # training needs the label
        index_samples(tmp_path, VOCAB, [], True, skip_bad=False, gps_used=False)


def test_orphan_sidecars_and_unseen_values_are_counted_and_logged(tmp_path, caplog):
    from roadwork.data import load_index
    _write(tmp_path / "split", "a", {"label": 1, "weather": "Sunny", "scene": "rural"})
    _write(tmp_path / "split", "b", {"label": 0, "weather": "sunny"})
    _write(tmp_path / "split", "ghost", {"label": 0}, image=False)
    _write(tmp_path / "split" / "sub", "lost", {"label": 1}, image=False)
    cfg = OmegaConf.create({"metadata": ["weather"], "leaky_fields": [], "allow_leaky_fields": False,
                            "vocabularies": VOCAB, "skip_bad": False})
    with caplog.at_level("WARNING"):
        index = load_index(tmp_path, "split", cfg, require_label=True)
    assert index.orphans == ["ghost.json", "sub/lost.json"]
    assert dict(index.unseen["weather"]) == {"Sunny": 1, "sunny": 1} and dict(index.unseen["scene"]) == {"rural": 1}
    warnings = [r.getMessage() for r in caplog.records]
    assert sum("sidecars without an image" in w and "sub/lost.json" in w for w in warnings) == 1
    assert sum("2 weather values outside" in w for w in warnings) == 1          # once per field
    assert [s.meta["weather"] for s in index.samples] == [0, 0]
