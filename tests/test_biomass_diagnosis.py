"""biomass: the failure diagnosis' techniques as options: early NDVI fusion (2.4.1), MIL over crops through the
backbone (6.1), cross-attention pooling (5.2), each against an independent computation."""
from __future__ import annotations

import functools
import math

import pytest
import torch

from biomass.crops import split_crops
from biomass.early_fusion import WidenedConv, widen_first_conv
from biomass.heads import DensityMLP
from biomass.meta_encoder import MetadataFusion
from biomass.model import BiomassModel
from biomass.synth import write_synthetic
from biomass.task import BiomassTask
from common.models.backbone import BackboneOutput, create_backbone
from tests.test_biomass_data import SMALL
from tests.test_biomass_fusion import _meta_batch
from tests.test_biomass_model import NO_META, NO_MIX, STAGES, STATS, VIEWS
from tests.test_biomass_options import _compose

TINY = {"embed_dim": 32, "depth": 4, "num_heads": 2, "img_size": 56}


def _model(early_ndvi=False, crops=None, seed=0, views=VIEWS):
    torch.manual_seed(seed)
    backbone = create_backbone("timm", "vit_small_patch14_dinov2", None, [1, 3], model_kwargs=TINY)
    head = functools.partial(DensityMLP, hidden=16, dropout=0.0)
    return BiomassModel(backbone, head, "total_ratio", ["height"], STATS, views, NO_META, NO_MIX, STAGES,
                        early_ndvi=early_ndvi, crops=crops).eval()


def _batch(n=2, h=28, w=56):
    return {"image": torch.rand(n, 3, h, w), "ndvi": torch.tensor([0.9, 0.1][:n]), "ndvi_mask": torch.ones(n)}


# ---- early NDVI fusion ---------------------------------------------------------------------------
def test_widened_conv_is_a_four_channel_convolution_with_the_pretrained_rgb_weights():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 4, 4)
    widened = WidenedConv(conv, 1)
    assert torch.equal(widened.extra.weight, torch.zeros(8, 1, 4, 4))
    with torch.no_grad():
        widened.extra.weight.normal_()
    reference = torch.nn.Conv2d(4, 8, 4, 4)
    with torch.no_grad():
        reference.weight.copy_(torch.cat([conv.weight, widened.extra.weight], dim=1))
        reference.bias.copy_(conv.bias)
    x = torch.randn(2, 4, 16, 32)
    torch.testing.assert_close(widened(x), reference(x))


def test_early_ndvi_keeps_the_pretrained_behaviour_at_start_then_reads_ndvi():
    plain, fused = _model(), _model(early_ndvi=True)
    fused.head.load_state_dict(plain.head.state_dict())        # the widened layer drew from the RNG first
    batch = _batch()
    with torch.no_grad():
        torch.testing.assert_close(fused(batch)["pred_g"], plain(batch)["pred_g"])
        fused.backbone.model.patch_embed.proj.extra.weight.normal_()    # (a constant one the LayerNorms remove)
        low, high = (fused({**batch, "ndvi": torch.full((2,), v)})["pred_g"] for v in (0.1, 0.9))
    assert not torch.allclose(low, high)
    assert fused.backbone.model.patch_embed.proj.extra.weight.requires_grad
    convnext = create_backbone("timm", "convnext_tiny", None, [0, 1, 2, 3])
    assert isinstance(widen_first_conv(convnext.model, 1), WidenedConv) and convnext.model.stem[0].in_rgb == 3


def test_early_ndvi_needs_the_ndvi_column_and_drops_ndvi_from_aux(tmp_path):
    write_synthetic(tmp_path, seed=0, cfg=SMALL)
    cfg = _compose(["backbone=tiny", "model.early_ndvi=true"])
    task = BiomassTask(cfg)
    assert list(cfg.model.aux) == ["height", "state"] and cfg.loss.weights.ndvi == 0.0
    assert task.datasets(tmp_path, "fit")["train"][0]["ndvi_mask"] in (0.0, 1.0)
    with pytest.raises(ValueError, match=rf"column Pre_GSHH_NDVI .* {tmp_path / 'test.csv'} has no such column"):
        task.datasets(tmp_path, "predict")                     # the synthetic test.csv, like CSIRO's, has none


# ---- MIL over crops through the backbone ----------------------------------------------------------
def test_split_crops_orders_each_images_crops_row_by_row():
    images = torch.arange(2 * 1 * 4 * 6, dtype=torch.float32).view(2, 1, 4, 6)
    crops = split_crops(images, [2, 3])
    assert crops.shape == (12, 1, 2, 2)
    torch.testing.assert_close(crops[4], images[0, :, 2:4, 2:4])     # image 0, row 1, column 1
    torch.testing.assert_close(crops[6], images[1, :, 0:2, 0:2])


def test_mean_crop_mil_is_the_component_space_mean_of_the_crops_alone():
    crops = {"grid": [1, 2], "pooling": "mean", "attn_dim": 8}
    bag, single = _model(crops=crops), _model()
    batch = _batch(h=28, w=56)
    with torch.no_grad():
        got = bag(batch)["pred_g"]
        alone = [single({"image": batch["image"][..., x:x + 28]})["pred_g"] for x in (0, 28)]
    torch.testing.assert_close(got, 0.5 * (alone[0] + alone[1]))
    torch.testing.assert_close(got[:, 4], got[:, :3].sum(-1))


def test_attention_crop_mil_weights_are_the_gated_attention_over_crop_embeddings():
    model = _model(crops={"grid": [2, 2], "pooling": "attention", "attn_dim": 8})
    batch = _batch(h=56, w=56)
    with torch.no_grad():
        out = model(batch)
        feats = model.encode(batch)
        e = feats.tokens[-1].mean(1).view(2, 4, -1)
        bag = model.crops
        scores = bag.attn_w(torch.tanh(bag.attn_v(e)) * torch.sigmoid(bag.attn_u(e))).squeeze(-1)
    torch.testing.assert_close(bag.last_attention, torch.softmax(scores, dim=1))
    assert out["pred_g"].shape == (2, 5)
    with pytest.raises(ValueError, match="model.views.layout=halves"):
        _model(crops={"grid": [1, 2], "pooling": "mean", "attn_dim": 8}, views={**VIEWS, "layout": "halves"})


# ---- cross-attention pooling ---------------------------------------------------------------------
def test_cross_attention_pooling_replaces_the_tokens_by_the_metadata_weighted_sum():
    torch.manual_seed(0)
    dim = 16
    fusion = MetadataFusion(STATS, "xattn_pool", ["State", "Species"], dim=8, heads=1, embed_dim=dim, num_layers=2,
                            field_dropout=0.0).eval()
    feats = BackboneOutput(tokens=[torch.randn(3, 6, dim), torch.randn(3, 6, dim)], grid=(2, 3), cls=torch.randn(3, dim))
    batch = _meta_batch()
    out = fusion(feats, batch)
    assert out.grid == (1, 1) and out.cls is None and all(t.shape == (3, 1, dim) for t in out.tokens)
    attn = fusion.attn
    wq, wk, wv = attn.in_proj_weight.chunk(3)
    bq, bk, bv = attn.in_proj_bias.chunk(3)
    q = fusion.query(fusion.encoder(batch)) @ wq.T + bq                       # (B, C)
    for layer, tokens in enumerate(feats.tokens):
        kv = fusion.norm(tokens)
        k, v = kv @ wk.T + bk, kv @ wv.T + bv
        a = torch.softmax(torch.einsum("bc,bnc->bn", q, k) / math.sqrt(dim), dim=-1)
        expected = torch.einsum("bn,bnc->bc", a, v) @ attn.out_proj.weight.T + attn.out_proj.bias
        torch.testing.assert_close(out.tokens[layer][:, 0], expected)
    assert len(fusion.project) == 0
