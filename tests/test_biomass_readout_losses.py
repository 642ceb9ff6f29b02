"""biomass: the write-up's ViTDet scalar readout, ZIG / log-cosh losses, UW division, ConvNeXt-T/S backbones."""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from scipy import stats as sps

from biomass.heads_pool import LayerFusion
from biomass.heads_vitdet import ViTDetScalarHead
from biomass.model import BiomassModel
from biomass.zig import ZeroInflatedGamma, masked_zig_loss, zig_nll
from common.models.backbone import BackboneOutput, create_backbone
from common.training.losses import masked_regression_loss
from common.training.mtl import UncertaintyWeighting
from common.training.optim import build_param_groups
from tests.test_biomass_model import STATS, _batch, _criterion
from tests.test_biomass_presets import CONF


def _features(batch=2, grid=(4, 8), dim=16, layers=1):
    return BackboneOutput(tokens=[torch.randn(batch, grid[0] * grid[1], dim) for _ in range(layers)], grid=grid)


def test_vitdet_scalar_head_pools_levels_and_shares_one_bottleneck():
    head = ViTDetScalarHead(embed_dim=16, num_layers=1, out_dim=9, width=8, bottleneck=12, dropout=0.0).eval()
    feats = _features()
    raw, weights = head(feats)
    assert raw.shape == (2, 1, 9) and torch.equal(weights, torch.ones(2, 1))
    descriptor = head.descriptor(feats)
    assert descriptor.shape == (2, 4 * 8)            # four pyramid levels, each average-pooled to width 8
    fmap = feats.tokens[0].transpose(1, 2).reshape(2, 16, 4, 8)
    torch.testing.assert_close(descriptor[:, 8:16], head.levels[1](fmap).mean(dim=(-2, -1)))
    z = head.bottleneck(descriptor)
    assert z.shape == (2, 12) and isinstance(head.bottleneck[2], torch.nn.SiLU)   # [input dropout,] Linear, SiLU
    torch.testing.assert_close(raw[:, 0], head.out(z))  # every output (total, ratios, aux) is linear in z
    for j in range(9):                                  # and each one trains the one shared bottleneck
        head.zero_grad()
        head(feats)[0][:, 0, j].sum().backward()
        assert head.bottleneck[1].weight.grad.abs().sum() > 0


def test_vitdet_scalar_head_dropout_is_configurable_and_active_in_training():
    head = ViTDetScalarHead(embed_dim=16, num_layers=1, out_dim=4, width=8, bottleneck=64, dropout=0.5)
    assert head.bottleneck[3].p == 0.5 and head.bottleneck[0].p == 0.0   # after SiLU; none before the Linear
    feats = _features()
    head.train()
    assert not torch.equal(head(feats)[0], head(feats)[0])
    head.eval()
    assert torch.equal(head(feats)[0], head(feats)[0])


def test_vitdet_layer_fusion_fuses_per_layer_scalar_heads_in_component_space():
    backbone = create_backbone(source="timm", name="vit_small_patch14_dinov2", weights=None, layers=[1, 2, 3],
                               model_kwargs={"embed_dim": 32, "depth": 4, "num_heads": 2, "img_size": 56})
    head = functools.partial(LayerFusion, head=functools.partial(ViTDetScalarHead, width=8, bottleneck=16,
                                                                 dropout=0.0))
    model = BiomassModel(backbone, head, "total_ratio", ["height", "ndvi", "state"], STATS,
                         {"layout": "whole", "heads": 1, "dropout": 0.0},
                         {"mode": "none", "fields": ["State"], "dim": 4, "heads": 1},
                         {"prob": 0.0, "alpha": 1.0}, {"width": None, "stride": 16}).eval()
    with torch.no_grad():
        model.head.logits.copy_(torch.tensor([0.3, -0.2, 1.0]))
        out = model({"image": torch.rand(2, 3, 28, 56)})
        feats = model.encode({"image": torch.rand(2, 3, 28, 56)})
    assert out["pred_g"].shape == (2, 5) and out["state_logits"].shape == (2, 3)
    # component-space fusion: softmax-weighted mean of each layer's non-negative components
    with torch.no_grad():
        mix = torch.softmax(model.head.logits, 0)
        per_layer = [model.param.to_space(h(BackboneOutput(tokens=[t], grid=feats.grid))[0][:, 0, :4])
                     for h, t in zip(model.head.heads, feats.tokens)]
        expected = sum(w * s for w, s in zip(mix, per_layer))
        torch.testing.assert_close(model.decode(feats)["space"], expected)


def test_zig_nll_matches_scipy_and_masks():
    pi, mu, k = torch.tensor([0.2, 0.7, 0.4]), torch.tensor([30.0, 5.0, 12.0]), torch.tensor([2.0, 0.8, 5.0])
    y = torch.tensor([0.0, 4.0, 20.0])
    got = zig_nll(pi, mu, k, y).double().numpy()
    ref = [-math.log(0.2),
           -math.log(0.3) - sps.gamma.logpdf(4.0, a=0.8, scale=5.0 / 0.8),
           -math.log(0.6) - sps.gamma.logpdf(20.0, a=5.0, scale=12.0 / 5.0)]
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    target = torch.tensor([0.0, float("nan"), 20.0])
    loss = masked_zig_loss(pi, mu, k, target, torch.tensor([1.0, 0.0, 1.0]))
    assert math.isclose(float(loss), (ref[0] + ref[2]) / 2, rel_tol=1e-5)


def test_zig_parameterisation_and_criterion_train_the_distribution():
    raw = torch.randn(3, 15, requires_grad=True)
    space = ZeroInflatedGamma.to_space(raw)
    torch.testing.assert_close(ZeroInflatedGamma.to_targets(space), (1 - space[:, :5]) * space[:, 5:10])
    extras = ZeroInflatedGamma.extras(space, torch.tensor(47.25))
    outputs = {"pred_g": ZeroInflatedGamma.to_targets(space) * 47.25, **extras}
    batch = _batch()
    batch["targets_g"] = torch.cat([batch["targets_g"], torch.tensor([[0.0, 3.0, 0.0, 3.0, 3.0]])])
    batch["target_mask"] = (~batch["targets_g"].isnan()).float()
    criterion = _criterion(space="grams", kind="zig", weights={"total": 1.0, "weighted": 1.0})
    terms = criterion(outputs, batch)
    manual = masked_zig_loss(extras["zig_pi"][:, 4], extras["zig_mu_g"][:, 4], extras["zig_shape"][:, 4],
                             batch["targets_g"][:, 4], batch["target_mask"][:, 4])
    torch.testing.assert_close(terms["total"], manual)
    sum(terms.values()).backward()
    assert torch.isfinite(raw.grad).all() and raw.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="model.param=zig"):
        criterion({"pred_g": outputs["pred_g"]}, batch)
    with pytest.raises(ValueError, match="space=grams"):
        _criterion(kind="zig")


def test_log_cosh_matches_numpy_and_is_stable():
    pred, target = torch.tensor([0.5, -3.0, 200.0]), torch.tensor([0.0, 1.0, 0.0])
    loss = masked_regression_loss(pred, target, torch.tensor([1.0, 1.0, 0.0]), kind="log_cosh")
    expected = np.mean(np.log(np.cosh(np.array([0.5, -4.0]))))
    assert math.isclose(float(loss), expected, rel_tol=1e-6)
    huge = masked_regression_loss(torch.tensor([1000.0]), torch.tensor([0.0]), torch.ones(1), kind="log_cosh")
    assert math.isclose(float(huge), 1000.0 - math.log(2.0), rel_tol=1e-6)


def test_uw_divide_by_number_of_tasks_is_the_write_ups_mean():
    losses = {"a": torch.tensor(2.0), "b": torch.tensor(0.5)}
    plain, divided = UncertaintyWeighting(["a", "b"], 0.3), UncertaintyWeighting(["a", "b"], 0.3, divide=True)
    s = 0.3
    expected = [0.5 * math.exp(-s) * v + 0.5 * s for v in (2.0, 0.5)]
    assert math.isclose(float(sum(plain(losses).values()).detach()), sum(expected), rel_tol=1e-6)
    assert math.isclose(float(sum(divided(losses).values()).detach()), sum(expected) / 2, rel_tol=1e-6)
    log = divided.epoch_log()
    assert log["uw/log_var/a"] == pytest.approx(0.3) and log["uw/weight/b"] == pytest.approx(math.exp(-0.3))


def test_uw_weight_decay_reaches_the_uw_group_only():
    params = [("model.head.w", torch.nn.Parameter(torch.ones(3, 3))), ("criterion.uw.log_var",
                                                                       torch.nn.Parameter(torch.zeros(2)))]
    groups = build_param_groups(params, {"head": 1e-3, "uw": 1e-2}, weight_decay=0.05, uw_weight_decay=0.1)
    decay = {g["tag"]: g["weight_decay"] for g in groups}
    assert decay == {"head": 0.05, "uw": 0.1}


@pytest.mark.parametrize("name,dims", [("convnext_t", [96, 192, 384, 768]), ("convnext_s", [96, 192, 384, 768])])
def test_convnext_t_s_configs_build_random_timm_models(name, dims):
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "backbone" / f"{name}.yaml"))
    assert cfg["name"].startswith({"convnext_t": "convnext_tiny.", "convnext_s": "convnext_small."}[name])
    backbone = create_backbone(**dict(cfg, weights=None, layers=[2, 3]))
    depths = [len(stage.blocks) for stage in backbone.model.stages]
    assert depths == {"convnext_t": [3, 3, 9, 3], "convnext_s": [3, 3, 27, 3]}[name]
    with torch.no_grad():
        out = backbone(torch.rand(1, 3, 64, 128))
    assert [t.shape[-1] for t in out.tokens] == dims[2:]


def test_convnext_t_composes_with_the_biomass_task():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["task=biomass", "backbone=convnext_t"])
    assert cfg.backbone.name == "convnext_tiny.fb_in22k_ft_in1k" and cfg.backbone.source == "timm"
