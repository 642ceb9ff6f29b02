"""biomass: output parameterisations, heads, model outputs and the masked loss terms."""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from biomass.heads import DensityMLP, PooledMLP, ViTDetHead
from biomass.heads_dense import DPTHead, FPNHead
from biomass.heads_pool import GatedAttentionMIL, LayerFusion
from biomass.loss import BiomassCriterion
from biomass.model import BiomassModel
from biomass.param import Direct, TotalRatio, get_param
from common.models.backbone import BackboneOutput, create_backbone

STATS = {"quadrat_area": 0.21, "targets": [], "gm2_mean": [150.0, 50.0, 25.0, 175.0, 225.0],
         "gm2_std": [100.0, 40.0, 30.0, 110.0, 120.0], "log1p_mean": [3.0] * 5, "log1p_std": [1.0] * 5,
         "total_gm2_mean": 225.0, "height_mean": 10.0, "height_std": 5.0, "ndvi_mean": 0.5,
         "ndvi_std": 0.2, "states": ["NSW", "Tas", "Vic"], "species": ["a"]}


def test_total_ratio_identities_hold_by_construction_and_after_averaging():
    raw = torch.randn(6, 7, 4) * 3
    space = TotalRatio.to_space(raw)
    assert (space >= 0).all()
    torch.testing.assert_close(space.sum(-1), F.softplus(raw[..., 0]))
    for targets in (TotalRatio.to_targets(space), TotalRatio.to_targets(space.mean(1))):
        g, d, c, gdm, total = targets.unbind(-1)
        torch.testing.assert_close(gdm, g + c)
        torch.testing.assert_close(total, g + d + c)


def test_direct_is_non_negative_softplus_and_unknown_name_fails():
    raw = torch.randn(4, 5) * 5
    torch.testing.assert_close(Direct.to_targets(Direct.to_space(raw)), F.softplus(raw))
    assert get_param("direct") is Direct
    with pytest.raises(ValueError, match="total_ratio"):
        get_param("ratio_total")


def _features(batch=2, grid=(4, 8), dim=16, layers=2, cls=True):
    tokens = [torch.randn(batch, grid[0] * grid[1], dim) for _ in range(layers)]
    return BackboneOutput(tokens=tokens, grid=grid, cls=torch.randn(batch, dim) if cls else None)


@pytest.mark.parametrize("head", [
    functools.partial(PooledMLP, hidden=8, dropout=0.0),
    functools.partial(DensityMLP, hidden=8, dropout=0.0),
    functools.partial(ViTDetHead, width=8, hidden=8, dropout=0.0),
    functools.partial(FPNHead, width=8, hidden=8, dropout=0.0, scales=[2.0, 0.5]),
    functools.partial(DPTHead, width=8, hidden=8, dropout=0.0, scales=[4.0, 1.0]),
    functools.partial(GatedAttentionMIL, attn_dim=8, hidden=8, dropout=0.0, tile=2),
    functools.partial(LayerFusion, head=functools.partial(DensityMLP, hidden=8, dropout=0.0)),
])
def test_heads_share_one_interface(head):
    module = head(embed_dim=16, num_layers=2, out_dim=6)
    for cls in (True, False):
        raw, weights = module(_features(cls=cls))
        assert raw.shape[0] == 2 and raw.shape[2] == 6 and weights.shape == raw.shape[:2]
        torch.testing.assert_close(weights.sum(1), torch.ones(2))


def test_vitdet_pyramid_levels_have_the_expected_sizes():
    head = ViTDetHead(embed_dim=16, num_layers=1, out_dim=4, width=8, hidden=8, dropout=0.0)
    raw, weights = head(_features(grid=(4, 8), layers=1))
    assert raw.shape[1] == 8 * 16 + 4 * 8 + 2 * 4 + 1 * 2       # scales 2, 1, 0.5, 0.25
    assert weights[0, 0] == pytest.approx(1 / (4 * 128))         # each level weighs 1/4 in total


def test_dense_heads_need_one_scale_per_layer_and_dpt_predicts_on_the_finest_map():
    with pytest.raises(ValueError, match="one scale per layer"):
        FPNHead(embed_dim=16, num_layers=2, out_dim=4, width=8, hidden=8, dropout=0.0, scales=[2.0])
    head = DPTHead(embed_dim=16, num_layers=2, out_dim=4, width=8, hidden=8, dropout=0.0, scales=[0.5, 2.0])
    raw, _ = head(_features(grid=(4, 8)))
    assert raw.shape[1] == 8 * 16
    fpn = FPNHead(embed_dim=16, num_layers=2, out_dim=4, width=8, hidden=8, dropout=0.0, scales=[2.0, 0.5])
    assert fpn(_features(grid=(4, 8)))[0].shape[1] == 8 * 16 + 2 * 4


def test_attention_mil_is_permutation_invariant_with_normalised_attention():
    torch.manual_seed(0)
    head = GatedAttentionMIL(embed_dim=16, num_layers=1, out_dim=4, attn_dim=8, hidden=8, dropout=0.0).eval()
    feats = _features(layers=1)
    raw, _ = head(feats)
    torch.testing.assert_close(head.last_attention.sum(1), torch.ones(2))
    perm = torch.randperm(32)
    shuffled = BackboneOutput(tokens=[feats.tokens[0][:, perm]], grid=feats.grid, cls=feats.cls)
    torch.testing.assert_close(head(shuffled)[0], raw)


def test_layer_fusion_with_one_hot_logits_is_that_layers_head():
    fusion = LayerFusion(embed_dim=16, num_layers=2, out_dim=4,
                         head=functools.partial(DensityMLP, hidden=8, dropout=0.0))
    with torch.no_grad():
        fusion.logits.copy_(torch.tensor([-50.0, 50.0]))
    feats = _features()
    raw, weights = fusion(feats)
    alone, alone_w = fusion.heads[1](BackboneOutput(tokens=[feats.tokens[1]], grid=feats.grid))
    space = (TotalRatio.to_space(raw) * weights.unsqueeze(-1)).sum(1)
    torch.testing.assert_close(space, (TotalRatio.to_space(alone) * alone_w.unsqueeze(-1)).sum(1))


VIEWS = {"layout": "whole", "heads": 2, "dropout": 0.0}
NO_META = {"mode": "none", "fields": ["State"], "dim": 8, "heads": 2, "field_dropout": 0.0}
NO_MIX = {"prob": 0.0, "alpha": 1.0}
STAGES = {"width": None, "stride": 16}


def _model(param="total_ratio", aux=("height", "ndvi", "state"), views=VIEWS, metadata=NO_META, mixup=NO_MIX,
           head=None, tta=None):
    backbone = create_backbone("timm", "vit_small_patch14_dinov2", None, [1, 3],
                               model_kwargs={"embed_dim": 32, "depth": 4, "num_heads": 2, "img_size": 56})
    head = head or functools.partial(DensityMLP, hidden=16, dropout=0.0)
    return BiomassModel(backbone, head, param, list(aux), STATS, views, metadata, mixup, STAGES, tta=tta)


def test_model_outputs_grams_with_identities():
    model = _model()
    out = model({"image": torch.rand(3, 3, 28, 56)})
    assert out["pred_g"].shape == (3, 5) and out["state_logits"].shape == (3, 3) and out["height"].shape == (3,)
    g, d, c, gdm, total = out["pred_g"].unbind(-1)
    torch.testing.assert_close(gdm, g + c)
    torch.testing.assert_close(total, g + d + c)
    torch.testing.assert_close(out["pred_g"], TotalRatio.to_targets(out["space"]) * 225.0 * 0.21)


def test_model_rejects_unknown_aux():
    with pytest.raises(ValueError, match="unknown auxiliary output.*heigth"):
        _model(aux=("heigth",))


def _criterion(**kw):
    args = dict(stats=STATS, space="norm_gm2", kind="mse", delta=1.0, tweedie_p=1.5,
                weights={"total": 1.0, "ratio": 1.0, "weighted": 1.0, "height": 1.0, "ndvi": 1.0, "state": 1.0},
                balancing="fixed", uw_init_log_var=0.0, uw_divide=False, aux_raw=[])
    return BiomassCriterion(**{**args, **kw})


def _batch():
    true = torch.tensor([[30.0, 10.0, 5.0, 35.0, 45.0], [20.0, float("nan"), 2.0, 22.0, float("nan")]])
    return {"targets_g": true, "target_mask": (~true.isnan()).float(),
            "height": torch.tensor([12.0, float("nan")]), "height_mask": torch.tensor([1.0, 0.0]),
            "ndvi": torch.tensor([0.6, 0.4]), "ndvi_mask": torch.tensor([1.0, 1.0]),
            "state": ["Tas", "Qld"]}


def _outputs(requires_grad=True):
    pred = torch.tensor([[25.0, 12.0, 4.0, 29.0, 41.0], [18.0, 3.0, 1.0, 19.0, 22.0]], requires_grad=requires_grad)
    return {"pred_g": pred, "height": torch.tensor([0.1, 5.0]), "ndvi": torch.tensor([0.3, -0.2]),
            "state_logits": torch.tensor([[0.1, 0.5, -0.2], [1.0, 0.0, 0.0]])}


def test_loss_terms_match_direct_formulas_and_ignore_missing():
    out, batch = _outputs(), _batch()
    terms = _criterion()(out, batch)
    mean, std = torch.tensor(STATS["gm2_mean"]), torch.tensor(STATS["gm2_std"])
    norm = lambda g: (g / 0.21 - mean) / std  # noqa: E731
    p, t = norm(out["pred_g"].detach()), norm(torch.nan_to_num(batch["targets_g"]))
    assert terms["total"].item() == pytest.approx(((p[0, 4] - t[0, 4]) ** 2).item(), rel=1e-5)
    per = [((p[:, j] - t[:, j]) ** 2)[batch["target_mask"][:, j] > 0].mean() for j in range(5)]
    w = torch.tensor([0.1, 0.1, 0.1, 0.2, 0.5])
    assert terms["weighted"].item() == pytest.approx(float(sum(w[j] * per[j] for j in range(5))), rel=1e-5)
    ratio_pred = out["pred_g"].detach()[0, :3] / out["pred_g"].detach()[0, :3].sum()
    ratio_true = torch.tensor([30.0, 10.0, 5.0]) / 45.0
    assert terms["ratio"].item() == pytest.approx(((ratio_pred - ratio_true) ** 2).mean().item(), rel=1e-5)
    assert terms["height"].item() == pytest.approx((0.1 - (12.0 - 10.0) / 5.0) ** 2, rel=1e-5)
    expected_ce = -torch.log_softmax(out["state_logits"][0], -1)[1]          # "Qld" is unknown: masked
    assert terms["state"].item() == pytest.approx(expected_ce.item(), rel=1e-5)
    loss = sum(terms.values())
    loss.backward()
    assert torch.isfinite(out["pred_g"].grad).all()


def test_log1p_space_weights_and_uncertainty_weighting():
    out, batch = _outputs(), _batch()
    terms = _criterion(space="log1p", weights={"total": 2.0})(out, batch)
    assert set(terms) == {"total"}
    expected = 2.0 * (torch.log1p(torch.tensor(41.0)) - torch.log1p(torch.tensor(45.0))) ** 2
    assert terms["total"].item() == pytest.approx(expected.item(), rel=1e-5)
    uw = _criterion(space="log1p", weights={"total": 2.0}, balancing="uw", uw_init_log_var=1.0)
    value = uw(out, batch)["total"]
    assert value.item() == pytest.approx((0.5 * torch.exp(torch.tensor(-1.0)) * expected + 0.5).item(), rel=1e-5)


def test_all_missing_batch_gives_zero_loss_and_bad_config_errors():
    batch = _batch()
    batch["target_mask"] = torch.zeros(2, 5)
    terms = _criterion(weights={"total": 1.0, "weighted": 1.0, "ratio": 1.0})(_outputs(), batch)
    assert all(v.item() == 0.0 for v in terms.values())
    with pytest.raises(ValueError, match="tweedie needs loss.space=grams"):
        _criterion(kind="tweedie")
    with pytest.raises(ValueError, match="unknown term.*totl"):
        _criterion(weights={"totl": 1.0})


def test_tweedie_uses_predicted_grams_as_mean():
    out, batch = _outputs(), _batch()
    value = _criterion(space="grams", kind="tweedie", weights={"total": 1.0})(out, batch)["total"]
    mu, y, p = torch.tensor(41.0), torch.tensor(45.0), 1.5
    expected = -y * mu ** (1 - p) / (1 - p) + mu ** (2 - p) / (2 - p)
    assert value.item() == pytest.approx(expected.item(), rel=1e-4)
