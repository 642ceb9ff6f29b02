"""Every ensemble member the README lists (its `$R ...` lines under "Ensembles of different models") trains one
step and predicts, on the tiny variant of its backbone family: the tiny ViT for DINOv3, a random ConvNeXt-V2 atto
(all four stages pooled) for ConvNeXt-V2. Also: data.augment_scale scales each transform's probability."""
import re
import shlex
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from roadwork.augment import scale_probabilities
from roadwork.task import RoadworkTask

REPO = Path(__file__).resolve().parents[1]
TINY = {"dinov3": ["backbone=tiny", "data.view_size=28"],
        "convnextv2": ["backbone.name=convnextv2_atto", "backbone.weights=null", "data.view_size=64"]}
SMALL = ["model.text_encoder=null"]          # the text as a presence flag: no sentence-encoder weights here


def readme_members() -> list[list[str]]:
    """The overrides of each `$R` line of the README (seed and run dir left out) after the `R=` preset."""
    text = (REPO / "README.md").read_text()
    preset = re.search(r'^R="python run.py (.*?)"$', text, flags=re.MULTILINE).group(1).split()
    members = []
    for line in re.findall(r"^\$R (.*)$", text, flags=re.MULTILINE):
        tokens = [t for t in shlex.split(line, comments=True) if not t.startswith(("seed=", "hydra.run.dir="))]
        members.append([t for t in preset if not t.startswith(("data.root=", "trainer="))] + tokens)
    return members


def test_the_readme_lists_six_members():
    members = readme_members()
    assert len(members) == 6 and any("backbone=convnextv2_b" in m for m in members)


def _batch(views: int, size: int) -> dict:
    return {"views": torch.rand(2, views, 3, size, size), "weather": torch.tensor([0, 2]),
            "daytime": torch.tensor([1, 0]), "scene": torch.tensor([0, 4]), "gps": torch.tensor([[48.1, 11.5], [0, 0]]),
            "gps_known": torch.tensor([1.0, 0.0]), "scene_description": torch.tensor([1, 0]),
            "label": torch.tensor([1, 0])}


@pytest.mark.parametrize("index", range(6))
def test_readme_member_trains_one_step_and_predicts(index):
    overrides = readme_members()[index]
    family = "convnextv2" if "backbone=convnextv2_b" in overrides else "dinov3"
    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        cfg = compose("config", overrides=[*overrides, *TINY[family], *SMALL])
    task = RoadworkTask(cfg)
    torch.manual_seed(index)
    model, criterion = task.build_model({}), task.build_criterion({})
    batch = _batch(len(model.view_names), int(cfg.data.view_size))
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.AdamW(trainable, lr=float(cfg.trainer.optim.lr))
    loss = sum(criterion(model.train()(batch), batch).values())
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and any(not torch.equal(a, b) for a, b in zip(before, trainable))
    with torch.no_grad():
        prob = model.eval()(batch)["prob"]
    assert prob.shape == (2,) and bool(((prob >= 0) & (prob <= 1)).all())
    if family == "convnextv2":
        assert list(model.backbone.embed_dims) == [40, 80, 160, 320]     # convnextv2_atto's four stages
        assert model.project[0].normalized_shape == (2 * (40 + 80 + 160 + 320),)


def test_augment_scale_multiplies_probabilities_capped_at_one():
    specs = [{"_target_": "albumentations.HorizontalFlip", "p": 0.5},
             {"_target_": "albumentations.OneOf", "p": 0.8, "transforms": [{"_target_": "x", "p": 0.3}]}]
    assert [s["p"] for s in scale_probabilities(specs, 1.5)] == [0.75, 1.0]
    assert [s["p"] for s in scale_probabilities(specs, 0.75)] == [0.375, 0.6000000000000001]
    assert scale_probabilities(specs, 1.5)[1]["transforms"][0]["p"] == 0.3      # nested: the container decides
    assert scale_probabilities(specs, 1.0) is specs
    with pytest.raises(ValueError, match="explicit p"):
        scale_probabilities([{"_target_": "albumentations.HorizontalFlip"}], 1.5)


def test_augment_scale_reaches_the_training_pipeline():
    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        cfg = compose("config", overrides=["experiment=roadwork_highres12", "data.augment_scale=1.5"])
    task = RoadworkTask(cfg)
    dataset = task._dataset([], train=True)
    assert [t.p for t in dataset.pipeline.transforms][:3] == [0.75, pytest.approx(0.45), pytest.approx(0.3)]
