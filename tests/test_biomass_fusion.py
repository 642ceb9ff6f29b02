"""biomass: left/right halves with cross-view attention, metadata fusion, constraint-aware mixup."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from biomass.meta_encoder import MetadataFusion
from biomass.mixing import mix_grams, mix_labels
from biomass.task import BiomassTask
from biomass.view_fusion import side_by_side
from common.models.backbone import BackboneOutput
from common.training.mixup import MixPlan
from tests.test_biomass_model import NO_META, STATS, VIEWS, _batch, _criterion, _model

HALVES = {**VIEWS, "layout": "halves"}


def test_side_by_side_rebuilds_the_whole_grid_order():
    side = 3
    whole = torch.arange(side * 2 * side).view(1, side, 2 * side, 1).float()     # value = row-major index
    left = whole[:, :, :side].reshape(1, side * side, 1)
    right = whole[:, :, side:].reshape(1, side * side, 1)
    torch.testing.assert_close(side_by_side(left, right, side), whole.reshape(1, -1, 1))


def test_halves_view_with_closed_gate_is_the_backbone_on_each_half():
    model = _model(views=HALVES).eval()
    images = torch.rand(2, 3, 28, 56)
    feats = model.encode({"image": images})
    assert feats.grid == (2, 4) and feats.tokens[0].shape == (2, 8, 32)
    left, right = model.backbone(images[..., :28]), model.backbone(images[..., 28:])
    torch.testing.assert_close(feats.tokens[1], side_by_side(left.tokens[1], right.tokens[1], 2))
    torch.testing.assert_close(feats.cls, 0.5 * (left.cls + right.cls))
    with torch.no_grad():
        for cross in model.halves.cross:
            cross.gate.fill_(1.0)
    assert not torch.allclose(model.encode({"image": images}).tokens[1], feats.tokens[1])
    with pytest.raises(ValueError, match="twice as wide as high"):
        model({"image": torch.rand(1, 3, 28, 28)})


def _meta_batch():
    return {"state": ["Tas", "Vic", "??"], "species": ["a", "", "a"], "ndvi": torch.tensor([0.4, float("nan"), 0.9]),
            "ndvi_mask": torch.tensor([1.0, 0.0, 1.0])}


@pytest.mark.parametrize("mode", ["film", "xattn"])
def test_metadata_fusion_starts_as_identity_and_then_conditions(mode):
    torch.manual_seed(0)
    fusion = MetadataFusion(STATS, mode, ["State", "Species", "Pre_GSHH_NDVI"], dim=8, heads=2,
                            embed_dim=16, num_layers=2, field_dropout=0.0)
    feats = BackboneOutput(tokens=[torch.randn(3, 6, 16), torch.randn(3, 6, 16)], grid=(2, 3))
    out = fusion(feats, _meta_batch())
    for a, b in zip(out.tokens, feats.tokens):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        for p in fusion.project:
            p.weight.normal_()
    out = fusion(feats, _meta_batch())
    diff = (out.tokens[0] - feats.tokens[0]).abs().mean(dim=(1, 2))
    assert (diff > 1e-3).all() and torch.isfinite(out.tokens[0]).all()
    other = {**_meta_batch(), "state": ["Vic", "Vic", "??"]}
    assert not torch.allclose(fusion(feats, other).tokens[0][0], out.tokens[0][0])


def test_metadata_config_errors():
    with pytest.raises(ValueError, match="must not be fed to the model"):
        _model(aux=("ndvi",), metadata={**NO_META, "mode": "film", "fields": ["Pre_GSHH_NDVI"]})
    with pytest.raises(ValueError, match="non-empty subset"):
        _model(metadata={**NO_META, "mode": "film", "fields": ["Colour"]})
    with pytest.raises(ValueError, match="expected one of"):
        _model(metadata={**NO_META, "mode": "concat"})


def test_metadata_fusion_needing_columns_absent_from_test_csv_fails_at_start(tmp_path):
    pd.DataFrame({"sample_id": ["ID1__Dry_Green_g"], "image_path": ["test/ID1.jpg"],
                  "target_name": ["Dry_Green_g"]}).to_csv(tmp_path / "test.csv", index=False)
    cfg = OmegaConf.create({"task": {"name": "biomass"},
                            "data": {"test_csv": "test.csv", "train_csv": "train.csv"},
                            "model": {"metadata": {"mode": "film", "fields": ["State", "Species"],
                                                   "field_dropout": 0.0}}})
    with pytest.raises(ValueError, match=r"test.csv lacks \['State', 'Species'\]"):
        BiomassTask(cfg).datasets(tmp_path, "fit")


def test_mix_grams_keeps_identities_and_masks_missing():
    a = torch.tensor([[10.0, 4.0, 2.0, 12.0, 16.0], [8.0, float("nan"), 1.0, 9.0, float("nan")]])
    b = torch.tensor([[2.0, 6.0, 0.0, 2.0, 8.0], [1.0, 1.0, 1.0, 2.0, 3.0]])
    mixed = mix_grams(a, b, 0.25)
    torch.testing.assert_close(mixed[0], 0.25 * a[0] + 0.75 * b[0])
    assert mixed[0, 3] == mixed[0, 0] + mixed[0, 2] and mixed[0, 4] == mixed[0, :3].sum()
    assert math.isnan(mixed[1, 1]) and math.isnan(mixed[1, 4])
    assert mixed[1, 3] == pytest.approx(0.25 * 9.0 + 0.75 * 2.0)


def test_mix_labels_ands_masks_and_mixes_states_softly():
    batch = _batch()
    plan = MixPlan(lam=0.7, perm=torch.tensor([1, 0]))
    mixed = mix_labels(batch, plan, STATS["states"])
    torch.testing.assert_close(mixed["mixed/target_mask"], batch["target_mask"] * batch["target_mask"][[1, 0]])
    assert mixed["mixed/height_mask"].tolist() == [0.0, 0.0]
    assert mixed["mixed/state_mask"].tolist() == [0.0, 0.0]          # "Qld" is unknown
    ratios = mixed["mixed/targets_g"][0, :3] / mixed["mixed/targets_g"][0, :3].sum()
    assert torch.isnan(ratios).any()                                  # dead is missing in sample 1


def test_model_mixup_in_training_only_and_criterion_uses_mixed_labels():
    torch.manual_seed(0)
    model = _model(mixup={"prob": 1.0, "alpha": 2.0})
    batch = {"image": torch.rand(2, 3, 28, 56), **_batch(), "state": ["Tas", "Vic"]}
    out = model.train()(batch)
    assert "mixed/targets_g" in out and out["mixed/state_soft"].sum(-1).tolist() == pytest.approx([1.0, 1.0])
    crit = _criterion(weights={"total": 1.0, "state": 1.0})
    plain = crit({k: v for k, v in out.items() if not k.startswith("mixed/")}, batch)
    mixed = crit(out, batch)
    assert mixed["total"].item() == 0.0                       # sample 2's total is missing: AND -> none left
    assert plain["total"].item() > 0.0
    assert "mixed/targets_g" not in model.eval()(batch)


def test_every_model_option_builds_and_runs():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from common.models.encoder import build_encoder
    conf = Path(__file__).resolve().parents[1] / "conf"
    for option in ("density", "pooled", "vitdet", "fpn", "dpt", "mil", "fusion"):
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg = compose("config", overrides=["task=biomass", f"model/biomass={option}"])
        model = instantiate(cfg.model, backbone=build_encoder(cfg), stats=STATS)
        out = model.eval()({"image": torch.rand(1, 3, 28, 56)})
        assert out["pred_g"].shape == (1, 5) and (out["pred_g"] >= 0).all(), option
