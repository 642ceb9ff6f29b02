"""Adaptation (common.training.adapt): head adapters start as the identity, only they train, frozen head weights travel
in checkpoints, the split guard, and train -> k-fold adaptation -> predict through run.py."""
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from common.training import adapt
from common.training.checkpoint import load_checkpoint, trainable_state
from roadwork.task import RoadworkTask
from tests.cli import run_cli
from tests.test_roadwork_e2e import SMALL

CONF = Path(__file__).resolve().parents[1] / "conf"
HEAD = ["adapt.modules=[blocks,fusion]", "adapt.layers=[qkv,gate,proj]"]


def _cfg(overrides):
    with initialize_config_dir(str(CONF), version_base=None):
        return compose("config", overrides=["task=roadwork", "data.view_size=28", *overrides])


def _batch():
    return {"views": torch.rand(2, 1, 3, 28, 28), "weather": torch.tensor([0, 1]), "daytime": torch.tensor([2, 0]),
            "scene": torch.tensor([0, 3]), "gps": torch.zeros(2, 2), "gps_known": torch.tensor([0.0, 1.0])}


def test_head_adapters_start_as_identity_and_are_the_only_trainable_head_weights():
    cfg = _cfg(HEAD + ["model.fusion_refine=true"])
    torch.manual_seed(0)
    model = RoadworkTask(cfg).build_model({}).eval()
    batch = _batch()
    before = model(batch)["logits"]
    head_before = {n for n, p in model.named_parameters() if not n.startswith("backbone.")}
    adapt.apply_head_adapters(model, cfg.adapt)
    torch.testing.assert_close(model(batch)["logits"], before)        # DoRA / LoRA B = 0 at initialisation
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and not n.startswith("backbone.") for n in trainable)
    wrapped = {n.split(".lora_")[0] for n in trainable}
    layers = cfg.model.depth + cfg.model.fusion_cross_layers + 1      # blocks + fusion cross + refine
    assert len(wrapped) == 3 * layers and all(w.rsplit(".", 1)[-1] in {"qkv", "gate", "proj"} for w in wrapped)
    # every frozen head weight (renamed base_layer.* where wrapped) is kept in the checkpoint state
    assert len(model.keep_frozen) == len(head_before)
    assert model.keep_frozen <= set(trainable_state(model))


def test_train_modules_and_unknown_module_errors():
    cfg = _cfg(HEAD + ["adapt.train_modules=[classifier]"])
    model = RoadworkTask(cfg).build_model({})
    adapt.apply_head_adapters(model, cfg.adapt)
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith("classifier."))
    bad = _cfg(["adapt.modules=[fusoin]"])
    with pytest.raises(ValueError, match="no submodule 'fusoin'"):
        adapt.apply_head_adapters(RoadworkTask(bad).build_model({}), bad.adapt)


@pytest.mark.parametrize("overrides, match", [
    (["adapt.init_ckpt=x.pt"], "adapt.split is not"),
    (["adapt.init_ckpt=x.pt", "adapt.split=val", "data.train=val"], "data.eval, the split results are reported"),
    (["adapt.init_ckpt=x.pt", "adapt.split=adapt"], r"data.train=\$\{adapt.split\}"),
])
def test_split_guard(overrides, match):
    with pytest.raises(ValueError, match=match):
        adapt.check_split(_cfg(overrides))


def test_adapt_preset_composes():
    cfg = _cfg(["experiment=roadwork_adapt", "backbone=tiny", "adapt.split=adapt"])
    assert cfg.mode == "cv" and cfg.peft.name == "none" and cfg.data.train == "adapt" and cfg.data.val is None
    assert cfg.peft.lr == 1e-6 and cfg.adapt.method == "dora"          # DoRA on the head only, as the plan
    assert cfg.data.views == "highres12" and cfg.model.prune_k == 8           # the stage-1 plan's model


@pytest.mark.slow
def test_train_then_kfold_adaptation_then_predict(tmp_path):
    cache = tmp_path / "cache"
    run_cli(["task=roadwork", "trainer=debug", *SMALL], tmp_path / "stage1", cache)
    init = tmp_path / "stage1" / "checkpoints" / "best.pt"
    run_cli(["task=roadwork", "mode=cv", "cv.folds=2", "trainer=debug", *SMALL, *HEAD, "peft.lr=1e-2",
             f"adapt.init_ckpt={init}", "adapt.split=train", "data.val=null"], tmp_path / "adapt", cache)
    start = load_checkpoint(init, "roadwork")
    weights = dict(start["model"])
    if start.get("ema"):
        weights.update(start["ema"]["shadow"])
    for fold in range(2):
        ckpt = load_checkpoint(tmp_path / "adapt" / f"fold_{fold}" / "checkpoints" / "best.pt", "roadwork")
        state = ckpt["model"]
        torch.testing.assert_close(state["classifier.0.weight"], weights["classifier.0.weight"])   # frozen
        torch.testing.assert_close(state["blocks.0.attn.qkv.base_layer.weight"], weights["blocks.0.attn.qkv.weight"])
        assert any(k.endswith("lora_B.default.weight") and v.abs().sum() > 0 for k, v in state.items())
        assert OmegaConf.create(ckpt["config"]).adapt.modules == ["blocks", "fusion"]
    run_cli(["task=roadwork", "mode=predict", f"ckpt_path={tmp_path / 'adapt'}", *SMALL], tmp_path / "pred", cache)
    assert (tmp_path / "pred" / "predictions.csv").is_file()
