"""Roadwork presets compose and build: the 12-view plan and the 224 benchmark model (on the tiny backbone)."""
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from roadwork.task import RoadworkTask

CONF = Path(__file__).resolve().parents[1] / "conf"


def _cfg(overrides):
    with initialize_config_dir(str(CONF), version_base=None):
        return compose("config", overrides=overrides)


# The tiny variant of the plan preset: tiny backbone, small views, the text as a presence flag (no weights here).
TINY_PLAN = ["experiment=roadwork_highres12", "backbone=tiny", "data.view_size=28", "model.text_encoder=null"]


def _plan_batch(batch_size=2, views=12, size=28):
    return {"views": torch.rand(batch_size, views, 3, size, size), "weather": torch.tensor([0, 1]),
            "daytime": torch.tensor([2, 0]), "scene": torch.tensor([0, 3]), "gps": torch.tensor([[48.1, 11.5], [0, 0]]),
            "gps_known": torch.tensor([1.0, 0.0]), "scene_description": torch.tensor([1, 0]),
            "scene_description_text": ["cones ahead", ""], "label": torch.tensor([1, 0])}


def test_highres12_tiny_variant_has_the_plans_widths_and_trains_one_step():
    from roadwork.blocks import GatedBlock
    cfg = _cfg(TINY_PLAN)
    task = RoadworkTask(cfg)
    model, criterion = task.build_model({}), task.build_criterion({})
    assert len(model.view_names) == 12 and model.pruner is not None and model.meta.out_dim == 704
    assert model.classifier[0].in_features == 512 + 704 and model.classifier[0].out_features == 512
    assert [type(m).__name__ for m in model.weather_head] == ["Linear", "GELU", "Dropout", "Linear"]
    assert (model.weather_head[0].in_features, model.weather_head[0].out_features, model.weather_head[-1].out_features,
            model.weather_head[2].p) == (512, 256, 7, 0.1)   # the plan's 8 counts NULL, which its loss skips
    assert all(isinstance(b, GatedBlock) and b.mlp is None and b.norm2 is None for b in model.blocks)
    assert len(model.blocks) == 4
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert not any(p.requires_grad for p in model.backbone.parameters())           # frozen, no adapters
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    before = [p.detach().clone() for p in trainable]
    out = model.train()(_plan_batch())
    assert out["logits"].shape == (2, 2) and out["view_logits"].shape == (2, 8, 2)
    loss = sum(criterion(out, {**_plan_batch(), "weather": torch.tensor([0, 1])}).values())
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and any(not torch.equal(a, b) for a, b in zip(before, trainable))


def test_post_attn_block_is_the_plans_layer():
    from roadwork.blocks import GatedBlock
    torch.manual_seed(0)
    block = GatedBlock(16, 4, 2.0, 0.0, norm="post_attn").eval()
    x = torch.randn(2, 5, 16)
    attn = block.attn
    q, k, v = attn.qkv(x).view(2, 5, 3, 4, 4).permute(2, 0, 3, 1, 4)
    weights = (q @ k.transpose(-1, -2) / 2.0).softmax(-1)                           # sqrt(head dim 4) = 2
    heads = (weights @ v).transpose(1, 2) * torch.sigmoid(attn.gate(x)).view(2, 5, 4, 4)
    expected = torch.nn.functional.layer_norm(x + attn.proj(heads.reshape(2, 5, 16)), (16,),
                                              block.norm1.weight, block.norm1.bias)
    torch.testing.assert_close(block(x), expected)
    assert sum(p.numel() for p in block.parameters()) == 5 * 16 * 16 + 5 * 16 + 2 * 16   # qkv, gate, proj, one LN


def test_benchmark224_preset_has_no_metadata_and_trains_on_benchmark_levels():
    cfg = _cfg(["experiment=roadwork_benchmark224", "backbone=tiny", "peft=none"])
    assert list(cfg.data.metadata) == [] and cfg.data.train_benchmark_levels and cfg.data.view_size == 224
    model = RoadworkTask(cfg).build_model({})
    assert model.meta is None and model.view_names == ["center"]


# The plan (seed 003): base_config, fine-tuning, metadata encoder and augmentation list, as the source states them.
PLAN_TRAINING = {"trainer.max_epochs": 30, "trainer.optim.lr": 3e-4, "trainer.optim.weight_decay": 0.01,
                 "trainer.schedule.warmup_steps": 500, "trainer.accumulate_grad_batches": 2, "data.batch_size": 32,
                 "trainer.early_stopping_patience": 5, "trainer.grad_clip": 1.0}
PLAN_FINE_TUNE = {"peft.lr": 1e-6, "adapt.r": 16, "adapt.alpha": 32, "adapt.dropout": 0.1, "adapt.method": "dora",
                  "adapt.layers": ["qkv", "proj"], "trainer.max_epochs": 5, "trainer.early_stopping_patience": 2,
                  "trainer.optim.weight_decay": 0.02, "model.dropout": 0.2, "trainer.schedule.warmup_steps": 0,
                  "data.gps_sampling.enabled": False, "cv.folds": 5}
PLAN_VOCABULARIES = {"weather": ["sunny", "rainy", "foggy", "cloudy", "clear", "overcast", "snowy"],
                     "daytime": ["day", "night", "dawn", "dusk", "light"],
                     "scene": ["urban", "highway", "residential", "rural", "industrial", "commercial"]}
PLAN_AUGMENT = {"HorizontalFlip": 0.5, "Rotate": 0.3, "Perspective": 0.2, "Affine": 0.3, "ColorJitter": 0.3,
                "HueSaturationValue": 0.2, "RandomRain": 0.15, "RandomFog": 0.15, "RandomShadow": 0.2,
                "RandomSunFlare": 0.1, "GaussNoise": 0.15, "MotionBlur": 0.1, "GaussianBlur": 0.1}


def _select(cfg, key):
    from omegaconf import OmegaConf
    value = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def _augment_probabilities(cfg) -> dict:
    return {spec["_target_"].split(".")[-1]: spec["p"] for spec in cfg.data.augment}


# The plan's model (its component inventory, sections 1-12). The 518 px views become 512: a /16 backbone needs a
# multiple of 16 (the plan names DINOv2's 518 and a DINOv3 /16 model; README, "The plan's values").
PLAN_MODEL = {"backbone.name": "vit_huge_plus_patch16_dinov3.lvd1689m", "backbone.freeze": True, "peft.name": "none",
              "backbone.layers": [-1], "model.pool": "cls", "data.views": "highres12", "data.view_size": 512,
              "model.prune_k": 8, "model.width": 512, "model.pyramid": True, "model.depth": 4, "model.num_heads": 8,
              "model.block_norm": "post_attn", "model.dropout": 0.1, "model.fusion_refine": True,
              "model.fusion_cross_layers": 1, "model.text_null": "zeros",
              "data.metadata": ["gps", "weather", "daytime", "scene", "scene_description"],
              "model.meta_embed_dim": 64, "model.meta_dim": None, "model.gps_project": False, "model.text_dim": 384,
              "model.gps_encoding": "logspace", "model.gps_frequencies": 32,
              "model.gps_frequency_range": [1.0, 10000.0],
              "model.text_encoder.name_or_path": "sentence-transformers/all-MiniLM-L6-v2",
              "model.classifier_hidden": [512, 256], "model.weather_hidden": [256],
              "loss.focal_weight": 0.5, "loss.consistency_weight": 0.3, "loss.weather_weight": 0.2,
              "loss.alpha": 0.25, "loss.alpha_mode": "scalar", "loss.gamma": 2.0, "loss.label_smoothing": 0.1,
              "loss.consistency_reduction": "sum"}


def test_presets_carry_the_plans_training_values():
    for preset in ("roadwork_highres12", "roadwork_highres12_light", "roadwork_benchmark224"):
        cfg = _cfg([f"experiment={preset}"])
        assert {k: _select(cfg, k) for k in PLAN_TRAINING} == PLAN_TRAINING, preset
        assert _augment_probabilities(cfg) | {"RandomBrightnessContrast": None} == \
            PLAN_AUGMENT | {"RandomBrightnessContrast": None}
        brightness_contrast = [s for s in cfg.data.augment if s["_target_"].endswith("RandomBrightnessContrast")]
        assert [(s.brightness_limit, s.contrast_limit, s.p) for s in brightness_contrast] == [(0.2, 0.0, 0.4),
                                                                                               (0.0, 0.2, 0.4)]
    cfg = _cfg(["experiment=roadwork_highres12"])
    assert {k: _select(cfg, k) for k in PLAN_MODEL} == PLAN_MODEL
    assert {k: list(v) for k, v in cfg.data.vocabularies.items()} == PLAN_VOCABULARIES


def test_light_preset_keeps_the_earlier_recipe():
    cfg = _cfg(["experiment=roadwork_highres12_light"])
    assert (cfg.backbone.name, cfg.peft.name, cfg.data.view_size, cfg.model.block_norm, cfg.loss.alpha_mode,
            cfg.loss.consistency_reduction) == ("vit_large_patch16_dinov3.lvd1689m", "dora", 224, "post", "class",
                                                "mean")


def test_hue_shift_limit_means_ten_degrees():
    """OpenCV's uint8 hue is in 2-degree units and albumentations adds hue_shift_limit to it: the preset's limit,
    applied at its extreme, turns a saturated colour by 10 degrees (measured with colorsys in float HSV)."""
    import colorsys

    import albumentations as A
    import numpy as np
    spec = next(s for s in _cfg(["experiment=roadwork_highres12"]).data.augment
                if s["_target_"].endswith("HueSaturationValue"))
    limit = spec.hue_shift_limit
    image = np.zeros((4, 4, 3), np.uint8)
    image[...] = (200, 60, 40)
    for sign in (1, -1):
        shifted = A.HueSaturationValue(hue_shift_limit=(sign * limit, sign * limit), sat_shift_limit=0,
                                       val_shift_limit=0, p=1.0)(image=image)["image"]
        hue = [colorsys.rgb_to_hsv(*(c / 255 for c in px))[0] * 360 for px in (image[0, 0], shifted[0, 0])]
        turn = (hue[1] - hue[0] + 180) % 360 - 180
        assert abs(turn - sign * 10.0) < 1.5, (sign, turn)


def test_adapt_preset_carries_the_plans_fine_tuning():
    cfg = _cfg(["experiment=roadwork_adapt"])
    assert {k: _select(cfg, k) for k in PLAN_FINE_TUNE} == PLAN_FINE_TUNE
    halved = {k: v / 2 for k, v in PLAN_AUGMENT.items()}
    assert _augment_probabilities(cfg) | {"RandomBrightnessContrast": None} == \
        halved | {"RandomBrightnessContrast": None}


def test_plan_preset_without_text_encoder_weights_fails_at_start_naming_the_key(monkeypatch):
    from common.models.backbone import WeightsUnavailableError
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = _cfg(["experiment=roadwork_highres12", "backbone=tiny", "data.view_size=28",
                "model.text_encoder.name_or_path=sentence-transformers/no-such-encoder"])
    with pytest.raises(WeightsUnavailableError, match=r"(?s)model\.text_encoder\.name_or_path=.*hf download.*"
                                                      r"model\.text_encoder\.name_or_path=DIR"):
        RoadworkTask(cfg).build_model({})
    off = RoadworkTask(_cfg(["experiment=roadwork_highres12", "backbone=tiny", "data.view_size=28",
                             "data.metadata=[gps,weather,daytime,scene]"])).build_model({})
    assert off.meta.text_encoder is None and off.meta.out_dim == 128 + 3 * 64   # no text in the data: off, 320-d
