"""biomass end to end through run.py: the embedded default trains to R2 >= 0.8 on held-out synthetic
images, then mode=predict writes submission.csv and scores it against test_solution.csv."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from tests.cli import run_cli, synthetic_root


@pytest.mark.slow
def test_default_train_then_predict_reaches_r2(tmp_path):
    cache = tmp_path / "cache"
    run_cli(["task=biomass"], tmp_path / "train", cache)
    summary = json.loads((tmp_path / "train" / "metrics.json").read_text())
    assert summary["best_value"] >= 0.8, summary
    ckpt = tmp_path / "train" / "checkpoints" / "best.pt"
    proc = run_cli(["task=biomass", "mode=predict", f"ckpt_path={ckpt}"], tmp_path / "predict", cache)
    assert "submission.csv vs test_solution.csv" in proc.stdout
    sub = pd.read_csv(tmp_path / "predict" / "submission.csv")
    test = pd.read_csv(synthetic_root(tmp_path / "train") / "test.csv")
    assert list(sub.columns) == ["sample_id", "target"]
    assert list(sub["sample_id"]) == list(test["sample_id"]) and (sub["target"] >= 0).all()
    scores = json.loads((tmp_path / "predict" / "submission_scores.json").read_text())
    assert scores["r2_weighted"] >= 0.8, scores
