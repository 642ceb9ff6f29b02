"""biomass experiment presets: they compose with the recipe's values, and their model section builds
and runs (on the tiny backbone, since the real ones need hub weights)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from common.models.encoder import build_encoder
from tests.test_biomass_model import STATS

CONF = Path(__file__).resolve().parents[1] / "conf"


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides)


# The CSIRO write-up (configs/train.yaml as sections 2.2-3.4 state it): dotted config key -> value.
WRITE_UP = {
    "backbone.name": "vit_7b_patch16_dinov3.lvd1689m", "backbone.layers": [23, 31, 39],
    "peft.name": "lora", "peft.r": 8, "peft.alpha": 16, "peft.targets": ["qkv"], "peft.last_n_blocks": 16,
    "data.image_size": [480, 960], "trainer.max_epochs": 35, "trainer.ema.enabled": True, "trainer.ema.decay": 0.99,
    # 3.3 ViTDet scalar readout per layer, learned fusion in component space
    "model.head._target_": "biomass.heads_pool.LayerFusion",
    "model.head.head._target_": "biomass.heads_vitdet.ViTDetScalarHead",
    "model.head.head.width": 512, "model.head.head.bottleneck": 4096,
    "model.head.head.scales": [2.0, 1.0, 0.5, 0.25], "model.head.head.norm": "ln",
    "model.param": "total_ratio", "model.aux": ["height", "ndvi", "state"],
    "model.mixup.prob": 0.96, "model.mixup.alpha": 3.9,
    # 3.4.2-3.4.4 losses, UW (mean over the six tasks), primary-anchored PCGrad on the head group
    "loss.space": "norm_gm2", "loss.kind": "mse", "loss.balancing": "uw", "loss.uw_divide": True,
    "loss.weights": {"total": 1.0, "ratio": 1.0, "weighted": 1.0, "height": 1.0, "ndvi": 1.0, "state": 1.0},
    "trainer.optim.uw_weight_decay": 0.0,
    "trainer.pcgrad.enabled": True, "trainer.pcgrad.mode": "anchored",
    "trainer.pcgrad.primary": ["total", "ratio", "weighted"], "trainer.pcgrad.groups": ["head"],
    # 4.3 / 5.2 final-epoch heads
    "cv.checkpoint": "last", "cv.folds": 5,
    # 2.2.3 height in raw centimetres
    "loss.aux_raw": ["height"],
}
# The repository behind the write-up (LinkinPony/CSIRO) where the write-up's text gives no value: configs/train.yaml
# (model.head.dropout, optimizer, scheduler, peft), src/models/regressor/heads/vitdet.py (LayerNorm2d over channels,
# 0.25 = two MaxPool2d(2, 2), Dropout before the Linear and after the activation, height / state heads on the fused
# z), src/training/pcgrad.py (anchor masked to each auxiliary's support), configs/ensemble.json (MC dropout).
REPOSITORY = {
    "model.head.head.norm": "ln", "model.head.head.downsample": "pairs",
    "model.head.head.dropout": 0.4195346732130885, "model.head.head.input_dropout": 0.4195346732130885,
    "model.head.fused_z": ["height", "state"],
    "trainer.optim.lr": 7.876635324491703e-05, "trainer.optim.weight_decay": 1.3901312448240555e-05,
    "trainer.schedule.warmup_epochs": 5,
    "peft.lr": 0.0005009856007190292, "peft.dropout": 0.09990038225555746, "peft.layer_decay": 0.8729858381132479,
    "trainer.pcgrad.mode": "anchored_support",
    "inference.ensemble.mc_passes": 64, "inference.ensemble.mc_var": "relative",
    "inference.ensemble.mc_ratio_weight": 1.0, "inference.ensemble.mc_clip": [0.0, 1000.0],
    "inference.ensemble.mc_eps": 1e-8,
}
# 2.2.2 augmentation, in data.augment's order: transform -> its arguments (the crop and the affine always, inside
# the 0.9 augmented branch; shear 0.02 deg, as the write-up's repository config)
WRITE_UP_AUGMENT = {
    "common.data.augment.SequentialOrClean": {"p_clean": 0.1},
    "albumentations.HorizontalFlip": {"p": 0.5}, "albumentations.VerticalFlip": {"p": 0.5},
    "biomass.augment.AspectResizedCrop": {"p": 1.0, "area": [0.8, 1.0]},
    "albumentations.Affine": {"p": 1.0, "scale": [0.95, 1.05], "translate_percent": [-0.02, 0.02], "rotate": [-5, 5],
                              "shear": [-0.02, 0.02]},
    "albumentations.ColorJitter": {"p": 0.8, "brightness": 0.2, "contrast": 0.2, "saturation": 0.1, "hue": 0.0},
    # the repository's overlays (configs/train.yaml data.augment.watermark / light_spot), before blur and noise
    "biomass.overlays.TextWatermark": {"p": 0.3, "timestamp_prob": 0.5, "timestamp_format": "%d %m %Y %H:%M",
                                       "text_length": [3, 20], "font_size": [0.04, 0.12], "min_font_px": 12,
                                       "alpha": [128, 200], "colour_jitter": 50,
                                       "colours": [[255, 140, 0], [255, 120, 0], [255, 170, 40], [255, 200, 0],
                                                   [255, 255, 255]],
                                       "positions": ["bottom_right", "bottom_left", "top_right", "top_left"],
                                       "position_probs": [0.7, 0.15, 0.1, 0.05], "margin": [0.008, 0.05],
                                       "shadow_alpha": [160, 255], "shadow_offset": [0.03, 0.07]},
    "biomass.overlays.LightSpot": {"p": 0.3, "radius": [0.06, 0.18], "alpha": [0.2, 0.6], "colour": [255, 255, 220],
                                   "blur_frac": 0.5},
    "albumentations.GaussianBlur": {"p": 0.5, "blur_limit": [3, 7], "sigma_limit": [0.1, 1.0]},
    "albumentations.GaussNoise": {"p": 0.5, "std_range": [0.01, 0.01]},
    "albumentations.Erasing": {"p": 0.25, "scale": [0.02, 0.1], "ratio": [0.3, 3.3], "fill": "random"},
}


def test_csiro_vitdet_preset_equals_the_write_up_and_its_repository():
    cfg = _compose(["experiment=biomass_csiro_vitdet"])
    for key, expected in {**WRITE_UP, **REPOSITORY}.items():
        value = OmegaConf.select(cfg, key)
        value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        assert value == expected, f"{key}: preset {value!r} != write-up {expected!r}"


def test_csiro_vitdet_preset_augmentation_is_the_write_ups():
    from common.data.augment import find_transform, iter_transforms
    augment = _compose(["experiment=biomass_csiro_vitdet"]).data.augment
    assert [node["_target_"] for node in iter_transforms(augment)] == list(WRITE_UP_AUGMENT)   # these, in this order
    for target, expected in WRITE_UP_AUGMENT.items():
        node = find_transform(augment, target)
        node = OmegaConf.to_container(OmegaConf.create(node)) if OmegaConf.is_config(node) else node
        assert {key: node[key] for key in expected} == expected, target


def test_csiro_vitdet_preset_augmentation_builds_the_write_up_transforms():
    from common.data.augment import build_augment
    pipeline = build_augment(_compose(["experiment=biomass_csiro_vitdet"]).data.augment)
    steps = {type(t).__name__: t for t in pipeline.transforms[0].transforms}
    assert pipeline.transforms[0].p == pytest.approx(0.9)
    assert {"AspectResizedCrop", "Affine", "ColorJitter", "GaussianBlur", "GaussNoise", "Erasing",
            "TextWatermark", "LightSpot"} <= set(steps) and "AspectCrop" not in steps
    assert steps["AspectResizedCrop"].scale == (0.8, 1.0) and steps["Erasing"].scale == (0.02, 0.1)
    assert steps["GaussianBlur"].blur_limit == (3, 7) and steps["ColorJitter"].p == 0.8
    mark, spot = steps["TextWatermark"], steps["LightSpot"]
    assert (mark.font_size, mark.alpha, mark.text_length) == ((0.04, 0.12), (128, 200), (3, 20))
    assert (spot.radius, spot.alpha, spot.blur_frac) == ((0.06, 0.18), (0.2, 0.6), 0.5)


@pytest.mark.parametrize("preset", ["biomass_csiro_vitdet", "biomass_halves_dinov3_l"])
def test_preset_model_builds_on_the_tiny_backbone(preset):
    cfg = _compose([f"experiment={preset}", "backbone=tiny", "peft=none", "backbone.layers=[1,2,3]"])
    model = instantiate(cfg.model, backbone=build_encoder(cfg), stats=STATS).train()
    batch = {"image": torch.rand(2, 3, 56, 112), "targets_g": torch.rand(2, 5) * 50,
             "target_mask": torch.ones(2, 5), "state": ["Tas", "Vic"]}
    out = model(batch)
    assert out["pred_g"].shape == (2, 5) and torch.isfinite(out["pred_g"]).all()
    criterion = instantiate(cfg.loss, stats=STATS)
    batch.update(height=torch.rand(2), height_mask=torch.ones(2), ndvi=torch.rand(2), ndvi_mask=torch.ones(2))
    assert set(criterion(out, batch)) >= set(cfg.trainer.pcgrad.primary or [])
