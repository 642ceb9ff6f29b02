"""Error analysis at eval (confusion matrix, worst false positives / negatives, GPS-cluster breakdown),
stratified grouped folds, and predict's rows for images that data.skip_bad skipped."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image
from sklearn.metrics import confusion_matrix

from common.data.folds import assign_folds
from roadwork.errors import write_error_analysis
from roadwork.metric import RoadworkMetric
from roadwork.task import RoadworkTask

CONF = Path(__file__).resolve().parents[1] / "conf"


class RecordingTracker:
    def __init__(self):
        self.tables, self.images = {}, {}

    def log_table(self, name, columns, rows):
        self.tables[name] = (columns, rows)

    def log_images(self, name, images, step, captions=None):
        self.images[name] = images


def _cfg(overrides):
    with initialize_config_dir(str(CONF), version_base=None):
        return compose("config", overrides=["task=roadwork", *overrides])


def test_error_analysis_files_and_tracker(tmp_path):
    rng = np.random.default_rng(0)
    n = 40
    label = rng.integers(0, 2, n)
    prob = np.clip(0.4 * label + rng.uniform(0, 0.6, n), 0, 1)
    names = [f"img{i}.jpg" for i in range(n)]
    for name in names:
        Image.new("RGB", (32, 24), tuple(int(v) for v in rng.integers(0, 255, 3))).save(tmp_path / name)
    gps = np.where(np.arange(n)[:, None] < 25, [52.5, 13.4], [-33.9, 151.2]) + rng.normal(0, 0.01, (n, 2))
    cfg = _cfg([])
    metric = RoadworkMetric(breakdown=True, vocabularies={"weather": ["sunny", "rainy"]}, gps_clusters=2,
                            min_group_size=1, validator=OmegaConf.to_container(cfg.metric.validator, resolve=True),
                            errors={"worst_n": 3, "columns": 3, "thumb_size": 32}, benchmark=True)
    metric.update({"prob": torch.tensor(prob)}, {"label": torch.tensor(label), "image": names,
                                                  "weather": torch.tensor(rng.integers(0, 3, n)),
                                                  "gps": torch.tensor(gps), "gps_known": torch.ones(n)})
    tracker = RecordingTracker()
    written = write_error_analysis(metric, metric.compute(), {k: tmp_path / k for k in names}, tmp_path / "out",
                                   tracker)
    pred = (prob > 0.5).astype(int)
    confusion = pd.read_csv(written["confusion_csv"])
    np.testing.assert_array_equal(confusion[["predicted_0", "predicted_1"]].to_numpy(),
                                  confusion_matrix(label, pred, labels=[0, 1]))
    worst = pd.read_csv(written["worst_errors_csv"])
    fp = sorted([i for i in range(n) if label[i] == 0 and pred[i] == 1], key=lambda i: -prob[i])[:3]
    fn = sorted([i for i in range(n) if label[i] == 1 and pred[i] == 0], key=lambda i: prob[i])[:3]
    assert worst["image"].tolist() == [names[i] for i in fp + fn]
    assert worst["kind"].tolist() == ["false positive"] * len(fp) + ["false negative"] * len(fn)
    assert all("gps_cluster=" in m for m in worst["metadata"])
    breakdown = pd.read_csv(written["breakdown_csv"])
    clusters = breakdown[breakdown["field"] == "gps_cluster"]
    assert sorted(clusters["n"]) == [15, 25]                          # the evaluated set's two places
    assert Image.open(written["worst_errors_png"]).size[0] > 0 and written["confusion_png"].is_file()
    assert len(pd.read_csv(written["validator_curve"])) == n
    assert set(tracker.tables) == {"confusion_matrix", "breakdown"} and set(tracker.images) == {"confusion_matrix",
                                                                                              "worst_errors"}
    assert tracker.tables["confusion_matrix"][1] == confusion.values.tolist()


def test_roadwork_folds_are_stratified_and_grouped():
    task = RoadworkTask(_cfg([]))
    labels = np.array([1] * 24 + [0] * 36)
    groups = np.arange(60)
    folds = assign_folds(groups, 5, 0, task.cv_splitter(5, 0), labels)
    positives = [int(labels[folds == f].sum()) for f in range(5)]
    assert max(positives) - min(positives) <= 1 and sum(positives) == 24
    grouped = np.repeat(np.arange(30), 2)                             # pairs never split
    folds = assign_folds(grouped, 5, 0, task.cv_splitter(5, 0), labels)
    assert all(len(set(folds[grouped == g])) == 1 for g in range(30))


def test_predict_keeps_a_row_for_every_skipped_image(tmp_path):
    split = tmp_path / "test"
    split.mkdir()
    for stem in ("a", "c"):
        Image.new("RGB", (56, 42), (10, 200, 30)).save(split / f"{stem}.jpg")
    (split / "b.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (split / "c.json").write_text(json.dumps({"label": "unknown!"}))          # unused at predict: ignored
    (split / "orphan.json").write_text("{}")
    task = RoadworkTask(_cfg([f"data.root={tmp_path}", "data.predict=test", "data.skip_bad=true",
                              "data.view_size=28"]))
    dataset = task.datasets(tmp_path, "predict")["predict"]
    assert len(dataset) == 2 and dataset.split_index.orphans == ["orphan.json"]
    results = [({"prob": torch.tensor([0.8, 0.5])}, {"image": [s.name for s in dataset.samples]})]
    frame = pd.read_csv(task.write_predictions(results, dataset, tmp_path, {})["predictions"], keep_default_na=False)
    assert frame["image"].tolist() == ["a.jpg", "b.jpg", "c.jpg"]
    assert frame["predicted"].tolist() == [1, 0, 1] and frame["prediction"].tolist() == ["1", "", "0"]
    assert "cannot decode" in frame["skip_reason"][1]
