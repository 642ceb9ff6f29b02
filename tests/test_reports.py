"""Offline reports: curves.png from metrics.jsonl, the summary table of a -m grid."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from common.tracking.reports import curve_panels, grid_rows, read_epochs, write_curves, write_grid_summary
from tests.cli import REPO, TOY

RECORDS = [{"epoch": e, "step": 10 * (e + 1), "train/loss": 1.0 / (e + 1), "train/mse": 0.6 / (e + 1),
            "train/seg": 0.4 / (e + 1), "train/seconds": 3.0, "train/samples_per_s": 50.0,
            "val/loss": 1.2 / (e + 1), "val/mcc": 0.1 * e, "val/accuracy": 0.5 + 0.1 * e,
            "val/weather/rain/mcc": 0.2, "lr/head": 1e-3 / (e + 1), "lr/adapter": 1e-4} for e in range(3)]


def test_curve_panels_pick_losses_metrics_and_learning_rates():
    assert curve_panels(RECORDS) == {"loss": ["train/loss", "val/loss"],
                                     "loss terms (train)": ["train/mse", "train/seg"],
                                     "val/mcc": ["val/mcc"], "val/accuracy": ["val/accuracy"],
                                     "learning rate": ["lr/head", "lr/adapter"]}


def test_the_monitored_metric_gets_a_panel_whatever_its_depth():
    """sclera monitors val/Binary/F1 (two slashes): drawn, after the losses; a breakdown that is not monitored is not."""
    records = [{**r, "val/Binary/F1": 0.5 + 0.1 * r["epoch"], "val/MASD/Binary/F1": 0.4} for r in RECORDS]
    panels = curve_panels(records, "val/Binary/F1")
    assert list(panels)[:3] == ["loss", "loss terms (train)", "val/Binary/F1"]
    assert "val/MASD/Binary/F1" not in panels and "val/Binary/F1" not in curve_panels(records)


def test_write_curves_draws_every_panel(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    path = write_curves(tmp_path)
    width, height = Image.open(path).size
    assert path == tmp_path / "curves.png" and width == 4 * 4 * 80 and height == 2 * 3 * 80   # 5 panels: 2 rows
    pixels = np.asarray(Image.open(path).convert("L"))
    assert pixels.min() < 100                                 # lines were drawn, not an empty canvas


def test_write_curves_without_epochs_and_with_a_bad_line(tmp_path):
    assert write_curves(tmp_path) is None and not (tmp_path / "curves.png").exists()
    (tmp_path / "metrics.jsonl").write_text(json.dumps(RECORDS[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not a JSON object"):
        read_epochs(tmp_path / "metrics.jsonl")


def _job(sweep_dir, name, overrides, final, direction="maximize"):
    job = sweep_dir / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"optimized_metric": "val/f1",
                                                                "optimized_direction": direction}))
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if final is not None:
        (job / "metrics.json").write_text(json.dumps(final))


def test_grid_summary_ranks_jobs_and_marks_failures(tmp_path):
    _job(tmp_path, "0", ["task=sclera", "peft.r=4", "data.root=/data"], {"best_value": 0.5, "best_epoch": 3})
    _job(tmp_path, "1", ["task=sclera", "peft.r=8"], None)
    _job(tmp_path, "2", ["task=sclera", "peft.r=16"], {"best_value": 0.712345, "best_epoch": 9})
    _job(tmp_path, "10", ["task=sclera", "peft.r=32"], {"eval/f1": 0.6})
    rows = grid_rows(tmp_path)
    assert [(r["job"], r["overrides"], r["value"], r["rank"]) for r in rows] == [
        ("0", "peft.r=4", 0.5, 3), ("1", "peft.r=8", None, None), ("2", "peft.r=16", 0.712345, 1),
        ("10", "peft.r=32", 0.6, 2)]
    assert rows[1]["status"].startswith("no metrics.json")
    table = write_grid_summary(tmp_path)
    assert "| 2 | peft.r=16 | done | val/f1 | 0.7123 | 1 | 9 |" in table.splitlines()
    written = list(csv.DictReader(open(tmp_path / "summary.csv")))
    assert [r["rank"] for r in written] == ["3", "", "1", "2"] and written[0]["run_dir"] == str(tmp_path / "0")
    assert (tmp_path / "summary.md").read_text().count("\n") == 2 + 4


def test_minimised_metric_ranks_lowest_first(tmp_path):
    _job(tmp_path, "0", [], {"best_value": 0.3}, direction="minimize")
    _job(tmp_path, "1", [], {"best_value": 0.1}, direction="minimize")
    assert [r["rank"] for r in grid_rows(tmp_path)] == [2, 1]


@pytest.mark.slow
def test_multirun_grid_prints_and_writes_its_summary(tmp_path):
    cmd = [sys.executable, str(REPO / "run.py"), "-m", *TOY, "trainer=debug", "seed=1,2", "logger=none",
           f"paths.log_dir={tmp_path / 'logs'}", f"paths.cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = list((tmp_path / "logs" / "toy" / "multirun").glob("*/summary.csv"))
    assert len(summary) == 1
    rows = list(csv.DictReader(open(summary[0])))
    assert [(r["job"], r["overrides"], r["status"]) for r in rows] == [("0", "seed=1", "done"), ("1", "seed=2", "done")]
    for row in rows:
        final = json.loads((summary[0].parent / row["job"] / "metrics.json").read_text())
        assert float(row["value"]) == pytest.approx(final["best_value"])
        assert (summary[0].parent / row["job"] / "curves.png").is_file()
    assert "[grid]" in proc.stdout and "| 1 | seed=2 | done |" in proc.stdout


def test_curves_are_redrawn_while_drawing_stays_a_small_share_of_the_time(tmp_path, monkeypatch):
    import common.tracking.reports
    from common.tracking.tracker import RunFiles
    clock, drawn = [100.0], []

    def slow_draw(run_dir, monitor=None):   # each drawing takes 1 s of the fake clock
        drawn.append(len((run_dir / "metrics.jsonl").read_text().splitlines()))
        clock[0] += 1.0

    monkeypatch.setattr(common.tracking.reports, "write_curves", slow_draw)
    monkeypatch.setattr("common.tracking.tracker.time.monotonic", lambda: clock[0])
    files = RunFiles(tmp_path, redraw=True)             # curves=epoch
    for epoch in range(6):
        files.append_epoch({"epoch": epoch})
        clock[0] += 8.0                      # an 8 s epoch: redraw once 20 x 1 s have passed since the last
    assert drawn == [1, 4]
