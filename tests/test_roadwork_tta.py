"""Feature-distance-filtered test-time augmentation: augmentations, kept set and weights vs numpy, real model."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn

from common.inference.ensemble import WeightedEnsemble
from roadwork.feature_stats import FeatureStats
from roadwork.tta import FilteredTTA, Variant
from tests.test_roadwork_model import _batch, _model

IDENTITY = {"hflip": False, "zoom": 1.0, "brightness": 1.0}
CONF = Path(__file__).resolve().parents[1] / "conf"


def _variant(**changes):
    return {**IDENTITY, **changes}


def test_augmentations_match_hand_computations():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 3, 8, 8)
    assert torch.equal(Variant(**IDENTITY).apply(x), x)
    assert torch.equal(Variant(True, 1.0, 1.0).apply(x), torch.flip(x, dims=[-1]))
    bright = Variant(False, 1.0, 1.7).apply(x)
    torch.testing.assert_close(bright, torch.clamp(x * 1.7, 0.0, 1.0))
    assert bright.max() == 1.0 and (x * 1.7).max() > 1.0
    zoomed = Variant(False, 2.0, 1.0).apply(x)
    crop = x[..., 2:6, 2:6].reshape(-1, 3, 4, 4)
    expected = F.interpolate(crop, size=(8, 8), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(zoomed, expected.reshape(x.shape))
    square = torch.zeros(1, 1, 3, 8, 8)
    square[..., 2:6, 2:6] = 1.0                     # zoom 2 keeps exactly the centre square: all ones
    torch.testing.assert_close(Variant(False, 2.0, 1.0).apply(square), torch.ones_like(square))


class FakeModel(nn.Module):
    """features = (mean of all pixels, mean of the left half) per sample; prob = the mean of all pixels."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, batch):
        self.seen.append(batch)
        v = batch["views"]
        mean, left = v.mean(dim=(1, 2, 3, 4)), v[..., : v.shape[-1] // 2].mean(dim=(1, 2, 3, 4))
        return {"prob": mean, "features": torch.stack([mean, left], -1), "logits": torch.zeros(len(v), 2)}


def _stats(mean, var):
    stats = FeatureStats(2, None)
    stats.mean.copy_(torch.tensor(mean)); stats.var.copy_(torch.tensor(var)); stats.count.fill_(10)
    return stats


VARIANTS = [IDENTITY, _variant(hflip=True), _variant(zoom=2.0), _variant(brightness=0.6), _variant(brightness=1.3)]


def _expected(views, stats, keep, temperature):
    """Per-variant features with numpy, then the numpy distance, kept set, weights and probability."""
    feats = []
    for v in VARIANTS:
        a = Variant(**v).apply(views).numpy().astype(np.float64)
        feats.append(np.stack([a.mean(axis=(1, 2, 3, 4)), a[..., :4].mean(axis=(1, 2, 3, 4))], -1))
    feats = np.stack(feats, 1)                                                  # (B, T, 2)
    z = (feats - stats.mean.numpy()) / np.sqrt(stats.var.numpy() + stats.eps)
    dist = np.sqrt((z ** 2).mean(-1))
    weights = np.zeros_like(dist)
    for b in range(len(dist)):
        kept = np.argsort(dist[b])[:keep]
        e = np.exp(-dist[b, kept] / temperature - (-dist[b, kept] / temperature).max())
        weights[b, kept] = e / e.sum()
    return dist, weights, (weights * feats[..., 0]).sum(1), (weights[..., None] * feats).sum(1)


def test_kept_set_and_weights_match_numpy():
    torch.manual_seed(0)
    views = torch.rand(4, 2, 3, 8, 8) * torch.rand(4, 1, 1, 1, 1)               # varied brightness per sample
    batch = {"views": views, "label": torch.tensor([0, 1, 1, 0]), "image": ["a", "b", "c", "d"]}
    stats, model = _stats([0.3, 0.35], [0.01, 0.04]), FakeModel()
    tta = FilteredTTA(model, VARIANTS, keep_fraction=0.5, temperature=0.2, stats=stats).eval()
    out = tta(batch)
    dist, weights, prob, feats = _expected(views, stats, keep=3, temperature=0.2)   # ceil(0.5 * 5) = 3
    np.testing.assert_allclose(out["tta_distance"].numpy(), dist, rtol=1e-5)
    np.testing.assert_allclose(out["tta_weights"].numpy(), weights, rtol=1e-5, atol=1e-7)
    assert ((out["tta_weights"] == 0).sum(1) == 2).all()                          # the 2 farthest: exactly 0
    assert len({tuple(row) for row in (weights > 0).tolist()}) > 1                 # the kept set varies by sample
    np.testing.assert_allclose(out["prob"].numpy(), prob, rtol=1e-5)
    np.testing.assert_allclose(out["features"].numpy(), feats, rtol=1e-5)
    torch.testing.assert_close(out["logits"].softmax(-1)[:, 1], out["prob"])
    assert len(model.seen) == 5 and all(b["image"] is batch["image"] and b["label"] is batch["label"]
                                        for b in model.seen)
    assert torch.equal(batch["views"], views)                                      # the input is not modified


def test_keep_all_at_high_temperature_is_the_plain_mean():
    torch.manual_seed(1)
    views = torch.rand(3, 2, 3, 8, 8)
    tta = FilteredTTA(FakeModel(), VARIANTS, 1.0, 1e6, stats=_stats([0.5, 0.5], [0.01, 0.01])).eval()
    out = tta({"views": views})
    plain = np.mean([Variant(**v).apply(views).mean(dim=(1, 2, 3, 4)).numpy() for v in VARIANTS], 0)
    np.testing.assert_allclose(out["prob"].numpy(), plain, rtol=1e-5)
    np.testing.assert_allclose(out["tta_weights"].numpy(), np.full((3, 5), 0.2), rtol=1e-5)


def test_real_model_with_the_shipped_config_and_ensemble():
    torch.manual_seed(0)
    model = _model("single")
    batch = _batch(3, 1)
    model.train()(batch)                                                           # fills feature_stats
    model.eval()
    model.logit_shift.fill_(0.7)
    with initialize_config_dir(str(CONF), version_base="1.3"):
        assert compose("config", overrides=["task=roadwork"]).inference.tta is None        # off by default
        cfg = compose("config", overrides=["task=roadwork", "inference/tta=roadwork"]).inference.tta
    tta = instantiate(cfg)(model).eval()                                           # as common.inference.predictor builds it
    assert isinstance(tta, FilteredTTA) and tta.stats is model.feature_stats and tta.keep == 3
    with torch.no_grad():
        out = tta(batch)
        probs = torch.stack([model({**batch, "views": Variant(**v).apply(batch["views"])})["prob"]
                             for v in cfg.variants], 1)
        alone = FilteredTTA(model, [IDENTITY], 1.0, 1.0).eval()(batch)["prob"]
        ensemble = instantiate(cfg)(WeightedEnsemble([model, _model("single")])).eval()
        assert ensemble.stats is model.feature_stats                               # the first member's
        ens_out = ensemble(batch)
    assert torch.all((out["prob"] >= 0) & (out["prob"] <= 1))
    torch.testing.assert_close(out["tta_weights"].sum(1), torch.ones(3))
    assert ((out["tta_weights"] > 0).sum(1) == 3).all()                           # ceil(0.5 * 6)
    torch.testing.assert_close(out["prob"], (out["tta_weights"] * probs).sum(1))
    torch.testing.assert_close(alone, model(batch)["prob"])                      # calibration kept (logit_shift)
    assert ens_out["tta_weights"].shape == (3, 6) and torch.all((ens_out["prob"] >= 0) & (ens_out["prob"] <= 1))


@pytest.mark.parametrize("variant,message", [
    (_variant(zoom=0.5), r"inference\.tta\.variants\[1\]\.zoom=0\.5"),
    (_variant(brightness=0), r"inference\.tta\.variants\[1\]\.brightness"),
    (_variant(hflip="yes"), r"inference\.tta\.variants\[1\]\.hflip"),
    ({**IDENTITY, "zoomm": 1.2}, r"inference\.tta\.variants\[1\].*exactly the keys"),
])
def test_bad_variants_are_named(variant, message):
    with pytest.raises(ValueError, match=message):
        FilteredTTA(FakeModel(), [IDENTITY, variant], 0.5, 1.0, stats=_stats([0, 0], [1, 1]))


def test_bad_settings_and_cached_batches_are_refused():
    stats = _stats([0, 0], [1, 1])
    with pytest.raises(ValueError, match="keep_fraction=0"):
        FilteredTTA(FakeModel(), VARIANTS, 0, 1.0, stats=stats)
    with pytest.raises(ValueError, match="temperature"):
        FilteredTTA(FakeModel(), VARIANTS, 0.5, 0.0, stats=stats)
    tta = FilteredTTA(FakeModel(), VARIANTS, 0.5, 1.0, stats=stats)
    with pytest.raises(RuntimeError, match="eval"):
        tta({"views": torch.rand(1, 1, 3, 8, 8)})
    with pytest.raises(ValueError, match="cache_features=false"):
        tta.eval()({"views": torch.rand(1, 1, 3, 8, 8), "cache_key": [["k"]]})
    with pytest.raises(ValueError, match="feature statistics are empty"):
        empty = FilteredTTA(FakeModel(), VARIANTS, 0.5, 1.0, stats=FeatureStats(2, None))
        empty.eval()({"views": torch.rand(1, 1, 3, 8, 8)})
    with pytest.raises(ValueError, match="training feature statistics"):
        FilteredTTA(FakeModel(), VARIANTS, 0.5, 1.0)                               # no stats given, none in the model


def test_ensembles_of_members_with_different_inputs_are_refused():
    ensemble = FakeModel()
    ensemble.member_specs = [{"views": ["single"]}, {"views": ["global", "center"]}]
    with pytest.raises(ValueError, match="members of different inputs.*set inference.tta=null"):
        FilteredTTA(ensemble, VARIANTS, 0.5, 1.0, stats=_stats([0, 0], [1, 1]))
    ensemble.member_specs = [{"views": ["single"]}] * 2                           # the same inputs: fine
    assert FilteredTTA(ensemble, VARIANTS, 0.5, 1.0, stats=_stats([0, 0], [1, 1])).member_specs == ensemble.member_specs
