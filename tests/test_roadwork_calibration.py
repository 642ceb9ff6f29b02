"""task.calibrate: the logit shift makes 0.5 the MCC-best threshold of the validation split."""
import json
import math

import pytest
import torch
from hydra import compose, initialize_config_dir

from tests.cli import REPO, run_cli


def _task(overrides):
    from common.training.parts import load_task
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return load_task(compose(config_name="config", overrides=["task=roadwork", *overrides]))


def test_shift_is_minus_the_logit_of_the_best_threshold():
    task = _task(["task.calibrate=true"])
    model = torch.nn.Module()
    model.register_buffer("logit_shift", torch.zeros(()))
    task.on_validation_end(model, {"threshold_best": 0.3})
    assert float(model.logit_shift) == pytest.approx(-math.log(0.3 / 0.7))
    task.on_validation_end(model, {"threshold_best": 0.5})       # already calibrated: unchanged
    assert float(model.logit_shift) == pytest.approx(-math.log(0.3 / 0.7))
    off = _task([])
    off.on_validation_end(model, {"threshold_best": 0.9})
    assert float(model.logit_shift) == pytest.approx(-math.log(0.3 / 0.7))


@pytest.mark.slow
def test_calibrated_checkpoint_scores_best_threshold_at_half(tmp_path):
    cache = tmp_path / "cache"
    run_cli(["task=roadwork", "trainer=debug", "task.calibrate=true", "trainer.limit_val_batches=null"],
            tmp_path / "train", cache)
    ckpt = torch.load(tmp_path / "train" / "checkpoints" / "best.pt", weights_only=True)
    assert float(ckpt["model"]["logit_shift"]) != 0.0
    run_cli(["task=roadwork", "mode=eval", f"ckpt_path={tmp_path / 'train' / 'checkpoints' / 'best.pt'}"],
            tmp_path / "eval", cache)
    best_epoch = json.loads((tmp_path / "train" / "metrics.json").read_text())["best"]
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert evaluated["eval/mcc"] == pytest.approx(best_epoch["val/mcc_best"], abs=0.02)


def test_breakdown_table_rows_from_metrics():
    from roadwork.metric import breakdown_rows
    metrics = {"val/mcc": 0.9, "val/weather/rain/mcc": 0.5, "val/weather/rain/accuracy": 0.75,
               "val/weather/rain/n": 12.0, "val/region/Sydney/mcc": 1.0, "val/region/Sydney/accuracy": 1.0,
               "val/region/Sydney/n": 4.0, "epoch": 3}
    assert breakdown_rows(metrics) == [["region", "Sydney", 4, 1.0, 1.0], ["weather", "rain", 12, 0.5, 0.75]]

    metric = _task([]).build_metric({})
    assert metric.tables(metrics) == {"breakdown": (["field", "value", "n", "mcc", "accuracy"],
                                                    breakdown_rows(metrics))}
    assert metric.tables({"val/mcc": 0.9}) == {}
