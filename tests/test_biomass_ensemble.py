"""biomass: test-time augmentation views, in-model (validation) and wrapped (eval / predict) TTA, and the
MC-dropout-weighted ensemble."""
from __future__ import annotations

import functools

import pytest
import torch

from biomass.ensemble import BiomassEnsemble, mc_dropout_variance
from biomass.heads import DensityMLP
from biomass.tta import ViewAveraged, ViewTTA, tta_views
from tests.test_biomass_model import _model


def test_tta_views_flip_and_round_scales_to_the_patch():
    images = torch.rand(2, 3, 28, 56)
    views = tta_views(images, hflip=True, vflip=True, scales=[0.75, 1.0, 1.5], patch=14)
    assert [tuple(v.shape[-2:]) for v in views] == [(28, 56), (28, 56), (28, 56), (28, 42), (42, 84)]
    torch.testing.assert_close(views[1], images.flip(-1))
    torch.testing.assert_close(views[2], images.flip(-2))


def test_wrapped_and_in_model_tta_are_the_mean_over_views_and_keep_identities():
    torch.manual_seed(0)
    model = _model().eval()
    batch = {"image": torch.rand(2, 3, 28, 56)}
    plain = [model(batch)["pred_g"], model({"image": batch["image"].flip(-1)})["pred_g"]]
    hflip = ViewTTA(hflip=True)
    wrapped = hflip(model)                                  # eval / predict: inference.tta wraps the model
    assert isinstance(wrapped, ViewAveraged) and ViewTTA()(model) is model   # no view selected: unchanged
    out = wrapped(batch)["pred_g"]
    torch.testing.assert_close(out, 0.5 * (plain[0] + plain[1]))
    torch.testing.assert_close(out[:, 4], out[:, :3].sum(-1))
    torch.manual_seed(0)
    validating = _model(tta=hflip).eval()                   # validation in training: the model's own views
    torch.testing.assert_close(validating(batch)["pred_g"], out)
    validating.train()
    assert validating(batch)["pred_g"].shape == (2, 5)      # training ignores TTA
    with pytest.raises(RuntimeError, match="eval"):
        wrapped.train()(batch)


@pytest.mark.parametrize("settings, message", [
    ({"hflip": "yes"}, "inference.tta.hflip"), ({"scales": [0.75, -1.0]}, "inference.tta.scales"),
    ({"scales": "0.75"}, "inference.tta.scales"), ({"tiles": 1.5}, "inference.tta.tiles"),
    ({"tiles": {"grid": [0, 2], "scale": 2.0, "centre": False}}, "inference.tta.tiles.grid")])
def test_bad_view_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        ViewTTA(**settings)


def _member(seed, dropout):
    torch.manual_seed(seed)
    return _model(head=functools.partial(DensityMLP, hidden=16, dropout=dropout))


def test_equal_weight_ensemble_is_the_member_mean():
    members = [_member(0, 0.0), _member(1, 0.0)]
    batch = {"image": torch.rand(3, 3, 28, 56)}
    expected = 0.5 * sum(m.eval()(batch)["pred_g"] for m in members)
    ensemble = BiomassEnsemble(members, mc_passes=0, mc_eps=1e-6).eval()
    out = ensemble(batch)
    torch.testing.assert_close(out["pred_g"], expected)
    torch.testing.assert_close(out["member_weights"], torch.full((3, 2), 0.5))
    views = ViewTTA(hflip=True, scales=[1.5])                # the ensemble's TTA: each member's mean over views
    torch.testing.assert_close(views(ensemble)(batch)["pred_g"], 0.5 * sum(views(m)(batch)["pred_g"] for m in members))


def test_metric_prior_weights_the_members():
    members = [_member(0, 0.0), _member(1, 0.0)]
    batch = {"image": torch.rand(3, 3, 28, 56)}
    p0, p1 = (m.eval()(batch)["pred_g"] for m in members)
    ens = BiomassEnsemble(members, [0.75, 0.25], mc_passes=0, mc_eps=1e-6)
    out = ens(batch)
    torch.testing.assert_close(out["pred_g"], 0.75 * p0 + 0.25 * p1)
    torch.testing.assert_close(out["member_weights"], torch.tensor([[0.75, 0.25]] * 3))


def test_mc_dropout_weights_are_normalised_inverse_variances():
    members = [_member(0, 0.5), _member(1, 0.2)]
    batch = {"image": torch.rand(2, 3, 28, 56)}
    ens = BiomassEnsemble(members, mc_passes=4, mc_eps=1e-6)
    torch.manual_seed(5)
    out = ens(batch)
    torch.manual_seed(5)
    for m in members:
        m.eval()
        _ = m(batch)                                        # same RNG use as the ensemble's plain pass
    var = torch.stack([mc_dropout_variance(m, batch, 4) for m in members], dim=1)
    w = (1 / (var + 1e-6)) / (1 / (var + 1e-6)).sum(1, keepdim=True)
    torch.testing.assert_close(out["member_weights"], w)
    assert all(not d.training for m in members for d in m.head.modules() if isinstance(d, torch.nn.Dropout))
    with pytest.raises(ValueError, match="needs dropout"):
        BiomassEnsemble([_member(0, 0.0)], mc_passes=3, mc_eps=1e-6)(batch)


def test_relative_mc_weights_follow_the_csiro_repositorys_formula():
    """u = var(total) / (mean total^2 + eps) + ratio_weight * mean_c var(ratio logit c), clipped, w = 1 / (u + eps):
    recomputed here pass by pass with numpy (population variances)."""
    import numpy as np
    members = [_member(0, 0.5), _member(1, 0.3)]
    batch = {"image": torch.rand(2, 3, 28, 56)}
    ens = BiomassEnsemble(members, mc_passes=6, mc_eps=1e-8, mc_var="relative", mc_ratio_weight=1.0,
                          mc_clip=[0.0, 1000.0])
    torch.manual_seed(3)
    out = ens(batch)
    torch.manual_seed(3)
    us = []
    for m in members:
        m.eval()
        with torch.no_grad():
            feats = m.encode(batch)
            _ = m.decode(feats)                              # the ensemble's plain pass
            for d in m.head.modules():
                if isinstance(d, torch.nn.Dropout):
                    d.train()
            runs = [m.decode(feats) for _ in range(6)]
            m.eval()
        totals = np.stack([r["pred_g"][:, 4].numpy() for r in runs]).astype(np.float64)
        logits = np.stack([r["ratio_logits"].numpy() for r in runs]).astype(np.float64)
        u = totals.var(axis=0) / (np.clip(totals.mean(axis=0), 0, None) ** 2 + 1e-8) + logits.var(axis=0).mean(-1)
        us.append(np.clip(u, 0.0, 1000.0))
    w = 1.0 / (np.stack(us, axis=1) + 1e-8)
    np.testing.assert_allclose(out["member_weights"].numpy(), w / w.sum(1, keepdims=True), rtol=1e-4)
    # a member with a 10x smaller total and the same relative spread gets the same relative uncertainty
    samples = {"pred_g": torch.tensor([[[0, 0, 0, 0, 10.0]], [[0, 0, 0, 0, 12.0]]]),
               "ratio_logits": torch.zeros(2, 1, 3)}
    small = {"pred_g": samples["pred_g"] / 10, "ratio_logits": samples["ratio_logits"]}
    from biomass.ensemble import relative_mc_uncertainty
    big_u, small_u = (relative_mc_uncertainty(s, 1.0, 0.0, [0, 1000]) for s in (samples, small))
    torch.testing.assert_close(big_u, small_u)
    torch.testing.assert_close(big_u, torch.tensor([1.0 / 121.0]))
    with pytest.raises(ValueError, match="mc_clip"):
        BiomassEnsemble(members, mc_passes=4, mc_eps=1e-8, mc_var="relative")
