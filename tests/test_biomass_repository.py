"""biomass: the behaviours of the CSIRO write-up's repository that the preset turns on, each against an independent
computation: channel LayerNorm, two 2x2 max-pools, dropout before the Linear and after SiLU, height / state read
from the layer-fused z, raw-cm height, the overlays."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from biomass.heads import LayerNorm2d, vitdet_pyramid
from biomass.heads_pool import LayerFusion
from biomass.heads_vitdet import ViTDetScalarHead
from biomass.model import BiomassModel
from biomass.overlays import LightSpot, TextWatermark
from common.models.backbone import BackboneOutput, create_backbone
from tests.test_biomass_model import NO_MIX, NO_META, STAGES, STATS, VIEWS, _criterion


def test_channel_layer_norm_is_layer_norm_over_the_channel_dim():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 7) * 3 + 1
    norm = LayerNorm2d(6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(6))
        norm.bias.copy_(torch.randn(6))
    expected = F.layer_norm(x.permute(0, 2, 3, 1), (6,), norm.weight, norm.bias, eps=1e-6).permute(0, 3, 1, 2)
    torch.testing.assert_close(norm(x), expected)
    assert not torch.allclose(torch.nn.GroupNorm(1, 6, eps=1e-6)(x), F.layer_norm(
        x.permute(0, 2, 3, 1), (6,), eps=1e-6).permute(0, 3, 1, 2))      # the old "ln" (one group) differs


@pytest.mark.parametrize("downsample, expected", [("pairs", [(15, 30), (7, 15)]), ("ceil", [(15, 30), (8, 15)])])
def test_pyramid_downsampling_sizes(downsample, expected):
    levels = vitdet_pyramid(8, 4, [0.5, 0.25], "ln", downsample)
    fmap = torch.randn(1, 8, 30, 60)
    assert [tuple(level(fmap).shape[-2:]) for level in levels] == expected
    if downsample == "pairs":      # two 2x2 max-pools = the max over each 4x4 block of the first 28x60
        torch.testing.assert_close(levels[1][0](fmap), fmap[..., :28, :60].unfold(2, 4, 4).unfold(3, 4, 4).amax((-2, -1)))


def test_pairs_downsampling_refuses_a_grid_too_small():
    head = ViTDetScalarHead(embed_dim=8, num_layers=1, out_dim=4, width=4, bottleneck=8, dropout=0.0, downsample="pairs")
    with pytest.raises(ValueError, match="2x4 token grid is too small for scale 0.25"):
        head(BackboneOutput(tokens=[torch.randn(1, 8, 8)], grid=(2, 4)))


def test_dropout_before_the_linear_and_after_silu():
    torch.manual_seed(0)
    head = ViTDetScalarHead(embed_dim=8, num_layers=1, out_dim=4, width=4, bottleneck=16, dropout=0.4,
                            input_dropout=0.4).train()
    feats = BackboneOutput(tokens=[torch.randn(2, 32, 8)], grid=(4, 8))
    descriptor = head.descriptor(feats)
    linear = head.bottleneck[1]
    torch.manual_seed(7)
    z = head.z(feats)
    torch.manual_seed(7)
    expected = F.dropout(F.silu(linear(F.dropout(descriptor, 0.4, True))), 0.4, True)
    torch.testing.assert_close(z, expected)
    head.eval()
    torch.testing.assert_close(head.z(feats), F.silu(linear(descriptor)))


def test_fused_z_outputs_are_one_linear_map_of_the_layer_fused_bottleneck():
    torch.manual_seed(0)
    backbone = create_backbone("timm", "vit_small_patch14_dinov2", None, [1, 2, 3],
                               model_kwargs={"embed_dim": 32, "depth": 4, "num_heads": 2, "img_size": 56})
    head = functools.partial(LayerFusion, fused_z=["height", "state"], head=functools.partial(
        ViTDetScalarHead, width=8, bottleneck=16, dropout=0.0))
    model = BiomassModel(backbone, head, "total_ratio", ["height", "ndvi", "state"], STATS, VIEWS, NO_META, NO_MIX,
                         STAGES).eval()
    with torch.no_grad():
        model.head.logits.copy_(torch.tensor([0.3, -0.2, 1.0]))
        batch = {"image": torch.rand(2, 3, 56, 112)}
        out = model(batch)
        feats = model.encode(batch)
        w = torch.softmax(model.head.logits, 0)
        zs = [h.z(BackboneOutput(tokens=[t], grid=feats.grid)) for h, t in zip(model.head.heads, feats.tokens)]
        fused = model.head.shared(sum(wi * z for wi, z in zip(w, zs)))
        cols = model.columns()
        torch.testing.assert_close(out["height"], fused[:, cols["height"][0]])
        torch.testing.assert_close(out["state_logits"], fused[:, cols["state"][0]:cols["state"][1]])
        ndvi = sum(wi * h.out(z)[:, cols["ndvi"][0]] for wi, h, z in zip(w, model.head.heads, zs))
        torch.testing.assert_close(out["ndvi"], ndvi)                  # NDVI stays per layer, fused as outputs
    with pytest.raises(ValueError, match="needs a head with a bottleneck"):
        LayerFusion(embed_dim=8, num_layers=2, out_dim=4, fused_z=["height"],
                    head=functools.partial(torch.nn.Identity))


def test_raw_height_is_supervised_in_centimetres():
    batch = {"targets_g": torch.rand(3, 5) * 40, "target_mask": torch.ones(3, 5), "state": ["Tas", "Vic", "NSW"],
             "height": torch.tensor([4.0, 12.0, 30.0]), "height_mask": torch.ones(3),
             "ndvi": torch.rand(3), "ndvi_mask": torch.ones(3)}
    outputs = {"pred_g": torch.rand(3, 5) * 40, "height": torch.tensor([5.0, 10.0, 33.0]), "ndvi": torch.rand(3),
               "state_logits": torch.randn(3, 3)}
    raw = _criterion(aux_raw=["height"])(outputs, batch)["height"]
    assert raw.item() == pytest.approx(np.mean([1.0, 4.0, 9.0]))
    z = _criterion()(outputs, batch)["height"]
    target = (batch["height"] - STATS["height_mean"]) / STATS["height_std"]
    assert z.item() == pytest.approx(F.mse_loss(outputs["height"], target).item())
    with pytest.raises(ValueError, match="aux_raw"):
        _criterion(aux_raw=["state"])


WATERMARK = dict(timestamp_prob=0.0, timestamp_format="%d %m %Y %H:%M", text_length=[3, 20], font_size=[0.1, 0.1],
                 min_font_px=12, alpha=[160, 160], colours=[[255, 255, 255]], colour_jitter=0,
                 positions=["bottom_right"], position_probs=[1.0], margin=[0.05, 0.05], shadow_alpha=[255, 255],
                 shadow_offset=[0.05, 0.05], p=1.0)


def test_watermark_blends_its_colour_at_alpha_in_the_chosen_corner():
    img = np.full((100, 200, 3), 40, np.uint8)
    mark = TextWatermark(**WATERMARK)
    mark.set_random_seed(0)
    out = mark(image=img)["image"]
    changed = np.argwhere((out != 40).any(-1))
    # bottom right, the text's box ending a margin of 0.05 x 100 px from both edges (the shadow 1 px further)
    assert changed[:, 0].min() > 50 and 100 - 5 - 3 <= changed[:, 0].max() <= 100 - 5 + 1
    assert 200 - 5 - 3 <= changed[:, 1].max() <= 200 - 5 + 1
    # a fully covered glyph pixel: 40 + (255 - 40) * 160 / 255 (PIL's rounding: within 1)
    assert abs(int(out.max()) - (40 + (255 - 40) * 160 / 255)) <= 1
    params = mark.get_params_dependent_on_data({"shape": img.shape}, {})
    assert params["size"] == 12 and 3 <= len(params["text"]) <= 20     # max(12, 0.1 x 100)
    stamped = TextWatermark(**{**WATERMARK, "timestamp_prob": 1.0})
    stamped.set_random_seed(1)
    text = stamped.get_params_dependent_on_data({"shape": img.shape}, {})["text"]
    assert len(text.split()) == 4 and 2010 <= int(text.split()[2]) <= 2030


def test_light_spot_without_blur_is_a_disc_blended_towards_its_colour():
    spot = LightSpot(radius=[0.1, 0.1], alpha=[0.5, 0.5], colour=[255, 255, 220], blur_frac=0.0, p=1.0)
    img = np.full((100, 200, 3), 100, np.uint8)
    out = spot.apply(img, r=10, cx=50, cy=40, mask_value=int(255 * 0.5))
    m = 127 / 255
    np.testing.assert_array_equal(out[40, 50], np.round(100 * (1 - m) + np.array([255, 255, 220]) * m))
    assert (out[40, 50 + 9] == out[40, 50]).all() and (out[40, 50 + 12] == 100).all() and (out[0, 0] == 100).all()
    blurred = LightSpot(radius=[0.1, 0.1], alpha=[0.5, 0.5], colour=[255, 255, 220], blur_frac=0.5, p=1.0)
    masks = [s.mask(100, 200, 10, 100, 50, 127) for s in (spot, blurred)]
    assert masks[1].sum() == pytest.approx(masks[0].sum(), rel=0.02)     # a blur moves the light, keeps its amount
    params = LightSpot(radius=[0.06, 0.18], alpha=[0.2, 0.6], colour=[255, 255, 220], blur_frac=0.5)
    params.set_random_seed(3)
    drawn = [params.get_params_dependent_on_data({"shape": (480, 960, 3)}, {}) for _ in range(200)]
    radii = [d["r"] for d in drawn]
    assert int(480 * 0.06) <= min(radii) and max(radii) <= int(480 * 0.18)   # of the shorter side
    assert all(int(255 * 0.2) <= d["mask_value"] <= int(255 * 0.6) for d in drawn)
