"""roadwork through run.py on a small synthetic set: train (debug trainer), eval under the benchmark
protocol, predict -> predictions.csv. (The embedded default's MCC is measured by the full default run.)"""
from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from tests.cli import run_cli, synthetic_root

SMALL = ["data.synth.splits.train.count=40", "data.synth.splits.val.count=16", "data.synth.splits.test.count=6",
         "data.synth.splits.train224.count=4", "data.synth.splits.val224.count=4", "data.batch_size=8"]


@pytest.mark.slow
def test_train_eval_benchmark_predict(tmp_path):
    cache = tmp_path / "cache"
    (tmp_path / "deploy.csv").write_text("lat,lon\n52.50,13.40\n52.55,13.35\n48.85,2.35\n")
    gps = ["data.gps_sampling.enabled=true", "data.gps_sampling.clusters=2", f"data.gps_sampling.reference={tmp_path / 'deploy.csv'}"]
    proc = run_cli(["task=roadwork", "trainer=debug", *SMALL, *gps], tmp_path / "train", cache)
    check = proc.stdout.split("[data] GPS-weighted sampling: 2 centres from 3 reference coordinates")[1]
    shares = {line.split()[0]: line.split()[-2:] for line in check.splitlines()[2:7]}
    assert set(shares) == {"0-25", "25-100", "100-500", "500-inf", "unknown"}, check
    summary = json.loads((tmp_path / "train" / "metrics.json").read_text())
    assert {"val/mcc", "val/accuracy", "val/auc"} <= set(summary["last"]), summary
    ckpt = tmp_path / "train" / "checkpoints" / "best.pt"
    proc = run_cli(["task=roadwork", "mode=eval", "benchmark=true", "metric.validator.order=input",   # window check
                    f"ckpt_path={ckpt}", *SMALL],
                   tmp_path / "eval", cache)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert re.search(r"^metrics +eval/mcc ", proc.stdout, re.M) and str(tmp_path / "eval") in proc.stdout  # summary
    curve = pd.read_csv(tmp_path / "eval" / "validator_curve.csv")
    assert len(curve) == 16 and abs(metrics["eval/reward"] - curve["reward"].iloc[-1]) < 1e-12
    last = curve.tail(10)                                   # the validator's accuracy window
    expected = (0.5 * max(metrics["eval/mcc"], 0) + 0.5 * (last["prediction"] == last["label"]).mean()) ** 3
    assert abs(metrics["eval/reward"] - expected) < 1e-9     # 16 images < 100: the MCC window is all of them
    assert abs(metrics["eval/reward_mean"] - curve["reward"].mean()) < 1e-9
    confusion = pd.read_csv(tmp_path / "eval" / "confusion_matrix.csv")
    assert confusion[["predicted_0", "predicted_1"]].to_numpy().sum() == 16
    for name in ("confusion_matrix.png", "worst_errors.png", "worst_errors.csv", "breakdown.csv"):
        assert (tmp_path / "eval" / name).is_file(), name
    run_cli(["task=roadwork", "mode=predict", f"ckpt_path={ckpt}", *SMALL], tmp_path / "predict", cache)
    frame = pd.read_csv(tmp_path / "predict" / "predictions.csv")
    test_dir = synthetic_root(tmp_path / "predict") / "test"
    assert sorted(frame["image"]) == sorted(p.name for p in test_dir.glob("*.jpg"))
    assert frame["probability"].between(0, 1).all()
    assert (frame["prediction"] == (frame["probability"] > 0.5).astype(int)).all()     # 0.5 -> 0, as scored
    assert (frame["predicted"] == 1).all()
    run_cli(["task=roadwork", "mode=predict", f"ckpt_path={ckpt}", "inference/tta=roadwork", *SMALL],
            tmp_path / "tta", cache)
    tta = pd.read_csv(tmp_path / "tta" / "predictions.csv")
    assert (tta["image"] == frame["image"]).all() and tta["probability"].between(0, 1).all()
    assert (tta["probability"] - frame["probability"]).abs().max() > 1e-6     # the augmented copies count
