"""python -m sweeps.report: a terminal-wide table of a study's trials and its two plots."""
import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial
from PIL import Image

from sweeps import report
from sweeps.space import float_distribution

DISTRIBUTIONS = {"trainer.optim.lr": float_distribution(1e-5, 1e-1, log=True),
                 "model.growth": CategoricalDistribution([16, 32]),
                 "model.dropout": float_distribution(0.0, 0.5), "loss.dropout": float_distribution(0.0, 0.5)}
REASON = "diverged: non-finite loss at step 12, 1 such optimiser steps (limit trainer.max_nonfinite_steps=0); " * 3


def _sweep(tmp_path):
    sweep_dir = tmp_path / "sweeps" / "demo"
    sweep_dir.mkdir(parents=True)
    study = optuna.create_study(study_name="demo", storage=f"sqlite:///{sweep_dir / 'optuna.db'}",
                                direction="maximize")
    study.set_user_attr("metric", "val/f1")
    study.set_user_attr("budget", 4)
    for value, lr, growth in ((0.61, 1e-3, 16), (0.74, 3e-4, 32), (0.52, 2e-2, 16)):
        params = {"trainer.optim.lr": lr, "model.growth": growth, "model.dropout": 0.1, "loss.dropout": value / 2}
        study.add_trial(create_trial(params=params, distributions=DISTRIBUTIONS, value=value))
    params = {"trainer.optim.lr": 5e-2, "model.growth": 32, "model.dropout": 0.2, "loss.dropout": 0.3}
    study.add_trial(create_trial(params=params, distributions=DISTRIBUTIONS, state=TrialState.FAIL,
                                 user_attrs={"fail_reason": REASON}))
    study.ask()  # a running trial
    return sweep_dir, study


def test_report_table_and_plots(tmp_path, capsys):
    sweep_dir, study = _sweep(tmp_path)
    report.main([str(sweep_dir / "trial-3"), "--width", "72"])  # a trial directory finds its sweep
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "study demo: 3/4 complete (3 done, 1 FAIL, 1 run); best #1 0.74"
    header, *body = lines[1:7]
    assert header.split()[:7] == ["#", "state", "loss.dropout", "model.dropout", "growth", "lr", "f1"]
    assert all(len(line) <= 72 for line in lines[:7])
    assert [row.split()[:2] for row in body] == [["0", "done"], ["1", "done"], ["2", "done"], ["3", "FAIL"],
                                                 ["4", "run"]]
    assert body[1].split()[2:7] == ["0.37", "0.1", "32", "0.0003", "0.74"]
    assert body[3].endswith("  diverged")
    reason = lines[7:10]  # the failed trial's reason under the table, wrapped, cut after 3 lines
    assert reason[0].startswith("#3 diverged: non-finite loss at step 12") and reason[2].endswith("~")
    assert all(len(line) <= 72 for line in reason) and lines[10].startswith("wrote ")
    for name in ("optimization_history.png", "param_importances.png"):
        with Image.open(sweep_dir / name) as image:
            assert image.format == "PNG" and image.size == (800, 500)
        assert f"wrote {sweep_dir / name}" in lines


def test_report_without_a_study_names_the_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("OPTUNA_STORAGE", raising=False)
    with pytest.raises(SystemExit, match=f"{tmp_path}: no optuna.db there"):
        report.main([str(tmp_path)])
    _, study = _sweep(tmp_path)
    with pytest.raises(SystemExit, match="no study 'other' in sqlite:///.*; it holds: demo"):
        report.main([str(tmp_path / "sweeps" / "demo"), "--study", "other"])


def test_report_draws_the_curves_the_trials_left_to_the_sweep(tmp_path, capsys):
    """Trials run with `curves: sweep` draw none; the report draws each trial's missing curves.png."""
    import json
    sweep_dir, _ = _sweep(tmp_path)
    for number in (0, 1):
        (sweep_dir / f"trial-{number}").mkdir()
        (sweep_dir / f"trial-{number}" / "metrics.jsonl").write_text(
            "".join(json.dumps({"epoch": e, "train/loss": 1.0 - e / 4, "val/f1": e / 4}) + "\n" for e in range(3)))
    report.main([str(sweep_dir), "--width", "72"])
    assert "wrote curves.png of 2 trials" in capsys.readouterr().out.splitlines()
    for number in (0, 1):
        with Image.open(sweep_dir / f"trial-{number}" / "curves.png") as image:
            assert image.format == "PNG"
