"""The `inference` config section (conf/inference/<task>.yaml): each task's composed section instantiates to its
components with the documented defaults, the keys it replaced fail loudly, and a checkpoint's inference settings
never override this run's."""
from __future__ import annotations

import functools

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from biomass.ensemble import BiomassEnsemble
from biomass.model import BiomassModel
from biomass.tta import ViewAveraged, ViewTTA
from common.inference import predictor as inference
from common.inference.ensemble import WeightedEnsemble
from common.training.checkpoint import FORMAT_VERSION, trainable_state
from common.training.parts import load_task
from roadwork.ensemble import RoadworkEnsemble
from roadwork.stacking import stack_members
from roadwork.tta import FilteredTTA
from tests.cli import REPO
from tests.test_biomass_model import STATS

IDENTITY = {"hflip": False, "zoom": 1.0, "brightness": 1.0}


def _cfg(overrides, tmp_path=None):
    paths = [] if tmp_path is None else [f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path / 'run'}"]
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=[*overrides, *paths])


def _partial(component, func, **keywords):
    assert isinstance(component, functools.partial) and component.func is func, component
    assert component.keywords == keywords


def test_biomass_defaults():
    cfg = _cfg(["task=biomass"])
    assert (cfg.inference.weighting, cfg.inference.top_k) == ("mean", None)
    _partial(instantiate(cfg.inference.ensemble), BiomassEnsemble, mc_passes=0, mc_eps=1e-6, cache_dir=None,
             mc_var="absolute", mc_ratio_weight=0.0, mc_clip=None)
    assert instantiate(cfg.inference.stack) is None
    tta = instantiate(cfg.inference.tta)
    assert isinstance(tta, ViewTTA) and tta == ViewTTA(hflip=False, vflip=False, scales=[], tiles=None)
    assert not tta.active
    model = torch.nn.Linear(1, 1)
    assert tta(model) is model                      # no view selected: the model as it is


def test_roadwork_defaults_and_its_tta_option():
    cfg = _cfg(["task=roadwork"])
    assert (cfg.inference.weighting, cfg.inference.top_k) == ("mean", None)
    _partial(instantiate(cfg.inference.ensemble), RoadworkEnsemble, combine="logit", eps=1e-6)   # the plan: logits
    _partial(instantiate(cfg.inference.stack), stack_members, c=1.0, eps=1e-6)
    assert cfg.inference.tta is None and instantiate(cfg.inference.tta) is None      # off by default
    tta = instantiate(_cfg(["task=roadwork", "inference/tta=roadwork"]).inference.tta)
    assert tta.func is FilteredTTA and tta.keywords["keep_fraction"] == 0.5 and tta.keywords["temperature"] == 0.1
    variants = tta.keywords["variants"]
    assert type(variants) is list and len(variants) == 6 and variants[0] == IDENTITY   # plain containers
    tuned = _cfg(["task=roadwork", "inference/tta=roadwork", "inference.tta.keep_fraction=0.3"]).inference.tta
    assert instantiate(tuned).keywords["keep_fraction"] == 0.3


def test_sclera_defaults():
    cfg = _cfg(["task=sclera"])
    assert (cfg.inference.weighting, cfg.inference.top_k) == ("mean", None)
    _partial(instantiate(cfg.inference.ensemble), WeightedEnsemble)
    assert instantiate(cfg.inference.stack) is None and instantiate(cfg.inference.tta) is None


def test_biomass_views_on_the_command_line():
    tta = instantiate(_cfg(["task=biomass", "inference.tta.hflip=true", "inference.tta.scales=[0.75,1.25]"]).inference.tta)
    assert tta == ViewTTA(hflip=True, scales=[0.75, 1.25]) and type(tta.scales) is list
    tiled = instantiate(_cfg(["task=biomass", "inference.tta.hflip=true",
                              "inference.tta.tiles={grid: [2, 2], scale: 2.0, centre: true}"]).inference.tta)
    assert tiled == ViewTTA(hflip=True, tiles={"grid": [2, 2], "scale": 2.0, "centre": True})
    assert _cfg(["task=biomass", "inference.tta=null"]).inference.tta is None


@pytest.mark.parametrize("task, override", [
    ("biomass", "data.tta.hflip=true"), ("biomass", "data.ensemble.mc_passes=2"), ("roadwork", "task.tta.enabled=true"),
    ("roadwork", "ensemble.weighting=metric"), ("roadwork", "ensemble.combine=prob"), ("sclera", "ensemble.top_k=3"),
    ("roadwork", "ensemble.stack_c=0.5"), ("roadwork", "inference.tta.keep_fraction=0.3"),   # tta not selected
])
def test_replaced_keys_fail_loudly(task, override):
    with pytest.raises(ConfigCompositionException, match="Could not override"):
        _cfg([f"task={task}", override])


# ---- a checkpoint's inference settings ----------------------------------------------------------
def _checkpoint(tmp_path, cfg, model, edit):
    config = OmegaConf.to_container(cfg, resolve=True)
    edit(config)
    path = tmp_path / "model.pt"
    torch.save({"format": FORMAT_VERSION, "task": str(cfg.task.name), "config": config,
                "model": trainable_state(model), "stats": STATS, "ema": None}, path)
    return path


def _trained_with_tta(config):
    """What a run trained with other inference settings stores in its checkpoint."""
    config["inference"].update(weighting="metric", top_k=1)
    config["inference"]["ensemble"]["mc_passes"] = 4
    config["inference"]["tta"].update(hflip=True, tiles={"grid": [2, 2], "scale": 2.0, "centre": True})


def test_checkpoint_inference_section_never_overrides_this_runs(tmp_path):
    cfg = _cfg(["task=biomass", "mode=predict"], tmp_path)
    model = load_task(_cfg(["task=biomass"], tmp_path)).build_model(STATS)
    path = _checkpoint(tmp_path, cfg, model, _trained_with_tta)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["config"]["inference"]["tta"]["hflip"]
    assert inference.config_from_checkpoint(cfg, ckpt).inference == cfg.inference

    plain = inference.load_predictor(cfg, path)           # this run: no views, so none is averaged
    assert type(plain.model) is BiomassModel and plain.model.tta is None

    flipped = _cfg(["task=biomass", "mode=predict", "inference.tta.vflip=true"], tmp_path)
    predictor = inference.load_predictor(flipped, path)
    assert isinstance(predictor.model, ViewAveraged) and predictor.model.tta == ViewTTA(vflip=True)
    assert predictor.model.model.tta is None              # the wrapper averages the views, the model not again


def test_training_validates_with_the_views_eval_wraps_them(tmp_path):
    """mode=train / cv: the model averages inference.tta's views in eval mode (validation, out-of-fold);
    eval / predict build it without and common.inference.predictor wraps it."""
    stats = STATS
    for mode, expected in (("train", ViewTTA(hflip=True)), ("cv", ViewTTA(hflip=True)), ("eval", None)):
        task = load_task(_cfg(["task=biomass", f"mode={mode}", "inference.tta.hflip=true"], tmp_path))
        assert task.build_model(stats).tta == expected
    with pytest.raises(ValueError, match="data.cache_features=false for test-time augmentation"):
        load_task(_cfg(["task=biomass", "inference.tta.hflip=true", "data.cache_features=true"])).build_model(stats)


def test_roadwork_checkpoint_tta_is_not_this_runs(tmp_path):
    cfg = _cfg(["task=roadwork", "mode=predict", "data.views=single", "model.width=32"], tmp_path)
    model = load_task(cfg).build_model({})
    on = _cfg(["task=roadwork", "mode=predict", "data.views=single", "model.width=32", "inference/tta=roadwork"],
              tmp_path)
    path = _checkpoint(tmp_path, cfg, model, lambda config: config.update(inference=OmegaConf.to_container(
        on.inference)))
    assert type(inference.load_predictor(cfg, path).model) is type(model)          # the checkpoint's tta: unused
    assert isinstance(inference.load_predictor(on, path).model, FilteredTTA)       # this run's


@pytest.mark.parametrize("task, retired", [
    ("roadwork", {"task": {"tta": {"enabled": True, "keep_fraction": 0.5, "temperature": 0.1, "variants": []},
                           "max_epochs": 16}}),
    ("sclera", {"task": {"max_epochs": 8}}),                  # before trainer.max_epochs was the one place
    ("biomass", {"data": {"tta": {"hflip": True, "vflip": False, "scales": [], "tiles": 0.0},
                          "ensemble": {"mc_passes": 2, "mc_eps": 1e-6, "cache_dir": None}}}),
])
def test_checkpoints_from_before_the_inference_section_still_load(tmp_path, task, retired):
    """Their task.tta / data.tta / data.ensemble / task.max_epochs are left out (not refused as unknown keys, never
    read)."""
    cfg = _cfg([f"task={task}", "mode=predict"], tmp_path)
    config = OmegaConf.to_container(cfg, resolve=True)
    for section, keys in retired.items():
        config[section].update(keys)
    merged = inference.config_from_checkpoint(cfg, {"config": config})
    for section, keys in retired.items():
        assert not set(keys) & set(merged[section])
    assert merged.inference == cfg.inference


# the training augmentation as checkpoints stored it before data.augment became a list of transforms
OLD_AUGMENTATION = {
    "biomass": ("aug", {"p_clean": 0.3, "hflip": 0.5, "vflip": 0.5, "crop": {"p": 0.2, "min_scale": 0.85},
                        "color": {"p": 0.5, "brightness": 0.15, "contrast": 0.15, "saturation": 0.15, "hue": 0.02},
                        "extra": [{"name": "GridDistortion", "p": 0.2}],
                        "overlay": {"p": 0.1, "font_scale": [0.3, 0.5]}}),
    "sclera": ("augment", {"hflip": 0.5, "vflip": 0.3, "rotate_deg": 15, "rotate_p": 0.4, "rot90": 0.15,
                           "rot90_k": [1, 2, 3], "occluder_count": [0, 3], "highlight_p": 0.25}),
}


@pytest.mark.parametrize("task", sorted(OLD_AUGMENTATION))
def test_checkpoints_with_the_earlier_augmentation_settings_still_load(tmp_path, task):
    """Training-only: left out (not refused as unknown keys, never built); this run's data.augment stands in."""
    from common.data.augment import build_augment
    cfg = _cfg([f"task={task}", "mode=predict"], tmp_path)
    config = OmegaConf.to_container(cfg, resolve=True)
    key, old = OLD_AUGMENTATION[task]
    config["data"].pop("augment")
    config["data"][key] = old
    merged = inference.config_from_checkpoint(cfg, {"config": config})
    assert "aug" not in merged.data and merged.data.augment == cfg.data.augment
    assert build_augment(merged.data.augment) is not None
