"""Sclera metrics against a reimplementation of the SSBC 2025 evaluator's definitions (evaluate_predictions.py
of dariant/SSBC_2025 as of its commit ee13abc "Fix F1 score computation" and its latest 607a78a, read from PNG
files as it reads them), edge cases included, per image then averaged."""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import f1_score, jaccard_score, precision_recall_curve

from sclera.metric import NAMES, ScleraMetric, batch_scores, benchmark_maps, image_scores


def ssbc_reference(truth_png, binarised_png, predictions_png) -> dict:
    """SSBC's definitions, written here from its description: masks read as greyscale // 255, binary F1 and
    Jaccard of label 1 (sklearn defaults: zero_division 0), and the best F1 of the
    probability PR curve after keeping, per recall value, only the point of highest precision."""
    gt = np.asarray(Image.open(truth_png).convert("L")).ravel() // 255
    binary = np.asarray(Image.open(binarised_png).convert("L")).ravel() // 255
    prob = np.asarray(Image.open(predictions_png).convert("L")).ravel() / 255
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f1 = f1_score(gt, binary)
        macro = f1_score(gt, binary, average="macro", labels=[0, 1])   # the evaluator before ee13abc
        iou = jaccard_score(gt, binary)
        precision, recall, _ = precision_recall_curve(gt, prob, pos_label=1)
    recall[~np.isfinite(recall)] = 0
    points = {}
    for index, (p, r) in enumerate(zip(precision, recall)):
        if r not in points or p > precision[points[r]]:
            points[r] = index
    kept = sorted(points.values())
    p, r = precision[kept], recall[kept]
    with np.errstate(invalid="ignore", divide="ignore"):
        curve = 2 * p * r / (p + r)
    best = int(np.argmax(curve))
    return {"Binary/F1": f1, "Binary/IoU": iou, "Probabilistic/F1": curve[best],
            "Probabilistic/Precision": p[best], "Probabilistic/Recall": r[best], "macro_f1": macro}


def write_case(folder, name, prob, truth, threshold=0.5):
    pred, binary = benchmark_maps(torch.tensor(prob, dtype=torch.float32), truth.shape, threshold)
    paths = [folder / f"{name}_{kind}.png" for kind in ("truth", "bin", "pred")]
    for path, array in zip(paths, (truth.astype(np.uint8) * 255, binary, pred)):
        Image.fromarray(array).save(path)
    return pred, binary, paths


def hand_made_cases(rng, shape=(30, 40)):
    """Ordinary images, empty truth, empty prediction, both empty, all sclera, a single grey level."""
    truth = np.zeros(shape, np.uint8)
    truth[5:20, 8:30] = 1
    noisy = lambda t: np.clip(t * 0.6 + rng.normal(0.2, 0.25, shape), 0, 1)
    empty = np.zeros(shape, np.uint8)
    return {
        "ordinary_1": (noisy(truth), truth), "ordinary_2": (noisy(truth), truth),
        "empty_truth": (noisy(truth), empty),
        "empty_prediction": (np.full(shape, 0.1), truth),
        "both_empty": (np.full(shape, 0.2), empty),
        "both_empty_zero_map": (np.zeros(shape), empty),
        "all_sclera": (np.full(shape, 0.9), np.ones(shape, np.uint8)),
        "one_level_on_truth": (truth * 0.7, truth),
    }


@pytest.fixture
def cases(tmp_path):
    out = {}
    for name, (prob, truth) in hand_made_cases(np.random.default_rng(0)).items():
        pred, binary, paths = write_case(tmp_path, name, prob, truth)
        out[name] = (pred, binary, truth, ssbc_reference(*paths))
    return out


def test_every_ssbc_number_equals_the_reference_on_hand_made_files(cases):
    for name, (pred, binary, truth, ref) in cases.items():
        ours = image_scores(pred, binary, truth)
        for key, value in ref.items():
            assert ours[key] == pytest.approx(value, abs=1e-12), (name, key)


def test_empty_cases_score_as_ssbc_scores_them(cases):
    # both empty: sclera F1 0 (zero_division 0; the old macro form 0.5); Jaccard 0; probabilistic F1 0
    both = image_scores(*cases["both_empty"][:3])
    assert (both["Binary/F1"], both["Binary/IoU"], both["Probabilistic/F1"], both["macro_f1"]) == (0.0, 0.0, 0.0, 0.5)
    assert (both["Probabilistic/Precision"], both["Probabilistic/Recall"]) == (0.0, 1.0)
    assert both["sclera_f1"] == both["sclera_iou"] == 1.0          # the suite's own convention, beside
    empty_truth = image_scores(*cases["empty_truth"][:3])
    assert empty_truth["Binary/IoU"] == empty_truth["Probabilistic/F1"] == empty_truth["sclera_f1"] == 0.0
    all_sclera = image_scores(*cases["all_sclera"][:3])
    assert all_sclera["Binary/F1"] == all_sclera["Binary/IoU"] == 1.0
    assert all_sclera["macro_f1"] == 0.5                              # background label absent: 0


def test_metric_averages_per_image_per_set_and_pooled(cases):
    names = list(cases)
    sets = ["A" if i % 2 else "B" for i in range(len(names))]
    metric = ScleraMetric(threshold=0.5)
    for i, name in enumerate(names):
        pred, _, truth, _ = cases[name]
        logits = torch.logit(torch.tensor(pred / 255.0, dtype=torch.float32).clamp(1e-6, 1 - 1e-6))[None, None]
        metric.update({"logits": logits}, {"mask_full": [truth], "set": [sets[i]]})
    out = metric.compute()
    assert set(NAMES) <= set(out)
    for key in cases[names[0]][3]:
        ref = [cases[n][3][key] for n in names]
        assert out[key] == pytest.approx(np.mean(ref), abs=1e-9), key
        for s in ("A", "B"):
            assert out[f"{s}/{key}"] == pytest.approx(np.mean([v for v, t in zip(ref, sets) if t == s]), abs=1e-9)


def test_benchmark_maps_resize_bilinear_then_threshold():
    prob = torch.tensor([[0.0, 1.0]])
    pred, binary = benchmark_maps(prob, (1, 4), 0.5)
    ref = torch.nn.functional.interpolate(prob[None, None], size=(1, 4), mode="bilinear", align_corners=False)[0, 0]
    np.testing.assert_array_equal(pred, np.rint(ref.numpy() * 255).astype(np.uint8))
    np.testing.assert_array_equal(binary, np.where(ref.numpy() >= 0.5, 255, 0))
    assert pred.dtype == binary.dtype == np.uint8


def test_mae_is_the_stored_probability_map_against_the_truth():
    truth = np.array([[0, 1]], np.uint8)
    pred = np.array([[51, 204]], np.uint8)
    assert image_scores(pred, np.array([[0, 255]], np.uint8), truth)["mae"] == pytest.approx((0.2 + 0.2) / 2)


def test_full_resolution_masks_are_scored_at_their_own_size():
    truth = np.zeros((300, 400), np.uint8)
    truth[:, 200:] = 1
    logits = torch.full((1, 1, 28, 28), -8.0)
    logits[..., 14:] = 8.0
    metric = ScleraMetric(threshold=0.5)
    metric.update({"logits": logits}, {"mask_full": [truth], "set": ["S"], "mask": torch.zeros(1, 1, 28, 28)})
    out = metric.compute()
    assert out["Binary/F1"] > 0.98 and out["S/Binary/IoU"] > 0.97   # against the 400x300 truth, not the zero mask


def test_threshold_must_be_a_probability():
    with pytest.raises(ValueError, match="metric.threshold=1.5"):
        ScleraMetric(threshold=1.5)


def _half(shape, left, right):
    out = np.full(shape, left, np.float64)
    out[:, shape[1] // 2:] = right
    return out


def table_cases(shape=(12, 16)):
    """name -> (probability map, truth 0/1, the binarised mask expected at threshold 0.5 (p >= 0.5), by hand)."""
    zeros, ones = np.zeros(shape, np.uint8), np.ones(shape, np.uint8)
    box = zeros.copy()
    box[3:9, 4:10] = 1
    shifted = np.roll(box, (2, 3), axis=(0, 1))
    right = _half(shape, 0, 1).astype(np.uint8)
    return {
        "empty_truth_empty_prediction": (np.full(shape, 0.1), zeros, zeros),
        "empty_truth_with_prediction": (box * 0.9, zeros, box),
        "full_truth_full_prediction": (np.full(shape, 0.8), ones, ones),
        "full_truth_half_prediction": (_half(shape, 0.2, 0.8), ones, right),
        "shifted_mask": (shifted * 0.95, box, shifted),
        "constant_half_probability": (np.full(shape, 0.5), box, ones),        # 0.5 >= threshold 0.5
        "edge_127_128": (_half(shape, 127 / 255, 128 / 255), box, right),    # stored grey 127 -> 0, 128 -> 255
    }


def test_binary_scores_equal_sklearn_on_a_table_of_hand_made_cases(tmp_path):
    """Per image and pooled over the images, Binary/F1 and Binary/IoU equal sklearn's f1_score(gt, pred) and
    jaccard_score(gt, pred) as the evaluator calls them on the written Binarised PNG read back // 255."""
    metric, expected = ScleraMetric(threshold=0.5), {"Binary/F1": [], "Binary/IoU": []}
    for name, (prob, truth, binary_by_hand) in table_cases().items():
        _, _, (truth_png, binarised_png, _) = write_case(tmp_path, name, prob, truth)
        gt = np.asarray(Image.open(truth_png).convert("L")).ravel() // 255
        pred = np.asarray(Image.open(binarised_png).convert("L")).ravel() // 255
        np.testing.assert_array_equal(pred, binary_by_hand.ravel(), err_msg=name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = {"Binary/F1": f1_score(gt, pred), "Binary/IoU": jaccard_score(gt, pred)}
        logits = torch.logit(torch.tensor(prob, dtype=torch.float32))[None, None]
        batch = {"mask_full": [truth], "set": ["S"]}
        ours = batch_scores(logits, batch, 0.5)[0]
        metric.update({"logits": logits}, batch)
        for key, value in reference.items():
            assert ours[key] == pytest.approx(value, abs=1e-9), (name, key)
            expected[key].append(value)
    pooled = metric.compute()
    for key, values in expected.items():
        assert pooled[key] == pytest.approx(np.mean(values), abs=1e-9), key
        assert pooled[f"S/{key}"] == pytest.approx(np.mean(values), abs=1e-9), key
    assert expected["Binary/F1"][:3] == [0.0, 0.0, 1.0]                 # both empty scores 0, not the macro 0.5
