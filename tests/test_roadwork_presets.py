"""Roadwork presets compose and build: the 12-view plan and the 224 benchmark model (on the tiny backbone)."""
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from roadwork.task import RoadworkTask

CONF = Path(__file__).resolve().parents[1] / "conf"


def _cfg(overrides):
    with initialize_config_dir(str(CONF), version_base=None):
        return compose("config", overrides=overrides)


def test_highres12_preset_builds_and_runs_on_tiny():
    cfg = _cfg(["experiment=roadwork_highres12", "backbone=tiny", "peft=none", "data.view_size=28",
                "model.width=32", "model.num_heads=4", "model.meta_dim=16", "model.meta_embed_dim=8"])
    assert cfg.model.prune_k == 8 and cfg.model.classifier_hidden == [512, 256]
    model = RoadworkTask(cfg).build_model({})
    assert len(model.view_names) == 12 and model.pruner is not None
    batch = {"views": torch.rand(2, 12, 3, 28, 28), "weather": torch.tensor([0, 1]),
             "daytime": torch.tensor([2, 0]), "scene": torch.tensor([0, 3]), "gps": torch.zeros(2, 2),
             "gps_known": torch.tensor([0.0, 1.0])}
    out = model(batch)
    assert out["logits"].shape == (2, 2) and out["view_logits"].shape == (2, 8, 2)


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


def test_presets_carry_the_plans_training_values():
    for preset in ("roadwork_highres12", "roadwork_benchmark224"):
        cfg = _cfg([f"experiment={preset}"])
        assert {k: _select(cfg, k) for k in PLAN_TRAINING} == PLAN_TRAINING, preset
        assert _augment_probabilities(cfg) | {"RandomBrightnessContrast": None} == \
            PLAN_AUGMENT | {"RandomBrightnessContrast": None}
        brightness_contrast = [s for s in cfg.data.augment if s["_target_"].endswith("RandomBrightnessContrast")]
        assert [(s.brightness_limit, s.contrast_limit, s.p) for s in brightness_contrast] == [(0.2, 0.0, 0.4),
                                                                                               (0.0, 0.2, 0.4)]
    cfg = _cfg(["experiment=roadwork_highres12"])
    assert (cfg.model.gps_encoding, cfg.model.gps_frequencies, list(cfg.model.gps_frequency_range),
            cfg.model.block_norm) == ("logspace", 32, [1.0, 10000.0], "post")
    assert {k: list(v) for k, v in cfg.data.vocabularies.items()} == PLAN_VOCABULARIES


def test_adapt_preset_carries_the_plans_fine_tuning():
    cfg = _cfg(["experiment=roadwork_adapt"])
    assert {k: _select(cfg, k) for k in PLAN_FINE_TUNE} == PLAN_FINE_TUNE
    halved = {k: v / 2 for k, v in PLAN_AUGMENT.items()}
    assert _augment_probabilities(cfg) | {"RandomBrightnessContrast": None} == \
        halved | {"RandomBrightnessContrast": None}
