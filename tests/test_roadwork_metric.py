"""Roadwork metric (vs sklearn), benchmark reward, loss terms, predictions.csv."""
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef, roc_auc_score

from common.training.losses import focal_loss, view_consistency_kl
from roadwork.loss import RoadworkLoss
from roadwork.metric import RoadworkMetric, benchmark_reward, best_threshold
from roadwork.outputs import write_predictions_csv

VALIDATOR = {"mcc_window": 100, "accuracy_window": 10, "mcc_weight": 0.5, "accuracy_weight": 0.5, "exponent": 3.0,
             "order": "input", "length": None, "seed": 0}


def _metric(**kw):
    from omegaconf import OmegaConf
    return RoadworkMetric(breakdown=True, vocabularies={"weather": ["clear", "rain"]}, gps_clusters=2,
                          min_group_size=1, validator=OmegaConf.create(VALIDATOR), errors={}, **kw)


def test_metric_matches_sklearn_and_best_threshold():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 2, 200)
    prob = np.clip(0.35 * label + rng.uniform(0, 0.65, 200), 0, 1)
    weather = rng.integers(0, 3, 200)
    gps = np.where(rng.random((200, 1)) < 0.5, [52.6, 13.3], [35.6, 139.8])
    prob[:7] = 0.5                                  # exact ties: the validator rounds them to 0
    metric = _metric(benchmark=True)
    for sl in (slice(0, 120), slice(120, 200)):
        metric.update({"prob": torch.tensor(prob[sl])},
                      {"label": torch.tensor(label[sl]), "weather": torch.tensor(weather[sl]),
                       "image": [f"{i}.jpg" for i in range(200)[sl]],
                       "gps": torch.tensor(gps[sl]), "gps_known": torch.ones(len(label[sl]))})
    out = metric.compute()
    pred = (prob > 0.5).astype(int)
    assert out["mcc"] == pytest.approx(matthews_corrcoef(label, pred))
    assert out["accuracy"] == pytest.approx(accuracy_score(label, pred))
    assert out["f1"] == pytest.approx(f1_score(label, pred))
    assert out["auc"] == pytest.approx(roc_auc_score(label, prob))
    brute = max(matthews_corrcoef(label, (prob >= t).astype(int)) for t in np.unique(prob))
    assert out["mcc_best"] == pytest.approx(brute)
    assert matthews_corrcoef(label, (prob >= out["threshold_best"]).astype(int)) == pytest.approx(brute)
    window = slice(100, 200), slice(190, 200)           # the validator's last 100 / last 10, in input order
    expected = (0.5 * max(matthews_corrcoef(label[window[0]], pred[window[0]]), 0)
                + 0.5 * accuracy_score(label[window[1]], pred[window[1]])) ** 3
    assert out["reward"] == pytest.approx(expected)
    sel = weather == 2
    assert out["weather/rain/mcc"] == pytest.approx(matthews_corrcoef(label[sel], pred[sel]))
    sel = gps[:, 0] > 40
    assert out["gps_cluster/52.60,13.30/accuracy"] == pytest.approx(accuracy_score(label[sel], pred[sel]))
    assert out["gps_cluster/35.60,139.80/n"] == float((~sel).sum())


def test_reward_clips_negative_mcc_and_unlabelled_rows_are_ignored():
    assert benchmark_reward(-0.4, 0.5) == pytest.approx(0.25 ** 3)
    assert best_threshold(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))[1] == pytest.approx(
        matthews_corrcoef([0, 0, 1, 1], [0, 1, 1, 1]))
    metric = _metric()
    metric.update({"prob": torch.tensor([0.9, 0.1, 0.7])},
                  {"label": torch.tensor([1, 0, -1]), "weather": torch.tensor([0, 0, 0]), "image": ["a", "b", "c"],
                   "gps": torch.zeros(3, 2), "gps_known": torch.zeros(3)})
    out = metric.compute()
    assert out["accuracy"] == 1.0 and out["gps_cluster/unknown/n"] == 2.0


def test_loss_terms_weights_and_weather_mask():
    torch.manual_seed(0)
    loss = RoadworkLoss(focal_weight=0.5, consistency_weight=0.3, weather_weight=0.2, alpha=0.25, gamma=2.0,
                        label_smoothing=0.1, weather_label_smoothing=0.0)
    outputs = {"logits": torch.randn(4, 2), "view_logits": torch.randn(4, 3, 2), "weather_logits": torch.randn(4, 4)}
    batch = {"label": torch.tensor([1, 0, 1, 0]), "weather": torch.tensor([0, 2, 0, 4])}
    terms = loss(outputs, batch)
    expected_focal = focal_loss(outputs["logits"], batch["label"], alpha=[0.75, 0.25], gamma=2.0, label_smoothing=0.1)
    torch.testing.assert_close(terms["focal"], 0.5 * expected_focal)
    torch.testing.assert_close(terms["consistency"], 0.3 * view_consistency_kl(outputs["view_logits"]))
    ce = torch.nn.functional.cross_entropy(outputs["weather_logits"][[1, 3]], torch.tensor([1, 3]))
    torch.testing.assert_close(terms["weather"], 0.2 * ce)
    batch["weather"] = torch.zeros(4, dtype=torch.long)                  # all unknown -> 0, no NaN
    assert float(loss(outputs, batch)["weather"]) == 0.0


def test_plan_loss_scalar_alpha_and_sum_over_views():
    """The plan's focal (alpha (1 - p_true)^gamma CE with label smoothing) and consistency (sum over views of
    KL(p_i || p_mean)), each against a hand computation."""
    torch.manual_seed(1)
    loss = RoadworkLoss(focal_weight=0.5, consistency_weight=0.3, weather_weight=0.0, alpha=0.25, gamma=2.0,
                        label_smoothing=0.1, weather_label_smoothing=0.0, alpha_mode="scalar",
                        consistency_reduction="sum")
    logits, views = torch.randn(5, 2), torch.randn(5, 8, 2)
    label = torch.tensor([1, 0, 1, -1, 0])                                   # -1: no label, left out
    terms = loss({"logits": logits, "view_logits": views}, {"label": label})
    focal = []
    for row, y in zip(logits.tolist(), label.tolist()):
        if y < 0:
            continue
        p = torch.tensor(row).softmax(0)
        ce = -(0.95 * p[y].log() + 0.05 * p[1 - y].log())                    # smoothing 0.1 over 2 classes
        focal.append(0.25 * (1 - p[y]) ** 2 * ce)
    torch.testing.assert_close(terms["focal"], 0.5 * torch.stack(focal).mean())
    p = views.softmax(-1)
    mean = p.mean(1, keepdim=True)
    kl_sum = (p * (p.log() - mean.log())).sum(-1).sum(1).mean()
    torch.testing.assert_close(terms["consistency"], 0.3 * kl_sum)
    torch.testing.assert_close(view_consistency_kl(views, reduction="sum"), 8 * view_consistency_kl(views))
    with pytest.raises(ValueError, match="alpha_mode"):
        RoadworkLoss(0.5, 0.3, 0.2, 0.25, 2.0, 0.1, 0.0, alpha_mode="vector")


def test_predictions_csv_format(tmp_path):
    results = [({"prob": torch.tensor([0.2, 0.5])}, {"image": ["a.jpg", "sub/b.jpg"]}),
               ({"prob": torch.tensor([0.99])}, {"image": ["c.png"]})]
    path = write_predictions_csv(results, tmp_path / "predictions.csv")
    frame = pd.read_csv(path)
    assert list(frame.columns) == ["image", "probability", "prediction", "predicted", "skip_reason"]
    assert frame["image"].tolist() == ["a.jpg", "sub/b.jpg", "c.png"]
    assert frame["prediction"].tolist() == [0, 0, 1]                  # 0.5 is "no roadwork" (validator)
    assert frame["probability"].between(0, 1).all()
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="non-finite"):
        write_predictions_csv([({"prob": torch.tensor([float("nan")])}, {"image": ["x"]})], tmp_path / "p2.csv")


def test_skipped_images_keep_their_row_in_input_order(tmp_path):
    results = [({"prob": torch.tensor([0.7, 0.2])}, {"image": ["a.jpg", "c.jpg"]})]
    path = write_predictions_csv(results, tmp_path / "p.csv", inputs=["a.jpg", "b.jpg", "c.jpg"],
                                 skipped=[("b.jpg", "b.jpg: cannot decode image")])
    frame = pd.read_csv(path, keep_default_na=False)
    assert frame["image"].tolist() == ["a.jpg", "b.jpg", "c.jpg"]
    assert frame["predicted"].tolist() == [1, 0, 1] and frame["prediction"].tolist() == ["1", "", "0"]
    assert frame["probability"].tolist()[1] == "" and "cannot decode" in frame["skip_reason"][1]
