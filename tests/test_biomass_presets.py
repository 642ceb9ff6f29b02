"""biomass experiment presets: they compose with the recipe's values, and their model section builds
and runs (on the tiny backbone, since the real ones need hub weights)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from common.build import build_encoder
from tests.test_biomass_model import STATS

CONF = Path(__file__).resolve().parents[1] / "conf"


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides)


def test_csiro_vitdet_preset_values():
    cfg = _compose(["experiment=biomass_csiro_vitdet"])
    assert cfg.backbone.name.startswith("vit_7b_patch16_dinov3") and list(cfg.backbone.layers) == [23, 31, 39]
    assert (cfg.peft.name, cfg.peft.r, cfg.peft.alpha, list(cfg.peft.targets), cfg.peft.last_n_blocks) == \
        ("lora", 8, 16, ["qkv"], 16)
    assert cfg.model.head.head._target_ == "biomass.heads.ViTDetHead" and cfg.model.head.head.width == 512
    assert (cfg.model.mixup.prob, cfg.model.mixup.alpha) == (0.96, 3.9)
    assert cfg.loss.balancing == "uw" and cfg.trainer.pcgrad.enabled and cfg.trainer.pcgrad.mode == "anchored"
    assert cfg.trainer.ema.enabled and cfg.trainer.ema.decay == 0.99
    assert cfg.trainer.max_epochs == 35 and list(cfg.data.image_size) == [480, 960]


@pytest.mark.parametrize("preset", ["biomass_csiro_vitdet", "biomass_halves_dinov3_l"])
def test_preset_model_builds_on_the_tiny_backbone(preset):
    cfg = _compose([f"experiment={preset}", "backbone=tiny", "peft=none", "backbone.layers=[1,2,3]"])
    model = instantiate(cfg.model, backbone=build_encoder(cfg), stats=STATS).train()
    batch = {"image": torch.rand(2, 3, 28, 56), "targets_g": torch.rand(2, 5) * 50,
             "target_mask": torch.ones(2, 5), "state": ["Tas", "Vic"]}
    out = model(batch)
    assert out["pred_g"].shape == (2, 5) and torch.isfinite(out["pred_g"]).all()
    criterion = instantiate(cfg.loss, stats=STATS)
    batch.update(height=torch.rand(2), height_mask=torch.ones(2), ndvi=torch.rand(2), ndvi_mask=torch.ones(2))
    assert set(criterion(out, batch)) >= set(cfg.trainer.pcgrad.primary or [])
