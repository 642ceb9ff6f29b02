"""Sclera metrics against sklearn, per image then averaged, per set and pooled."""
import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, jaccard_score, precision_recall_curve, precision_score, recall_score

from sclera.metric import ScleraMetric, benchmark_maps, best_threshold_f1, image_scores


def sklearn_scores(pred_u8, binary_u8, truth):
    t, b = truth.ravel().astype(int), (binary_u8.ravel() > 0).astype(int)
    p, r, _ = precision_recall_curve(t, pred_u8.ravel() / 255.0)
    f1_curve = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-12), 0.0)
    return {"f1": f1_score(t, b, zero_division=1.0), "iou": jaccard_score(t, b, zero_division=1.0),
            "precision": precision_score(t, b, zero_division=1.0), "recall": recall_score(t, b, zero_division=1.0),
            "mae": np.abs(pred_u8.ravel() / 255.0 - t).mean(), "f1_best": f1_curve.max()}


def random_case(rng, shape=(30, 40)):
    truth = np.zeros(shape, np.uint8)
    truth[5:20, 8:30] = 1
    prob = np.clip(truth * 0.6 + rng.normal(0.2, 0.25, shape), 0, 1)
    return torch.tensor(prob, dtype=torch.float32), truth


@pytest.mark.parametrize("seed", range(5))
def test_image_scores_match_sklearn(seed):
    prob, truth = random_case(np.random.default_rng(seed))
    pred, binary = benchmark_maps(prob, truth.shape, 0.5)
    ours, ref = image_scores(pred, binary, truth), sklearn_scores(pred, binary, truth)
    for key in ref:
        assert ours[key] == pytest.approx(ref[key], abs=1e-9), key


def test_benchmark_maps_are_the_submission_files():
    prob = torch.tensor([[0.0, 0.2], [0.5, 0.999]])
    pred, binary = benchmark_maps(prob, (2, 2), 0.5)
    assert pred.dtype == np.uint8 and pred.tolist() == [[0, 51], [128, 255]]
    assert binary.tolist() == [[0, 0], [255, 255]]
    pred, binary = benchmark_maps(prob, (300, 400), 0.5)      # resized to the image's own size
    assert pred.shape == (300, 400) and set(np.unique(binary)) == {0, 255}


@pytest.mark.filterwarnings("ignore:No positive class found")
def test_empty_truth_and_empty_prediction_score_one():
    empty = np.zeros((5, 5), np.uint8)
    scores = image_scores(empty, empty, empty)
    assert scores["f1"] == scores["iou"] == scores["precision"] == scores["recall"] == scores["f1_best"] == 1.0
    ref = sklearn_scores(empty, empty, empty)
    assert (ref["f1"], ref["iou"]) == (1.0, 1.0)
    assert best_threshold_f1(np.full((5, 5), 200, np.uint8), empty) == 1.0


def test_metric_averages_per_image_per_set_and_pooled():
    rng = np.random.default_rng(7)
    cases = [random_case(rng) for _ in range(5)]
    sets = ["A", "A", "B", "B", "B"]
    metric = ScleraMetric(threshold=0.5)
    logits = torch.logit(torch.stack([p for p, _ in cases]).clamp(1e-4, 1 - 1e-4))[:, None]
    masks = torch.tensor(np.stack([t for _, t in cases]), dtype=torch.float32)[:, None]
    metric.update({"logits": logits[:2]}, {"mask": masks[:2], "set": sets[:2]})
    metric.update({"logits": logits[2:]}, {"mask": masks[2:], "set": sets[2:]})
    out = metric.compute()
    per_image = []
    for i in range(5):
        pred, binary = benchmark_maps(torch.sigmoid(logits[i, 0]), (30, 40), 0.5)
        per_image.append(sklearn_scores(pred, binary, cases[i][1]))
    for key in ("f1", "iou", "precision", "recall", "mae", "f1_best"):
        assert out[key] == pytest.approx(np.mean([s[key] for s in per_image]), abs=1e-6)
        assert out[f"A/{key}"] == pytest.approx(np.mean([s[key] for s in per_image[:2]]), abs=1e-6)
        assert out[f"B/{key}"] == pytest.approx(np.mean([s[key] for s in per_image[2:]]), abs=1e-6)


def test_full_resolution_masks_are_scored_at_their_own_size():
    truth = np.zeros((300, 400), np.uint8)
    truth[:, 200:] = 1
    logits = torch.full((1, 1, 28, 28), -8.0)
    logits[..., 14:] = 8.0
    metric = ScleraMetric(threshold=0.5)
    metric.update({"logits": logits}, {"mask_full": [truth], "set": ["S"], "mask": torch.zeros(1, 1, 28, 28)})
    out = metric.compute()
    assert out["f1"] > 0.98 and out["S/iou"] > 0.97     # scored against the 400x300 truth, not the zero mask


def test_threshold_must_be_a_probability():
    with pytest.raises(ValueError, match="metric.threshold=1.5"):
        ScleraMetric(threshold=1.5)
