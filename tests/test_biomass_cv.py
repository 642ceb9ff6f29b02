"""biomass: balanced grouped folds shared by mode=train and mode=cv, cv.checkpoint, per-fold metrics.json,
per-epoch UW / PCGrad logs, the log1p metric variants, synthetic missing labels, CPU smoke runs of the presets."""
from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pytest
from omegaconf import OmegaConf
from sklearn.metrics import r2_score

from biomass.constants import OFFICIAL_WEIGHTS, TARGETS
from biomass.data import group_keys
from biomass.metric import biomass_scores
from biomass.synth import SynthConfig, write_synthetic
from biomass.table import missing_counts, read_train_table, report_missing
from biomass.task import BiomassTask
from common.data.folds import assign_folds
from common.inference.predictor import checkpoint_paths
from tests.cli import run_cli

SMALL = SynthConfig(n_train=30, n_test=4, width=112, height=56, missing_share=0.4)


def test_biomass_folds_are_grouped_and_balanced_in_size():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(40), rng.integers(1, 20, 40)).astype(str)
    task = BiomassTask(OmegaConf.create({}))
    folds = task.cv_folds(groups, 5, seed=0)
    sizes = np.bincount(folds)
    for g in np.unique(groups):
        assert len(set(folds[groups == g])) == 1
    shuffled = np.bincount(assign_folds(groups, 5, seed=0))
    assert sizes.max() - sizes.min() <= 19 and sizes.max() - sizes.min() < shuffled.max() - shuffled.min()
    with pytest.raises(ValueError, match="only 40"):
        task.cv_folds(groups, 41, seed=0)


def test_train_validates_on_the_named_cv_fold(tmp_path):
    write_synthetic(tmp_path, seed=1, cfg=SMALL)
    cfg = OmegaConf.create({"seed": 7, "task": {"name": "biomass"}, "cv": {"folds": 3},
                            "model": {"metadata": {"mode": "none"}},
                            "data": {"train_csv": "train.csv", "test_csv": "test.csv", "skip_bad": False,
                                     "n_folds": "${cv.folds}", "val_fold": 2, "image_size": [56, 112],
                                     "decode_scale": 0, "cache_features": False, "augment": None,
                                     "image_cache": None}})
    task = BiomassTask(cfg)
    fit = task.datasets(tmp_path, "fit")
    table = task.datasets(tmp_path, "cv")["val"].table
    folds = task.cv_folds(group_keys(table), 3, seed=7)
    assert list(fit["val"].table["image_id"]) == list(table["image_id"][folds == 2])
    assert len(fit["train"]) + len(fit["val"]) == len(table)


def test_synthetic_missing_labels_keep_images_and_are_counted(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    write_synthetic(tmp_path / "full", seed=1, cfg=SynthConfig(**{**vars(SMALL), "missing_share": 0.0}))
    write_synthetic(tmp_path / "gaps", seed=1, cfg=SMALL)
    full, gaps = read_train_table(tmp_path / "full"), read_train_table(tmp_path / "gaps")
    assert list(full["image_id"]) == list(gaps["image_id"])
    lacking = gaps[list(TARGETS)].isna().any(axis=1)
    assert lacking.sum() == round(0.4 * 30) and gaps[list(TARGETS)].isna().sum(axis=1).max() <= 2
    observed = gaps[list(TARGETS)].notna().to_numpy()
    np.testing.assert_array_equal(gaps[list(TARGETS)].to_numpy()[observed], full[list(TARGETS)].to_numpy()[observed])
    assert (tmp_path / "full" / "train" / f"{full['image_id'][0]}.jpg").read_bytes() == \
        (tmp_path / "gaps" / "train" / f"{full['image_id'][0]}.jpg").read_bytes()
    counts = report_missing(gaps, tmp_path / "gaps" / "train.csv")
    assert counts == missing_counts(gaps) == {t: int(gaps[t].isna().sum()) for t in TARGETS}
    assert f"{sum(counts.values())} masked (missing) labels" in caplog.text


def test_log1p_variants_match_independent_computations():
    rng = np.random.default_rng(2)
    true = rng.gamma(2.0, 20.0, (40, 5))
    pred = true * rng.uniform(0.6, 1.4, true.shape)
    mask = (rng.random(true.shape) > 0.1).astype(float)
    baseline = [25.0, 40.0, 10.0, 60.0, 90.0]
    scores = biomass_scores(true, pred, mask, baseline)
    obs = mask > 0
    w = np.broadcast_to([OFFICIAL_WEIGHTS[t] for t in TARGETS], true.shape)
    assert scores["r2_log1p_global"] == pytest.approx(
        r2_score(np.log1p(true[obs]), np.log1p(pred[obs]), sample_weight=w[obs]), rel=1e-10)
    per_target = []
    for j in range(5):
        y, yhat = np.log1p(true[obs[:, j], j]), np.log1p(pred[obs[:, j], j])
        per_target.append(1 - ((y - yhat) ** 2).sum() / ((y - np.log1p(baseline[j])) ** 2).sum())
    weights = np.array([OFFICIAL_WEIGHTS[t] for t in TARGETS])
    assert scores["r2_log1p_global_baseline"] == pytest.approx(np.dot(weights, per_target) / weights.sum())
    assert "r2_log1p_global_baseline" not in biomass_scores(true, pred, mask)


@pytest.mark.slow
def test_cv_uses_last_checkpoint_writes_fold_metrics_and_logs_uw_pcgrad(tmp_path):
    small = ["data.synth.n_train=24", "data.synth.n_test=4", "data.synth.width=112", "data.synth.height=56",
             "data.image_size=[56,112]", "data.batch_size=4", "data.num_workers=0"]
    proc = run_cli(["task=biomass", "mode=cv", "cv.folds=2", "trainer=debug", "trainer.limit_val_batches=null",
                    "loss.balancing=uw", "loss.uw_divide=true", "trainer.pcgrad.enabled=true",
                    "trainer.pcgrad.primary=[total,ratio,weighted]", "trainer.pcgrad.groups=[head]", *small],
                   tmp_path / "cv", tmp_path / "cache")
    assert "[cv] fold sizes: " in proc.stdout and "masked (missing) labels" in proc.stdout
    oof = list(csv.DictReader(open(tmp_path / "cv" / "oof.csv")))
    for fold in (0, 1):
        fold_dir = tmp_path / "cv" / f"fold_{fold}"
        summary = json.loads((fold_dir / "metrics.json").read_text())
        assert summary["checkpoint"] == str(fold_dir / "checkpoints" / "last.pt")
        rows = [r for r in oof if r["fold"] == str(fold)]
        true = np.array([[float(r[f"true_{t}"]) for t in TARGETS] for r in rows])
        pred = np.array([[float(r[f"pred_{t}"]) for t in TARGETS] for r in rows])
        expected = biomass_scores(np.nan_to_num(true), pred, (~np.isnan(true)).astype(float))
        assert summary["size"] == len(rows)
        assert summary["val/r2_weighted"] == pytest.approx(expected["r2_weighted"], abs=1e-4)
        assert "val/r2_log1p_global_baseline" in summary
        epochs = [json.loads(line) for line in (fold_dir / "metrics.jsonl").read_text().splitlines()]
        for record in epochs:
            assert record["train/pcgrad/pairs"] > 0 and "train/pcgrad/conflicts" in record
            assert set(f"train/uw/log_var/{k}" for k in ("total", "ratio", "weighted", "state")) <= set(record)
    assert checkpoint_paths(tmp_path / "cv", "last") == [tmp_path / "cv" / f"fold_{k}" / "checkpoints" / "last.pt"
                                                         for k in (0, 1)]
    with pytest.raises(ValueError, match="cv.checkpoint"):
        checkpoint_paths(tmp_path / "cv", "final")


@pytest.mark.parametrize("preset", ["biomass_csiro_vitdet", "biomass_halves_dinov3_l"])
@pytest.mark.slow
def test_presets_smoke_run_on_cpu(preset, tmp_path):
    run_cli([f"experiment={preset}", "+smoke=biomass_cpu"], tmp_path / "run", tmp_path / "cache")
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["last"]["epoch"] == 0 and np.isfinite(summary["last"]["train/loss"])
