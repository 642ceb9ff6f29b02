"""Sclera task: the SSBC submission tree, eval numbers equal to scoring the written files with
sklearn, media overlays, and the embedded default end to end through run.py."""
import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader

from tests.cli import REPO, run_cli
from tests.test_sclera_metric import ssbc_reference


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


def test_submission_tree_and_eval_scores_match_ssbc_on_the_files(task_and_root, tmp_path):
    task, root = task_and_root
    eval_set, predict_set = task.datasets(root, "eval")["eval"], task.datasets(root, "predict")["predict"]
    torch.manual_seed(0)
    model = task.build_model({}).eval()          # grounding: the tiny CLIP of the synthetic dataset
    assert model.grounding is not None
    torch.nn.init.normal_(model.head.out.weight, std=3.0)     # an untrained model: spread its output
    metric = task.build_metric({})
    for outputs, batch in run_model(task, eval_set, model):
        metric.update(outputs, batch)
    reported = metric.compute()
    written = task.write_predictions(run_model(task, predict_set, model), predict_set, tmp_path, {})
    base = tmp_path / "CGDSeg" / "Mixed"
    assert list(written.values()) == [base]
    scores = {}
    for set_dir in sorted((root / "Evaluation").iterdir()):
        for image in sorted((set_dir / "Images").iterdir()):
            name = f"{image.stem}.png"
            binarised, predicted = base / set_dir.name / "Binarised" / name, base / set_dir.name / "Predictions" / name
            with Image.open(binarised) as b, Image.open(predicted) as p:
                assert b.mode == p.mode == "L" and b.size == p.size == (400, 300)
                assert set(np.unique(b)) <= {0, 255} and len(np.unique(p)) > 2
            scores.setdefault(set_dir.name, []).append(ssbc_reference(set_dir / "Masks" / name, binarised, predicted))
    assert sorted(scores) == ["MOBIUS", "SMD+SLD", "Synthetic"]
    pooled = [row for rows in scores.values() for row in rows]
    for key in pooled[0]:
        assert reported[key] == pytest.approx(np.mean([r[key] for r in pooled]), abs=1e-9), key
        for name, rows in scores.items():
            assert reported[f"{name}/{key}"] == pytest.approx(np.mean([r[key] for r in rows]), abs=1e-9)


def test_threshold_size_team_and_track_come_from_config(task_and_root, tmp_path):
    from sclera.task import ScleraTask
    task = ScleraTask(compose_cfg(["task.track=Synthetic", "metric.threshold=0.9", "task.submission.team=Us"]))
    batch = {"set": ["S"], "stem": ["x"], "height": torch.tensor([3]), "width": torch.tensor([4])}
    logits = torch.logit(torch.full((1, 1, 3, 4), 0.8))
    task.write_predictions([({"logits": logits}, batch)], None, tmp_path, {})
    binarised, predicted = Image.open(tmp_path / "Us/Synthetic/S/Binarised/x.png"), Image.open(
        tmp_path / "Us/Synthetic/S/Predictions/x.png")
    assert binarised.size == predicted.size == (400, 300)             # the benchmark's size, not the image's
    assert np.asarray(binarised).max() == 0 and np.asarray(predicted).max() == 204      # 0.8 < 0.9
    with pytest.raises(ValueError, match="task.track='Real'"):
        ScleraTask(compose_cfg(["task.track=Real"]))
    with pytest.raises(ValueError, match="ckpt_path.Mixed: the checkpoint was trained for track 'Synthetic'"):
        task.check_prediction_group("Mixed")
    task.check_prediction_group("Synthetic")


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
    assert [r["stem"] for r in rows] == batch["stem"] and all(r["sclera_f1"] == 1.0 for r in rows)
    assert len(set(task.cv_groups(task.datasets(root, "cv")["train"]))) == len(task.datasets(root, "cv")["train"])


@pytest.mark.slow
def test_default_run_trains_evaluates_and_predicts_both_tracks(tmp_path):
    """The embedded default (tiny backbone, tiny CLIP grounding, synthetic eyes) through run.py: SSBC's binary
    F1 >= 0.9 on every eval set, parameter counts in the run directory, and one predict for both tracks."""
    cache = tmp_path / "cache"
    run_cli(["task=sclera"], tmp_path / "train", cache, timeout=1800)     # minutes alone, more on a shared CPU
    parameters = json.loads((tmp_path / "train" / "parameters.json").read_text())
    assert parameters["grounding"] > 0 and parameters["trainable"] == sum(
        parameters[k] for k in ("backbone_adapters", "grounding", "fpn", "decoder", "head"))
    ckpt = tmp_path / "train" / "checkpoints" / "best.pt"
    run_cli(["task=sclera", "mode=eval", f"ckpt_path={ckpt}"], tmp_path / "eval", cache)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for name in ("MOBIUS", "SMD+SLD", "Synthetic"):
        assert metrics[f"eval/{name}/Binary/F1"] >= 0.9, metrics
    synthetic = tmp_path / "synthetic.pt"            # the same weights, declared as the Synthetic track's
    state = torch.load(ckpt, weights_only=True)
    state["config"]["task"]["track"] = "Synthetic"
    torch.save(state, synthetic)
    run_cli(["task=sclera", "mode=predict", f"ckpt_path={{Synthetic:{synthetic},Mixed:{ckpt}}}"],
            tmp_path / "predict", cache)
    for track in ("Synthetic", "Mixed"):
        for name in ("MOBIUS", "SMD+SLD", "Synthetic"):
            for kind in ("Predictions", "Binarised"):
                assert len(list((tmp_path / "predict" / "CGDSeg" / track / name / kind).glob("*.png"))) == 16
    wrong = run_cli(["task=sclera", "mode=predict", f"ckpt_path={{Mixed:{synthetic}}}"], tmp_path / "wrong", cache,
                    check=False)
    assert wrong.returncode != 0 and "trained for track 'Synthetic'" in wrong.stderr


def test_eval_takes_whole_data_values_and_the_submission_from_the_command_line(monkeypatch):
    from common.inference import predictor as inference
    cfg = compose_cfg(["task.submission.team=FromRun", "paths.root_dir=/tmp", "paths.output_dir=/tmp/out",
                       "data.encodings={}"])
    ckpt_cfg = OmegaConf.to_container(compose_cfg(["task.track=Synthetic", "task.submission.team=FromCkpt",
                                                   "paths.root_dir=/tmp", "paths.output_dir=/tmp/out"]), resolve=True)
    ckpt_cfg["data"]["encodings"] = {"MOBIUS": "sip"}
    monkeypatch.setattr(inference, "_command_line_data_keys", lambda: ["encodings"])   # given on the command line
    merged = inference.config_from_checkpoint(cfg, {"config": ckpt_cfg})
    assert OmegaConf.to_container(merged.data.encodings) == {}           # replaced, not merged into {MOBIUS: sip}
    assert merged.task.track == "Synthetic" and merged.task.submission.team == "FromRun"
