"""Sclera task: the SSBC submission tree, eval numbers equal to scoring the written files with
sklearn, media overlays, and the embedded default end to end through run.py."""
import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from sklearn.metrics import f1_score, jaccard_score
from torch.utils.data import DataLoader

from sclera.data import read_mask
from sclera.sets import encoding_of
from tests.cli import REPO, run_cli


def compose_cfg(overrides=()):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=["task=sclera", "logger=none", *overrides])


@pytest.fixture(scope="module")
def task_and_root(tmp_path_factory):
    from sclera.task import ScleraTask
    root = tmp_path_factory.mktemp("sclera_root")
    task = ScleraTask(compose_cfg(["data.synth.train_per_set=2", "data.synth.val_per_set=1",
                                   "data.synth.eval_per_set=2", "data.batch_size=4"]))
    task.synthesize(root, seed=3)
    return task, root


def run_model(task, dataset, model):
    loader = DataLoader(dataset, batch_size=4, collate_fn=task.collate)
    with torch.no_grad():
        return [(model(batch), batch) for batch in loader]


def test_submission_tree_and_eval_scores_match_the_files(task_and_root, tmp_path):
    task, root = task_and_root
    torch.manual_seed(0)
    model = task.build_model({}).eval()
    torch.nn.init.normal_(model.head.out.weight, std=3.0)     # an untrained model: spread its output
    metric = task.build_metric({})
    for outputs, batch in run_model(task, task.datasets(root, "eval")["eval"], model):
        metric.update(outputs, batch)
    reported = metric.compute()
    written = task.write_predictions(run_model(task, task.datasets(root, "predict")["predict"], model), tmp_path, {})
    base = tmp_path / "Mixed"
    assert list(written.values()) == [base]
    scores = {}
    for set_dir in sorted((root / "Evaluation").iterdir()):
        for image in sorted((set_dir / "Images").iterdir()):
            binarised = Image.open(base / set_dir.name / "Binarised" / f"{image.stem}.png")
            predicted = Image.open(base / set_dir.name / "Predictions" / f"{image.stem}.png")
            assert binarised.mode == predicted.mode == "L" and binarised.size == predicted.size == (400, 300)
            b, p = np.asarray(binarised), np.asarray(predicted)
            assert set(np.unique(b)) <= {0, 255} and len(np.unique(p)) > 2
            truth = read_mask(set_dir / "Masks" / f"{image.stem}.png", encoding_of(task.cfg.data, set_dir.name))
            scores.setdefault(set_dir.name, []).append(
                (f1_score(truth.ravel(), b.ravel() // 255, zero_division=1.0),
                 jaccard_score(truth.ravel(), b.ravel() // 255, zero_division=1.0),
                 np.abs(p.ravel() / 255.0 - truth.ravel()).mean()))
    assert sorted(scores) == ["MOBIUS", "SMD+SLD", "Synthetic"]
    pooled = np.array([s for rows in scores.values() for s in rows])
    assert reported["f1"] == pytest.approx(pooled[:, 0].mean(), abs=1e-9)
    assert reported["iou"] == pytest.approx(pooled[:, 1].mean(), abs=1e-9)
    assert reported["mae"] == pytest.approx(pooled[:, 2].mean(), abs=1e-9)
    for name, rows in scores.items():
        assert reported[f"{name}/f1"] == pytest.approx(np.mean([r[0] for r in rows]), abs=1e-9)


def test_threshold_and_track_come_from_config(task_and_root, tmp_path):
    from sclera.task import ScleraTask
    _, root = task_and_root
    task = ScleraTask(compose_cfg(["task.track=Synthetic", "metric.threshold=0.9"]))
    batch = {"set": ["S"], "stem": ["x"], "height": torch.tensor([3]), "width": torch.tensor([4])}
    logits = torch.logit(torch.full((1, 1, 3, 4), 0.8))
    task.write_predictions([({"logits": logits}, batch)], tmp_path, {})
    assert np.asarray(Image.open(tmp_path / "Synthetic/S/Binarised/x.png")).max() == 0      # 0.8 < 0.9
    assert np.asarray(Image.open(tmp_path / "Synthetic/S/Predictions/x.png")).max() == 204
    with pytest.raises(ValueError, match="task.track='Real'"):
        ScleraTask(compose_cfg(["task.track=Real"]))


def test_media_overlay_and_oof_rows(task_and_root):
    task, root = task_and_root
    val = task.datasets(root, "fit")["val"]
    batch = task.collate([val[0], val[1]])
    logits = (batch["mask"] * 20 - 10)                  # a perfect prediction
    logged = []

    class Logger:
        def log_images(self, name, images, step, captions=None):
            logged.append((name, images, step, captions))

    task.log_media(Logger(), {"logits": logits}, batch, {}, step=7)
    name, images, step, captions = logged[0]
    assert name == "val/sclera_overlay" and step == 7 and len(images) == 2 and len(captions) == 2
    image = images[0]
    assert image.dtype == np.uint8 and image.shape == (112, 112, 3)
    sclera = batch["mask"][0, 0].numpy() > 0
    raw = (batch["image"][0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    np.testing.assert_array_equal(image[~sclera], raw[~sclera])       # untouched outside the masks
    assert (image[sclera][:, 2].astype(int) < raw[sclera][:, 2]).all()  # red + green tint lowers blue
    rows = task.oof_rows({"logits": logits}, batch, {})
    assert [r["stem"] for r in rows] == batch["stem"] and all(r["f1"] == 1.0 for r in rows)
    assert len(set(task.cv_groups(task.datasets(root, "cv")["train"]))) == len(task.datasets(root, "cv")["train"])


def test_default_run_trains_evaluates_and_predicts(tmp_path):
    """The embedded default (tiny backbone, synthetic eyes) through run.py; F1 >= 0.9 on every eval set."""
    cache = tmp_path / "cache"
    run_cli(["task=sclera"], tmp_path / "train", cache)
    ckpt = tmp_path / "train" / "checkpoints" / "best.pt"
    run_cli(["task=sclera", "mode=eval", f"ckpt_path={ckpt}"], tmp_path / "eval", cache)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for name in ("MOBIUS", "SMD+SLD", "Synthetic"):
        assert metrics[f"eval/{name}/f1"] >= 0.9, metrics
    run_cli(["task=sclera", "mode=predict", f"ckpt_path={ckpt}"], tmp_path / "predict", cache)
    for name in ("MOBIUS", "SMD+SLD", "Synthetic"):
        for kind in ("Predictions", "Binarised"):
            assert len(list((tmp_path / "predict" / "Mixed" / name / kind).glob("*.png"))) == 16


@pytest.mark.parametrize("preset, track, masd", [("sclera_cgdseg_synthetic", "Synthetic", 0),
                                                 ("sclera_cgdseg_mixed", "Mixed", 3)])
def test_presets_reproduce_the_reference_recipe(preset, track, masd):
    from common.optim import tag_of
    from sclera.task import ScleraTask
    cfg = compose_cfg([f"experiment={preset}", "backbone.weights=null", "model.grounding.kind=none"])
    assert (cfg.task.track, cfg.data.train_sets.MASD.factor, cfg.data.batch_size) == (track, masd, 32)
    assert (cfg.trainer.max_epochs, cfg.trainer.grad_clip, cfg.trainer.optim.lr, cfg.peft.lr) == (70, 1.0, 1e-4, 1e-5)
    assert cfg.trainer.optim.weight_decay == 1e-4 and cfg.trainer.optim.lr * cfg.trainer.schedule.min_lr_ratio == pytest.approx(1e-6)
    assert (cfg.peft.name, cfg.peft.r, cfg.peft.alpha, list(cfg.peft.targets)) == ("lora", 8, 16, ["qkv"])
    assert cfg.model.grounding.heads == 4 and list(cfg.model.fpn_channels) == [96, 192, 384]
    model = ScleraTask(cfg).build_model({}).eval()
    images = torch.rand(1, 3, *cfg.data.image_size)
    with torch.no_grad():
        grid = model.features(images)
        levels = model.fpn(grid, (256, 256))
        logits = model({"image": images})["logits"]
    assert grid.shape[-2:] == (18, 18) and logits.shape == (1, 1, 256, 256)
    assert [tuple(lv.shape[1:]) for lv in levels] == [(96, 64, 64), (192, 32, 32), (384, 16, 16)]
    tags = {tag_of(f"model.{n}") for n, p in model.named_parameters() if p.requires_grad}
    assert tags == {"adapter", "head"}
