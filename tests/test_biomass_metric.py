"""biomass: the official global weighted R2 against a hand computation and sklearn; submission.csv."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import r2_score

from biomass.constants import TARGETS, official_weight_vector
from biomass.metric import BiomassMetric, biomass_scores, weighted_r2
from biomass.outputs import collect_predictions, score_submission, write_submission


def test_weighted_r2_by_hand():
    y, yhat, w = np.array([1.0, 2.0, 4.0]), np.array([1.5, 2.0, 3.0]), np.array([0.5, 0.2, 0.1])
    ybar = (0.5 * 1 + 0.2 * 2 + 0.1 * 4) / 0.8                     # 1.625
    ss_res = 0.5 * 0.25 + 0.2 * 0.0 + 0.1 * 1.0                    # 0.225
    ss_tot = 0.5 * (1 - ybar) ** 2 + 0.2 * (2 - ybar) ** 2 + 0.1 * (4 - ybar) ** 2
    assert weighted_r2(y, yhat, w) == pytest.approx(1 - ss_res / ss_tot)


@pytest.mark.parametrize("y,yhat", [([2.0, 2.0, 2.0], [2.0, 1.0, 3.0]),    # constant target: sklearn says 0.0
                                    ([2.0, 2.0], [2.0, 2.0]),              # ... or 1.0 when exact
                                    ([3.0], [1.0])])                        # one row
def test_weighted_r2_is_nan_where_undefined(y, yhat):
    assert np.isnan(weighted_r2(np.array(y), np.array(yhat), np.ones(len(y))))


def _random_case(seed: int, n: int = 30):
    rng = np.random.default_rng(seed)
    true = rng.gamma(2.0, 15.0, (n, 5))
    pred = np.clip(true + rng.normal(0, 8, (n, 5)), 0, None)
    mask = (rng.random((n, 5)) > 0.15).astype(float)
    return true, pred, mask


def test_global_weighted_r2_matches_sklearn_on_long_rows():
    true, pred, mask = _random_case(0)
    rows = mask.ravel() > 0
    weights = np.tile(official_weight_vector(), len(true))[rows]
    expected = r2_score(true.ravel()[rows], pred.ravel()[rows], sample_weight=weights)
    assert biomass_scores(true, pred, mask)["r2_weighted"] == pytest.approx(expected, rel=1e-12)


def test_per_target_and_log1p_scores_match_sklearn():
    true, pred, mask = _random_case(1)
    scores = biomass_scores(true, pred, mask)
    log_expected = 0.0
    for j, name in enumerate(TARGETS):
        sel = mask[:, j] > 0
        assert scores[f"r2/{name}"] == pytest.approx(r2_score(true[sel, j], pred[sel, j]))
        log_expected += official_weight_vector()[j] * r2_score(np.log1p(true[sel, j]), np.log1p(pred[sel, j]))
    assert scores["r2_log1p_weighted"] == pytest.approx(log_expected / sum(official_weight_vector()))


def test_metric_accumulates_batches_and_ignores_masked_nan():
    true, pred, mask = _random_case(2, n=12)
    true_nan = np.where(mask > 0, true, np.nan)
    metric = BiomassMetric()
    for s in (slice(0, 5), slice(5, 12)):
        metric.update({"pred_g": torch.tensor(pred[s])},
                      {"targets_g": torch.tensor(true_nan[s]), "target_mask": torch.tensor(mask[s])})
    assert metric.compute()["r2_weighted"] == pytest.approx(biomass_scores(true, pred, mask)["r2_weighted"])


def _test_rows(ids):
    rows = [{"sample_id": f"{i}__{t}", "image_path": f"test/{i}.jpg", "target_name": t, "image_id": i}
            for i in ids for t in TARGETS]
    return pd.DataFrame(rows).sample(frac=1.0, random_state=0).reset_index(drop=True)   # any order


def test_submission_format_order_and_clipping(tmp_path):
    test_rows = _test_rows(["IDa", "IDb"])
    preds = collect_predictions([({"pred_g": torch.tensor([[1.0, -2.0, 3.0, 4.0, 5.0]])}, {"image_id": ["IDa"]}),
                                 ({"pred_g": torch.tensor([[6.0, 7.0, 8.0, 9.0, 10.0]])}, {"image_id": ["IDb"]})])
    path = write_submission(test_rows, preds, tmp_path / "out" / "submission.csv")
    text = path.read_text().splitlines()
    assert text[0] == "sample_id,target" and len(text) == 1 + len(test_rows)
    sub = pd.read_csv(path)
    assert list(sub["sample_id"]) == list(test_rows["sample_id"])
    lookup = dict(zip(sub["sample_id"], sub["target"]))
    assert lookup["IDa__Dry_Dead_g"] == 0.0 and lookup["IDb__Dry_Total_g"] == pytest.approx(10.0)
    assert not list(tmp_path.joinpath("out").glob("*.tmp"))


def test_submission_missing_image_or_nan_is_an_error(tmp_path):
    test_rows = _test_rows(["IDa", "IDb"])
    with pytest.raises(ValueError, match="no prediction for 1 test image.*IDb"):
        write_submission(test_rows, {"IDa": np.ones(5)}, tmp_path / "s.csv")
    with pytest.raises(ValueError, match="non-finite prediction for IDb"):
        write_submission(test_rows, {"IDa": np.ones(5), "IDb": np.full(5, np.nan)}, tmp_path / "s.csv")


def test_score_submission_matches_direct_formula(tmp_path):
    true, pred, mask = _random_case(3, n=6)
    ids = [f"ID{k}" for k in range(6)]
    sol = pd.DataFrame([{"sample_id": f"{i}__{t}", "target": true[k, j]}
                        for k, i in enumerate(ids) for j, t in enumerate(TARGETS)])
    sol.to_csv(tmp_path / "sol.csv", index=False)
    write_submission(_test_rows(ids), dict(zip(ids, pred)), tmp_path / "submission.csv")
    scores = score_submission(tmp_path / "submission.csv", tmp_path / "sol.csv", tmp_path / "scores.json")
    expected = r2_score(true.ravel(), pred.ravel(), sample_weight=np.tile(official_weight_vector(), 6))
    assert scores["r2_weighted"] == pytest.approx(expected, abs=1e-6)
    assert (tmp_path / "scores.json").is_file()


def test_scatter_image_puts_points_where_the_values_are():
    from biomass.plots import panel_xy, scatter_image
    true = np.array([[10.0, 0, 0, 0, 40.0], [20.0, 0, 0, 0, 0.0]])
    pred = np.array([[20.0, 0, 0, 0, 10.0], [5.0, 0, 0, 0, 0.0]])
    mask = np.ones_like(true)
    img = scatter_image(true, pred, mask, size=100, margin=10)
    assert img.shape == (100, 500, 3)
    x = int(round(panel_xy(10.0, 20.0, 100, 10)))           # Dry_Green panel: true 10, pred 20, top 20
    y = int(round(100 - panel_xy(20.0, 20.0, 100, 10)))
    assert tuple(img[y, x]) == (220, 30, 30)
    x = 400 + int(round(panel_xy(40.0, 40.0, 100, 10)))     # Dry_Total panel: true 40, pred 10
    y = int(round(100 - panel_xy(10.0, 40.0, 100, 10)))
    assert tuple(img[y, x]) == (220, 30, 30)
    assert tuple(img[70, 450]) == (255, 255, 255)           # nothing drawn far from the points
