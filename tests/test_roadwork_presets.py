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
