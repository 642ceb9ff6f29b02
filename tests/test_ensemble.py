"""Predict-time ensembles: weighted means, validation-metric weights, and stacking on out-of-fold predictions
(unit checks against numpy / sklearn, and roadwork end to end through run.py with two tiny 2-fold cv runs)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from sklearn.linear_model import LogisticRegression
from torch import nn

from common.inference import predictor as inference
from common.inference.ensemble import WeightedEnsemble, align_oof, metric_weights
from common.runs import app
from roadwork.stacking import stack_members
from tests.cli import REPO, TOY, run_cli


class Fixed(nn.Module):
    """A member whose outputs are rows of fixed tables, indexed by batch["index"]."""

    def __init__(self, prob: np.ndarray, features: np.ndarray):
        super().__init__()
        self.prob, self.features = torch.tensor(prob, dtype=torch.float32), torch.tensor(features, dtype=torch.float32)

    def forward(self, batch):
        i = batch["index"]
        return {"prob": self.prob[i], "features": self.features[i], "label_guess": (self.prob[i] > 0.5).long()}


def _ckpt(value, direction="maximize", monitor="val/mcc"):
    return {"config": {"trainer": {"monitor": monitor, "monitor_direction": direction}},
            "fit_state": {"best_value": value}}


def test_weighted_ensemble_is_numpy_weighted_average():
    rng = np.random.default_rng(0)
    probs, feats = rng.random((3, 5)), rng.normal(size=(3, 5, 4))
    members = [Fixed(probs[m], feats[m]) for m in range(3)]
    batch = {"index": torch.arange(5)}
    out = WeightedEnsemble(members, [2.0, 1.0, 1.0])(batch)
    np.testing.assert_allclose(out["prob"].numpy(), np.average(probs, axis=0, weights=[2, 1, 1]), rtol=1e-6)
    np.testing.assert_allclose(out["features"].numpy(), np.average(feats, axis=0, weights=[2, 1, 1]), rtol=1e-5)
    assert torch.equal(out["label_guess"], members[0](batch)["label_guess"])   # non-floating: first member's
    equal = WeightedEnsemble(members)(batch)
    np.testing.assert_allclose(equal["prob"].numpy(), probs.mean(0), rtol=1e-6)
    with pytest.raises(ValueError, match="one weight per model"):
        WeightedEnsemble(members, [1.0, 1.0])


def test_metric_weights_from_best_values():
    assert metric_weights([("a.pt", _ckpt(0.6)), ("b.pt", _ckpt(0.2))]) == pytest.approx([0.75, 0.25])
    assert metric_weights([("a.pt", _ckpt(0.5)), ("b.pt", _ckpt(-0.3))]) == pytest.approx([1.0, 0.0])


@pytest.mark.parametrize("ckpts, message", [
    ([("a.pt", _ckpt(0.4, direction="minimize", monitor="val/loss")), ("b.pt", _ckpt(0.2))], "maximised metric"),
    ([("a.pt", _ckpt(0.0)), ("b.pt", _ckpt(-0.1))], "every checkpoint's best val/mcc is <= 0"),
    ([("a.pt", _ckpt(0.3)), ("b.pt", _ckpt(float("nan")))], "checkpoint b.pt has no finite best"),
    ([("a.pt", _ckpt(0.3)), ("b.pt", _ckpt(None))], "checkpoint b.pt has no finite best"),
    ([("a.pt", _ckpt(0.3)), ("b.pt", _ckpt(0.3, monitor="val/auc"))], "different metrics"),
])
def test_metric_weights_refuses(ckpts, message):
    with pytest.raises(ValueError, match=message):
        metric_weights(ckpts)


def _oof(images, labels, probs):
    return pd.DataFrame({"fold": 0, "image": images, "label": labels, "probability": probs})


def test_stacked_meta_model_equals_sklearn():
    rng = np.random.default_rng(1)
    n = 200
    labels = rng.integers(0, 2, n)
    probs = np.clip(np.stack([0.5 + 0.3 * (labels - 0.5) + 0.2 * rng.normal(size=n),
                              rng.random(n)], axis=1), 0.0, 1.0)       # member 0 informative, member 1 noise
    images = np.array([f"img{i}.jpg" for i in range(n)])
    order = rng.permutation(n)                                          # rows of the second file shuffled
    frames = {"a/oof.csv": _oof(images, labels, probs[:, 0]),
              "b/oof.csv": _oof(images[order], labels[order], probs[order, 1])}
    test_probs = rng.random((2, 7))
    members = [Fixed(test_probs[m], np.zeros((7, 3)) + m) for m in range(2)]
    stacked = stack_members(members, frames, c=0.5, eps=1e-6)

    logit = lambda p: np.log(np.clip(p, 1e-6, 1 - 1e-6)) - np.log1p(-np.clip(p, 1e-6, 1 - 1e-6))
    reference = LogisticRegression(C=0.5).fit(logit(probs), labels)
    out = stacked({"index": torch.arange(7)})
    expected = reference.predict_proba(logit(test_probs.T))[:, 1]
    np.testing.assert_allclose(out["prob"].numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(torch.sigmoid(out["logits"][:, 1] - out["logits"][:, 0]).numpy(), expected, atol=1e-5)
    assert torch.equal(out["features"], torch.zeros(7, 3))              # the first member's other outputs
    assert stacked.summary()["coefficients"] == pytest.approx(reference.coef_[0].tolist(), rel=1e-5)
    assert reference.coef_[0][0] > abs(reference.coef_[0][1])           # the informative member dominates


def test_misaligned_oof_files_are_refused():
    a = _oof(["x.jpg", "y.jpg", "z.jpg"], [0, 1, 0], [0.2, 0.8, 0.3])
    b = _oof(["x.jpg", "y.jpg", "w.jpg"], [0, 1, 0], [0.1, 0.9, 0.4])
    with pytest.raises(ValueError, match=r"cover different items: b/oof.csv has 1 images not in a/oof.csv"):
        align_oof({"a/oof.csv": a, "b/oof.csv": b}, "image", "probability", "label")
    c = _oof(["x.jpg", "y.jpg", "z.jpg"], [0, 0, 0], [0.1, 0.9, 0.4])
    with pytest.raises(ValueError, match=r"c/oof.csv and a/oof.csv disagree on the label of image 'y.jpg'"):
        align_oof({"a/oof.csv": a, "c/oof.csv": c}, "image", "probability", "label")
    with pytest.raises(ValueError, match="'x.jpg' appears more than once"):
        align_oof({"a/oof.csv": pd.concat([a, a])}, "image", "probability", "label")


def test_task_without_stacking_says_so(tmp_path):
    """inference.stack null (the toy task, biomass, sclera): weighting=stack is refused before any checkpoint is read."""
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*TOY, "mode=predict", "inference.weighting=stack",
                                           f"ckpt_path=[{tmp_path / 'cv_a'}]"])
    assert cfg.inference.stack is None
    with pytest.raises(ValueError, match=r"task toy has no stacking \(inference.stack is null\); use "
                                         r"inference.weighting=mean or metric"):
        inference.load_predictor(cfg, cfg.ckpt_path)


def test_checkpoint_paths_expand_cv_directories(tmp_path):
    for run, folds in (("cv1", 2), ("cv2", 1)):
        for k in range(folds):
            (tmp_path / run / f"fold_{k}" / "checkpoints").mkdir(parents=True)
            (tmp_path / run / f"fold_{k}" / "checkpoints" / "best.pt").write_bytes(b"")
    single = tmp_path / "single.pt"
    assert inference.checkpoint_paths([tmp_path / "cv1", single, tmp_path / "cv2"]) == [
        tmp_path / "cv1/fold_0/checkpoints/best.pt", tmp_path / "cv1/fold_1/checkpoints/best.pt", single,
        tmp_path / "cv2/fold_0/checkpoints/best.pt"]
    with pytest.raises(FileNotFoundError, match="without fold_"):
        inference.checkpoint_paths([tmp_path])
    with pytest.raises(FileNotFoundError, match=r"cv1/oof.csv not found; ckpt_path must list mode=cv run"):
        inference._read_oof(tmp_path / "cv1")


# ---- end to end (roadwork, run.py) ------------------------------------------------------------
SMALL = ["task=roadwork", "trainer=debug", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
         "data.synth.splits.train.count=24", "data.synth.splits.val.count=8", "data.synth.splits.test.count=6",
         "data.synth.splits.train224.count=2", "data.synth.splits.val224.count=2", "data.batch_size=8"]


@pytest.fixture(scope="module")
def cv_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("ensemble")
    runs = [base / "cv_a", base / "cv_b"]
    for seed, run_dir in zip((1, 2), runs):
        run_cli([*SMALL, "mode=cv", "cv.folds=2", f"seed={seed}"], run_dir, base / "cache")
    return base, runs


def _predict(base, name, args, in_process=True):
    """mode=predict through run.py (in_process=False) or through common.runs.app.run in this process (faster)."""
    if in_process:
        with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=[*SMALL, "mode=predict", "logger=none", *args, f"paths.root_dir={REPO}",
                                               f"paths.output_dir={base / name}", f"paths.cache_dir={base / 'cache'}"])
        app.run(cfg)
    else:
        run_cli([*SMALL, "mode=predict", *args], base / name, base / "cache")
    frame = pd.read_csv(base / name / "predictions.csv").set_index("image").sort_index()
    assert frame["probability"].between(0, 1).all()
    assert (frame["prediction"] == (frame["probability"] >= 0.5).astype(int)).all()
    return frame, json.loads((base / name / "metrics.json").read_text())


@pytest.mark.slow
def test_predict_stack_and_metric_end_to_end(cv_runs):
    base, (cv_a, cv_b) = cv_runs
    p_a, _ = _predict(base, "pred_a", [f"ckpt_path={cv_a}"])                # the mean of cv_a's folds
    p_b, _ = _predict(base, "pred_b", [f"ckpt_path={cv_b}"])
    stacked, summary = _predict(base, "pred_stack", ["inference.weighting=stack", f"ckpt_path=[{cv_a},{cv_b}]"],
                                in_process=False)
    assert len(stacked) == 6 and summary["ensemble"]["weighting"] == "stack"
    w, b = np.array(summary["ensemble"]["coefficients"]), summary["ensemble"]["intercept"]
    assert w.shape == (2,)
    logit = lambda p: np.log(np.clip(p, 1e-6, 1 - 1e-6)) - np.log1p(-np.clip(p, 1e-6, 1 - 1e-6))
    z = w[0] * logit(p_a["probability"].to_numpy()) + w[1] * logit(p_b["probability"].to_numpy()) + b
    np.testing.assert_allclose(stacked["probability"].to_numpy(), 1 / (1 + np.exp(-z)), atol=1e-5)

    for run_dir, value in ((cv_a, 0.6), (cv_b, 0.2)):      # copies whose folds carry known validation values
        copy = base / f"{run_dir.name}_metric"
        shutil.copytree(run_dir, copy, dirs_exist_ok=True)
        for path in copy.glob("fold_*/checkpoints/best.pt"):
            ckpt = torch.load(path, weights_only=True)
            ckpt["fit_state"]["best_value"] = value
            torch.save(ckpt, path)
    weighted, summary = _predict(base, "pred_metric", ["inference.weighting=metric",
                                                       f"ckpt_path=[{base / 'cv_a_metric'},{base / 'cv_b_metric'}]"])
    assert summary["ensemble"]["weights"] == pytest.approx([0.375, 0.375, 0.125, 0.125])
    # members averaged in logit space (inference.ensemble.combine=logit, the plan's default): p_a, p_b are their
    # runs' fold means there, so the weighted ensemble is sigmoid(0.75 logit(p_a) + 0.25 logit(p_b))
    z = 0.75 * logit(p_a["probability"].to_numpy()) + 0.25 * logit(p_b["probability"].to_numpy())
    np.testing.assert_allclose(weighted["probability"].to_numpy(), 1 / (1 + np.exp(-z)), atol=1e-5)
