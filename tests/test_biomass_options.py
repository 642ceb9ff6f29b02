"""biomass: every head option on a ViT and on ConvNeXt's four stages, and every metadata mode, take one optimiser
step with their own defaults; config-time checks (axis-swapping transforms, aux targets used as metadata inputs)."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from biomass.stages import StageProjector
from biomass.task import BiomassTask
from common.models.backbone import BackboneOutput
from common.models.encoder import build_encoder
from tests.test_biomass_model import STATS

CONF = Path(__file__).resolve().parents[1] / "conf"
HEADS = sorted(p.stem for p in (CONF / "model" / "biomass").glob("*.yaml") if not p.stem.startswith("_"))
# tiny backbones and an input whose grid is 4 x 8 for both (ViT patch 14; ConvNeXt stages projected to stride 16)
BACKBONES = {"vit": (["backbone=tiny"], (56, 112)),
             "convnext": (["backbone=convnext_t", "backbone.weights=null", "backbone.layers=[0,1,2,3]"], (64, 128))}


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=["task=biomass", *overrides])


@pytest.fixture(scope="module")
def encoders():
    return {name: build_encoder(_compose(overrides)) for name, (overrides, _) in BACKBONES.items()}


def _batch(size):
    return {"image": torch.rand(2, 3, *size), "targets_g": torch.rand(2, 5) * 50, "target_mask": torch.ones(2, 5),
            "state": ["Tas", "Vic"], "species": ["a", "a"], "height": torch.rand(2) * 20, "height_mask": torch.ones(2),
            "ndvi": torch.rand(2), "ndvi_mask": torch.ones(2)}


def _one_step(cfg, encoder, size):
    BiomassTask(cfg)                                  # the config-time checks and reconciliations
    model = instantiate(cfg.model, backbone=encoder, stats=STATS).train()
    criterion = instantiate(cfg.loss, stats=STATS)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    losses = criterion(model(_batch(size)), _batch(size))
    sum(losses.values()).backward()
    torch.optim.SGD(params, lr=0.1).step()
    assert all(torch.isfinite(v) for v in losses.values())
    assert any(not torch.equal(a, p) for a, p in zip(before, params))
    return model, losses


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
@pytest.mark.parametrize("head", HEADS)
def test_every_head_takes_a_step_on_vit_and_convnext_stages(head, backbone, encoders):
    overrides, size = BACKBONES[backbone]
    cfg = _compose([*overrides, f"model/biomass={head}"])
    _one_step(cfg, encoders[backbone], size)


@pytest.mark.parametrize("mode", ["film", "xattn", "xattn_pool"])
def test_metadata_modes_run_with_their_defaults_and_drop_inputs_from_aux(mode, encoders, caplog):
    overrides, size = BACKBONES["vit"]
    cfg = _compose([*overrides, f"model.metadata.mode={mode}", "model.metadata.field_dropout=0.3"])
    with caplog.at_level(logging.INFO, logger="biomass.config_check"):
        model, losses = _one_step(cfg, encoders["vit"], size)
    assert list(cfg.model.aux) == ["height", "ndvi"] and cfg.loss.weights.state == 0.0   # State is an input
    assert "state" not in losses and "state_logits" not in model.decode(model.encode(_batch(size)))
    assert "dropped: also model inputs" in caplog.text


def test_aux_without_state_zeroes_the_state_loss_weight(encoders):
    overrides, size = BACKBONES["vit"]
    cfg = _compose([*overrides, "model.aux=[height,ndvi]"])
    _, losses = _one_step(cfg, encoders["vit"], size)
    assert cfg.loss.weights.state == 0.0 and set(losses) == {"total", "ratio", "weighted", "height", "ndvi"}


@pytest.mark.parametrize("transform", ["albumentations.RandomRotate90", "albumentations.Transpose",
                                       "sclera.augment.Rotate90"])
def test_axis_swapping_transforms_are_refused_on_non_square_images(transform):
    cfg = _compose([f"data.augment=[{{_target_: {transform}, p: 0.5}}]",
                    "data.image_size=[32,64]"])
    with pytest.raises(ValueError, match=rf"{transform}.*data.image_size=\[32, 64\]"):
        BiomassTask(cfg)
    BiomassTask(_compose([f"data.augment=[{{_target_: {transform}, p: 0.5}}]", "data.image_size=[32,32]"]))


def test_stage_projector_gives_one_width_and_the_grid_of_its_stride():
    torch.manual_seed(0)
    dims, strides = [4, 8, 16, 32], [4, 8, 16, 32]
    proj = StageProjector(dims, strides, width=None, stride=16)
    grids = [(64 // s, 128 // s) for s in strides]
    tokens = [torch.randn(2, g[0] * g[1], d) for g, d in zip(grids, dims)]
    out = proj(BackboneOutput(tokens=tokens, grid=grids[-1], grids=grids))
    assert out.grid == (4, 8) and all(t.shape == (2, 32, 32) for t in out.tokens)
    # stride-16 stage: only the 1x1 projection; stride-4 stage: the 4x4 area mean of its projection
    fmap = tokens[2].transpose(1, 2).reshape(2, 16, 4, 8)
    expected = torch.einsum("oc,bchw->bohw", proj.project[2].weight[:, :, 0, 0], fmap) \
        + proj.project[2].bias.view(1, -1, 1, 1)
    torch.testing.assert_close(out.tokens[2], expected.flatten(2).transpose(1, 2))
    fine = proj.project[0](tokens[0].transpose(1, 2).reshape(2, 4, 16, 32))
    torch.testing.assert_close(out.tokens[0][:, 0], fine[:, :, :4, :4].mean(dim=(-2, -1)))
    assert isinstance(proj.project[3], torch.nn.Identity)


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_halves_layout_takes_a_step_on_vit_and_convnext_stages(backbone, encoders):
    overrides, size = BACKBONES[backbone]
    _one_step(_compose([*overrides, "model.views.layout=halves"]), encoders[backbone], size)
