"""biomass inference: head-only MC dropout, the per-member prediction cache, tiled inference, metadata
field dropout (a test table without metadata still predicts)."""
from __future__ import annotations

import functools
import logging

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from biomass.ensemble import BiomassEnsemble, predict_tta
from biomass.heads import DensityMLP
from biomass.task import BiomassTask
from biomass.tta import ViewTTA, tiles_of, tta_views
from tests.test_biomass_fusion import _meta_batch
from tests.test_biomass_model import NO_META, STATS, _model


class CountingBackbone(torch.nn.Module):
    """Wraps a backbone and counts its forward calls (the expensive part the head-only MC must not rerun)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0
        self.patch_size, self.embed_dim, self.layers = inner.patch_size, inner.embed_dim, inner.layers

    def forward(self, images):
        self.calls += 1
        return self.inner(images)


def _member(seed, dropout=0.3):
    torch.manual_seed(seed)
    model = _model(head=functools.partial(DensityMLP, hidden=16, dropout=dropout)).eval()
    model.backbone = CountingBackbone(model.backbone)
    return model


def _ensemble(members, hflip=True, **kw):
    """inference.tta's views (hflip) around inference.ensemble, as common.inference.predictor builds them."""
    ensemble = BiomassEnsemble(members, **{"mc_passes": 8, "mc_eps": 1e-6, **kw})
    return ViewTTA(hflip=hflip)(ensemble.eval())


def test_mc_dropout_runs_the_backbone_once_per_image_and_view():
    members = [_member(0), _member(1)]
    batch = {"image": torch.rand(2, 3, 28, 56)}
    out = _ensemble(members)(batch)
    assert [m.backbone.calls for m in members] == [2, 2]           # 2 views each, not 2 x (1 + 8 passes)
    assert out["pred_g"].shape == (2, 5) and torch.isfinite(out["member_weights"]).all()
    # the weights are inverse variances of the head's passes: members with different variances differ
    assert not torch.allclose(out["member_weights"], torch.full((2, 2), 0.5))


def test_head_only_mc_equals_rerunning_the_model_with_head_dropout():
    member = _member(0)
    batch = {"image": torch.rand(2, 3, 28, 56)}
    torch.manual_seed(3)
    out = _ensemble([member], hflip=False, mc_passes=5)(batch)
    torch.manual_seed(3)
    drops = [m for m in member.head.modules() if isinstance(m, torch.nn.Dropout)]
    for d in drops:
        d.train()
    totals = torch.stack([member(batch)["pred_g"][:, -1] for _ in range(5)])   # full model per pass
    for d in drops:
        d.eval()
    with torch.no_grad():
        plain = member(batch)["pred_g"]
    torch.testing.assert_close(out["pred_g"], plain)
    ens = _ensemble([member, member], hflip=False, mc_passes=5)
    torch.manual_seed(3)
    var0 = ens._member(0, batch, ViewTTA())[1]
    torch.testing.assert_close(var0, totals.var(dim=0, unbiased=True))


def test_member_predictions_are_cached_on_disk_by_checkpoint_and_input(tmp_path):
    members = [_member(0), _member(1)]
    batch = {"image": torch.rand(2, 3, 28, 56), "image_id": ["a", "b"]}
    first = _ensemble(members, cache_dir=tmp_path)(batch)
    assert len(list(tmp_path.glob("*/*.pt"))) == 2
    for m in members:
        m.backbone.calls = 0
    again = _ensemble(members, cache_dir=tmp_path)(batch)            # a new ensemble of the same members
    assert [m.backbone.calls for m in members] == [0, 0]
    torch.testing.assert_close(again["pred_g"], first["pred_g"])
    _ensemble(members, cache_dir=tmp_path)({**batch, "image": torch.rand(2, 3, 28, 56)})   # other pixels
    assert [m.backbone.calls for m in members] == [2, 2]
    members[1].checkpoint_id = "/runs/fold_1/last.pt:123:456"        # another checkpoint: recomputed
    _ensemble(members, cache_dir=tmp_path)(batch)
    assert [m.backbone.calls for m in members] == [2, 4]


TILES = {"grid": [2, 2], "scale": 2.0, "centre": True}


def test_tiles_are_the_corners_and_centre_of_the_high_resolution_image_and_average_in_component_space():
    hires = torch.arange(2 * 3 * 56 * 112, dtype=torch.float32).view(2, 3, 56, 112)
    tiles = tiles_of(hires, (28, 56), [2, 2], centre=True)
    assert [t.shape[-2:] for t in tiles] == [(28, 56)] * 5
    torch.testing.assert_close(tiles[0], hires[..., :28, :56])
    torch.testing.assert_close(tiles[3], hires[..., 28:, 56:])
    torch.testing.assert_close(tiles[4], hires[..., 14:42, 28:84])
    assert [t.shape[-2:] for t in tiles_of(hires, (28, 56), [1, 3], centre=False)] == [(28, 56)] * 3
    model = _member(0, dropout=0.0)
    batch = {"image": torch.rand(2, 3, 28, 56), "image_hires": torch.rand(2, 3, 56, 112)}
    with torch.no_grad():
        views = tta_views(batch["image"], True, False, [], 14, tiles=TILES, hires=batch["image_hires"])
        assert len(views) == 10 and all(not torch.equal(v, batch["image"]) for v in views)  # tiles replace the image
        expected = torch.stack([model({"image": v})["pred_g"] for v in views]).mean(0)
        got = predict_tta(model, batch, True, False, [], tiles=TILES)
    torch.testing.assert_close(got, expected)
    g, d, c, gdm, total = got.unbind(-1)
    torch.testing.assert_close(total, g + d + c)
    with pytest.raises(ValueError, match="image_hires"):
        predict_tta(model, {"image": batch["image"]}, False, False, [], tiles=TILES)


@pytest.mark.parametrize("tiles, message", [
    (0.6, "expected null or"), ({"grid": [2], "scale": 2.0, "centre": True}, "tiles.grid"),
    ({"grid": [2, 2], "scale": 0.5, "centre": True}, "tiles.scale"),
    ({"grid": [2, 2], "scale": 2.0, "centre": "yes"}, "tiles.centre")])
def test_bad_tiles_are_named(tiles, message):
    with pytest.raises(ValueError, match=message):
        ViewTTA(tiles=tiles)
    with pytest.raises(ValueError, match="set one of them"):
        ViewTTA(scales=[1.25], tiles=TILES)


def test_a_tile_sees_pixels_the_resized_image_lost(tmp_path):
    """A one-pixel checkerboard: resized 4x down (area) it is flat grey; a tile of the original at scale 4 keeps it."""
    from PIL import Image
    from biomass.data import BiomassDataset
    board = ((np.indices((128, 256)).sum(0) % 2) * 255).astype(np.uint8)
    Image.fromarray(np.stack([board] * 3, -1)).save(tmp_path / "board.png")
    table = pd.DataFrame({"image_path": ["board.png"], "image_id": ["board"]})
    item = BiomassDataset(table, tmp_path, None, image_size=(32, 64), hires_scale=4.0)[0]
    assert item["image"].std() < 0.01                                   # the resized image lost the texture
    batch = {"image": item["image"][None], "image_hires": item["image_hires"][None]}
    tiles = ViewTTA(tiles={"grid": [2, 2], "scale": 4.0, "centre": True}).views(batch, patch=16)
    assert all(t.shape[-2:] == (32, 64) for t in tiles)
    assert all(t.std() > 0.45 for t in tiles)                           # every tile still has it
    torch.testing.assert_close(tiles[3][0, 0], torch.tensor(board[96:, 192:] / 255.0, dtype=torch.float32))


def test_metadata_field_dropout_hides_fields_in_training_only():
    meta = {**NO_META, "mode": "film", "fields": ["State", "Pre_GSHH_NDVI"], "field_dropout": 0.5}
    torch.manual_seed(0)
    model = _model(aux=("height",), metadata=meta)
    encoder = model.metadata.encoder
    batch = {**_meta_batch(), "state": ["Tas", "Vic", "NSW"] * 20, "species": [""] * 60,
             "ndvi": torch.rand(60), "ndvi_mask": torch.ones(60)}
    unknown = {"state": [""] * 60, "species": [""] * 60, "ndvi": torch.full((60,), float("nan")),
               "ndvi_mask": torch.zeros(60)}
    encoder.train()
    torch.manual_seed(1)
    hidden = torch.isclose(encoder(batch), encoder.eval()(unknown)).all(-1)
    assert 0.1 < hidden.float().mean() < 0.5                # both fields hidden together: p^2 = 0.25
    encoder.eval()
    assert not torch.isclose(encoder(batch), encoder(unknown)).all(-1).any()
    with pytest.raises(ValueError, match="field_dropout"):
        _model(aux=("height",), metadata={**meta, "field_dropout": 1.0})


def test_test_table_without_metadata_is_accepted_with_field_dropout(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    pd.DataFrame({"sample_id": ["ID1__Dry_Green_g"], "image_path": ["test/ID1.jpg"],
                  "target_name": ["Dry_Green_g"]}).to_csv(tmp_path / "test.csv", index=False)
    meta = {"mode": "xattn", "fields": ["State", "Species"], "field_dropout": 0.3}
    task = BiomassTask(OmegaConf.create({"task": {"name": "biomass"}, "model": {"metadata": meta},
                                         "data": {"test_csv": "test.csv"}}))
    task.check_metadata_columns(tmp_path)
    assert "treat them as unknown" in caplog.text
    model = _model(aux=("height",), metadata={**NO_META, **meta}).eval()
    with torch.no_grad():
        out = model({"image": torch.rand(2, 3, 28, 56), "state": ["", ""], "species": ["", ""]})
    assert torch.isfinite(out["pred_g"]).all()


def test_validation_and_predict_sets_carry_the_high_resolution_image_when_tiles_are_set(tmp_path):
    from hydra import compose, initialize_config_dir
    from biomass.synth import write_synthetic
    from tests.test_biomass_data import SMALL
    from tests.test_biomass_options import CONF
    write_synthetic(tmp_path, seed=0, cfg=SMALL)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["task=biomass", "data.image_size=[28,56]",
                                           "inference.tta.tiles={grid: [2, 2], scale: 2.0, centre: true}"])
    sets = BiomassTask(cfg).datasets(tmp_path, "fit")
    assert sets["val"][0]["image_hires"].shape == (3, 56, 112) and "image_hires" not in sets["train"][0]
    assert BiomassTask(cfg).datasets(tmp_path, "predict")["predict"][0]["image_hires"].shape == (3, 56, 112)
