"""Error analysis written by every `mode=eval` (RoadworkTask.write_eval_outputs) into the run directory:

- confusion_matrix.csv / .png: labels vs the validator's rounded predictions;
- worst_errors.png / .csv: the `worst_n` most confident false positives (highest probability, label 0)
  and false negatives (lowest probability, label 1), each with its probability and metadata;
- breakdown.csv: MCC and accuracy per weather / daytime / scene / GPS cluster of the evaluated set;
- validator_curve.csv (benchmark=true): per scored image, the validator's windowed MCC, accuracy and reward.
The confusion matrix (table and image), the breakdown (table) and the grid (image) also go to the tracker.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from PIL import Image
from sklearn.metrics import confusion_matrix

from common.utils.atomic import atomic_path
from roadwork.metric import breakdown_rows
from roadwork.validator import validator_round

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the non-interactive backend is chosen)


def write_csv(frame: pd.DataFrame, path: Path) -> Path:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return path


def save_figure(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def confusion_frame(label: np.ndarray, prob: np.ndarray) -> pd.DataFrame:
    counts = confusion_matrix(label, validator_round(prob), labels=[0, 1])
    return pd.DataFrame({"label": [0, 1], "predicted_0": counts[:, 0], "predicted_1": counts[:, 1]})


def plot_confusion(frame: pd.DataFrame):
    counts = frame[["predicted_0", "predicted_1"]].to_numpy()
    fig, ax = plt.subplots(figsize=(3.2, 3.0))
    ax.imshow(counts, cmap="Blues")
    for (row, col), value in np.ndenumerate(counts):
        ax.text(col, row, str(value), ha="center", va="center")
    ax.set_xticks([0, 1], ["no roadwork", "roadwork"])
    ax.set_yticks([0, 1], ["no roadwork", "roadwork"])
    ax.set_xlabel("predicted (validator rounding)")
    ax.set_ylabel("label")
    return fig


def worst_errors(label: np.ndarray, prob: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the n most confident false positives (descending p) and false negatives (ascending p)."""
    pred = validator_round(prob)
    fp, fn = np.flatnonzero((label == 0) & (pred == 1)), np.flatnonzero((label == 1) & (pred == 0))
    return fp[np.argsort(-prob[fp], kind="stable")][:n], fn[np.argsort(prob[fn], kind="stable")][:n]


def describe(groups: dict, i: int) -> str:
    """One image's metadata as text: its breakdown groups (weather, daytime, scene, GPS cluster)."""
    return ", ".join(f"{field}={values[i]}" for field, values in groups.items()) or "no metadata"


def plot_grid(rows: pd.DataFrame, paths: dict, columns: int, thumb: int):
    count = max(1, len(rows))
    rows_of_grid = math.ceil(count / columns)
    fig, axes = plt.subplots(rows_of_grid, columns, figsize=(3.0 * columns, 3.3 * rows_of_grid), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, rows.itertuples()):
        with Image.open(paths[row.image]) as img:
            img = img.convert("RGB")
            img.thumbnail((thumb, thumb))
        ax.imshow(np.asarray(img))
        metadata = row.metadata.replace(", ", "\n")            # one field a line: titles stay within the image
        ax.set_title(f"{row.kind} p={row.probability:.3f}\n{row.image}\n{metadata}", fontsize=6)
    if rows.empty:
        axes.flat[0].text(0.5, 0.5, "no errors", ha="center")
    return fig


def figure_array(fig) -> np.ndarray:
    """The figure as an RGB array (for the tracker's log_images); closes nothing."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB"))


def error_rows(data: dict, groups: dict, n: int) -> pd.DataFrame:
    label, prob = data["label"].astype(int), data["prob"].astype(np.float64)
    fp, fn = worst_errors(label, prob, n)
    picked = [("false positive", i) for i in fp] + [("false negative", i) for i in fn]
    return pd.DataFrame({"kind": [k for k, _ in picked], "image": [str(data["image"][i]) for _, i in picked],
                         "label": [int(label[i]) for _, i in picked],
                         "probability": [float(prob[i]) for _, i in picked],
                         "metadata": [describe(groups, i) for _, i in picked]},
                        columns=["kind", "image", "label", "probability", "metadata"])


def write_error_analysis(metric, values: dict, image_paths: dict, out_dir: Path, tracker) -> dict[str, Path]:
    """Every file of the module docstring from the metric's recorded eval data; returns {what: path}."""
    out_dir, cfg = Path(out_dir), metric.errors
    data = metric.labelled()
    label, prob = data["label"].astype(int), data["prob"].astype(np.float64)
    written = {}
    confusion = confusion_frame(label, prob)
    written["confusion_csv"] = write_csv(confusion, out_dir / "confusion_matrix.csv")
    figure = plot_confusion(confusion)
    tracker.log_images("confusion_matrix", [figure_array(figure)], step=0)
    written["confusion_png"] = save_figure(figure, out_dir / "confusion_matrix.png")
    tracker.log_table("confusion_matrix", list(confusion.columns), confusion.values.tolist())
    rows = error_rows(data, metric.groups(data), int(cfg["worst_n"]))
    written["worst_errors_csv"] = write_csv(rows, out_dir / "worst_errors.csv")
    grid = plot_grid(rows, image_paths, int(cfg["columns"]), int(cfg["thumb_size"]))
    tracker.log_images("worst_errors", [figure_array(grid)], step=0)
    written["worst_errors_png"] = save_figure(grid, out_dir / "worst_errors.png")
    breakdown = pd.DataFrame(breakdown_rows(values), columns=["field", "value", "n", "mcc", "accuracy"])
    written["breakdown_csv"] = write_csv(breakdown, out_dir / "breakdown.csv")
    tracker.log_table("breakdown", list(breakdown.columns), breakdown.values.tolist())
    if metric.curve is not None:
        curve = {k: v for k, v in metric.curve.items() if k != "index"}
        frame = pd.DataFrame({"step": np.arange(1, len(curve["label"]) + 1),
                              "image": data["image"][metric.curve["index"]], **curve})
        written["validator_curve"] = write_csv(frame, out_dir / "validator_curve.csv")
    return written
