"""Roadwork model: gated attention vs a hand computation, fusion pooling, metadata NULLs, pruning."""
import math

import numpy as np
import pytest
import torch

from common.models.backbone import create_backbone
from roadwork.blocks import GatedAttention
from roadwork.meta_encoder import MetadataEncoder, gps_features
from roadwork.model import RoadworkModel
from roadwork.view_fusion import GatedViewFusion
from roadwork.views import resolve_views


def test_gated_attention_matches_hand_computation():
    torch.manual_seed(0)
    attn = GatedAttention(dim=8, num_heads=2).eval()
    x = torch.randn(2, 5, 8)
    key_mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    wq, wk, wv = attn.qkv.weight.split(8)
    bq, bk, bv = attn.qkv.bias.split(8)
    q, k, v = x @ wq.T + bq, x @ wk.T + bk, x @ wv.T + bv
    gate = torch.sigmoid(x @ attn.gate.weight.T + attn.gate.bias)
    heads = []
    for h in range(2):
        sl = slice(4 * h, 4 * h + 4)
        scores = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(4)
        scores = scores.masked_fill(~key_mask[:, None, :], float("-inf"))
        heads.append((scores.softmax(-1) @ v[..., sl]) * gate[..., sl])
    expected = torch.cat(heads, -1) @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(attn(x, key_mask), expected, atol=1e-5, rtol=1e-5)
    # without the gate the same module is plain multi-head attention
    plain = GatedAttention(dim=8, num_heads=2, gate=False).eval()
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True).eval()
    mha.in_proj_weight.data.copy_(plain.qkv.weight); mha.in_proj_bias.data.copy_(plain.qkv.bias)
    mha.out_proj.weight.data.copy_(plain.proj.weight); mha.out_proj.bias.data.copy_(plain.proj.bias)
    torch.testing.assert_close(plain(x), mha(x, x, x, need_weights=False)[0], atol=1e-5, rtol=1e-5)


def test_fusion_pools_with_gates_normalised_by_their_sum():
    torch.manual_seed(0)
    fusion = GatedViewFusion(dim=8, num_heads=2, cross_layers=0, refine=False, mlp_ratio=2.0, dropout=0.0).eval()
    views = torch.randn(3, 4, 8)
    mask = torch.tensor([[True] * 4, [True, False, True, False], [True] * 4])
    pooled, per_view, gates = fusion(views, mask)
    g = torch.sigmoid(fusion.gate(views)).squeeze(-1) * mask
    expected = (g[..., None] * fusion.norm(views)).sum(1) / g.sum(1, keepdim=True)
    torch.testing.assert_close(pooled, expected)
    assert float(gates[1, 1].detach()) == 0.0


def test_metadata_encoder_null_and_dropout():
    enc = MetadataEncoder({"weather": 3}, [], use_gps=True, dim=4, out_dim=6, gps_frequencies=2, dropout=1.0)
    batch = {"weather": torch.tensor([2, 0]), "gps": torch.tensor([[52.0, 13.0], [0.0, 0.0]]),
             "gps_known": torch.tensor([1.0, 0.0])}
    enc.eval()
    out = enc(batch)
    unknown = {"weather": torch.tensor([0, 0]), "gps": batch["gps"], "gps_known": torch.tensor([0.0, 0.0])}
    assert not torch.allclose(out[0], out[1])
    torch.testing.assert_close(enc(unknown)[0], out[1])           # unknown = the learnable NULL entries
    enc.train()                                                   # dropout 1: every field hidden
    torch.testing.assert_close(enc(batch), enc.eval()(unknown))
    feats = gps_features(torch.tensor([[90.0, -180.0]]), 2)
    torch.testing.assert_close(feats, torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0, -1.0, -1.0, 1.0]]), atol=1e-6, rtol=0)


def _model(views, prune_k=None, prune_where="after", pool="meanmax"):
    backbone = create_backbone("timm", "vit_small_patch14_dinov2", None, [0, 1], True, 0,
                               {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 28})
    return RoadworkModel.from_options(
        backbone, view_names=resolve_views(views), pool=pool, width=16, depth=1, num_heads=2, mlp_ratio=2.0,
        dropout=0.0, pyramid=True, fusion_cross_layers=1, fusion_refine=True, prune_k=prune_k,
        prune_where=prune_where, vocab_sizes={"weather": 4, "daytime": 3}, text_fields=[], use_gps=True,
        meta_embed_dim=4, meta_dim=8, gps_frequencies=3, meta_dropout=0.3, classifier_hidden=[16], num_weather=4,
        feature_stats_momentum=None)


def _batch(b, v):
    return {"views": torch.rand(b, v, 3, 28, 28), "weather": torch.tensor([1, 0, 3][:b]),
            "daytime": torch.zeros(b, dtype=torch.long), "gps": torch.zeros(b, 2), "gps_known": torch.zeros(b)}


@pytest.mark.parametrize("where,calls", [("after", [24]), ("before", [2, 6])])
def test_views_go_through_backbone_in_one_batch_and_pruning(where, calls):
    model = _model("highres12", prune_k=4, prune_where=where)
    seen = []
    model.backbone.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    out = model(_batch(2, 12))
    assert seen == calls                    # after: all 24 views at once; before: global, then 2 x 3 kept
    assert out["logits"].shape == (2, 2) and out["view_logits"].shape == (2, 4, 2)
    assert out["weather_logits"].shape == (2, 4) and out["view_scores"].shape[0] == 2
    assert torch.all((out["prob"] >= 0) & (out["prob"] <= 1))
    out["logits"].sum().backward()
    scorer_grad = model.pruner.head[1].weight.grad
    assert scorer_grad is not None and scorer_grad.abs().sum() > 0   # gradients reach the scorer


def test_single_view_token_pool_and_frozen_backbone():
    model = _model("single", pool="mlpmax")
    out = model(_batch(3, 1))
    out["logits"].sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.project.mlp[1].weight.grad is not None
    with pytest.raises(ValueError, match="global"):
        _model(["center", "right"], prune_k=1, prune_where="before")


def test_feature_stats_exact_and_ema_match_numpy():
    from roadwork.feature_stats import FeatureStats
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, size=(n, 5)).astype(np.float32) for n in (7, 1, 12)]
    exact = FeatureStats(5, momentum=None)
    for b in batches:
        exact.update(torch.from_numpy(b))
    every = np.concatenate(batches)
    np.testing.assert_allclose(exact.mean.numpy(), every.mean(0), rtol=1e-5)
    np.testing.assert_allclose(exact.var.numpy(), every.var(0), rtol=1e-4)
    assert int(exact.count) == len(every)
    ema = FeatureStats(5, momentum=0.25)
    for b in batches:
        ema.update(torch.from_numpy(b))
    mean, var = batches[0].mean(0), batches[0].var(0)             # the first batch initialises
    for b in batches[1:]:
        mean, var = 0.75 * mean + 0.25 * b.mean(0), 0.75 * var + 0.25 * b.var(0)
    np.testing.assert_allclose(ema.mean.numpy(), mean, rtol=1e-5)
    np.testing.assert_allclose(ema.var.numpy(), var, rtol=1e-4)
    z = (every[:2] - every.mean(0)) / np.sqrt(every.var(0) + 1e-6)
    np.testing.assert_allclose(exact.distance(torch.from_numpy(every[:2])).numpy(),
                               np.sqrt((z ** 2).mean(1)), rtol=1e-4)


def test_model_updates_feature_stats_in_training_only():
    torch.manual_seed(0)
    model = _model("single")
    model.eval()
    model(_batch(2, 1))
    assert int(model.feature_stats.count) == 0
    model.train()
    out = model(_batch(3, 1))
    assert int(model.feature_stats.count) == 3
    np.testing.assert_allclose(model.feature_stats.mean.numpy(), out["features"].detach().mean(0).numpy(), rtol=1e-5)


def test_pruning_before_the_backbone_needs_two_kept_views():
    with pytest.raises(ValueError, match="prune_k=1 with prune_where=before"):
        _model("highres12", prune_k=1, prune_where="before")


def test_plan_gps_encoding_is_128d_log_spaced():
    import numpy as np

    from roadwork.meta_encoder import gps_features
    gps = torch.tensor([[45.0, -90.0], [-12.5, 170.25]])
    out = gps_features(gps, 32, "logspace", (1.0, 10000.0)).double().numpy()
    assert out.shape == (2, 128)
    freqs = np.logspace(0.0, 4.0, 32)
    lat = gps[:, :1].double().numpy() * freqs * np.pi / 90.0
    lon = gps[:, 1:].double().numpy() * freqs * np.pi / 180.0
    angles = np.concatenate([lat, lon], axis=1).astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(out, np.concatenate([np.sin(angles), np.cos(angles)], axis=1), atol=1e-5)
    with pytest.raises(ValueError, match="gps_encoding"):
        gps_features(gps, 4, "fourier")


def test_post_norm_block_is_the_plans_layer():
    from roadwork.blocks import GatedBlock
    torch.manual_seed(0)
    post, pre = GatedBlock(8, 2, 2.0, 0.0, norm="post").eval(), GatedBlock(8, 2, 2.0, 0.0, norm="pre").eval()
    pre.load_state_dict(post.state_dict())
    x = torch.randn(2, 3, 8)
    attn = post.attn
    q, k, v = attn.qkv(x).view(2, 3, 3, 2, 4).permute(2, 0, 3, 1, 4)
    heads = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1) @ v                   # (B, heads, N, 4)
    gated = heads.transpose(1, 2).reshape(2, 3, 8) * torch.sigmoid(attn.gate(x))       # gate from the raw input
    h = post.norm1(x + attn.proj(gated))
    torch.testing.assert_close(post(x), post.norm2(h + post.mlp(h)), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(post(x), pre(x))
    with pytest.raises(ValueError, match="block_norm"):
        GatedBlock(8, 2, 2.0, 0.0, norm="sandwich")
