"""Optuna pruning of shared-study sweeps (sweeps/pruning.py): the pruner as config, a job's reports and optuna's
own decision on the same values, a requeued job's reports, the trainer stopping cleanly, and sweeps whose budget
stays exact with pruned trials."""
from __future__ import annotations

import json
import subprocess
import sys

import optuna
import pytest
import torch
from omegaconf import OmegaConf
from optuna.trial import TrialState, create_trial

from common.cluster.distributed import DistContext
from common.tracking.tracker import Tracker
from common.training.trainer import Trainer
from sweeps.pruning import JobTrial, build_pruner
from sweeps.storage import open_study
from tests.cli import REPO
from tests.test_sweeps import _study, _sweep_dir, _worker
from tests.test_trainer_behaviours import MSE, Items, LinearModel, Scripted, _cfg, _records
from tests.toy.task import ToyTask


def _node(**values):
    return OmegaConf.create(values)


@pytest.mark.parametrize("node, directions, message", [
    (_node(_target_="optuna.samplers.TPESampler"), ["maximize"], "made a TPESampler, not an optuna pruner"),
    (_node(n_startup_trials=5), ["maximize"], "expected null or a node with `_target_"),
    (_node(_target_="optuna.pruners.MedianPruner"), ["maximize", "minimize"], "single-objective studies only"),
])
def test_a_bad_pruner_is_refused_naming_the_key(node, directions, message):
    with pytest.raises(ValueError, match="hydra.sweeper.pruner") as err:
        build_pruner(node, directions)
    assert message in str(err.value)


def test_pruner_from_config():
    assert build_pruner(None, ["maximize"]) is None
    pruner = build_pruner(_node(_target_="optuna.pruners.HyperbandPruner", min_resource=1, max_resource=8),
                          ["maximize"])
    assert isinstance(pruner, optuna.pruners.HyperbandPruner)


# ---- a job's reports vs optuna's own decision -------------------------------------------------------------------
FINISHED = [[0.2, 0.4, 0.5, 0.6], [0.3, 0.5, 0.6, 0.7], [0.1, 0.3, 0.4, 0.5]]   # complete trials' curves
BAD, GOOD = [0.15, 0.2, 0.25, 0.3], [0.35, 0.6, 0.7, 0.8]


def _median():
    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)


def _with_finished_trials(study: optuna.Study) -> optuna.Study:
    for curve in FINISHED:
        study.add_trial(create_trial(value=curve[-1], intermediate_values=dict(enumerate(curve))))
    return study


def _optuna_decisions(curve: list[float]) -> list[bool]:
    """Optuna's own trial in an in-memory study with the same finished trials: should_prune after each report."""
    study = _with_finished_trials(optuna.create_study(direction="maximize", pruner=_median()))
    trial = study.ask()
    decisions = []
    for epoch, value in enumerate(curve):
        trial.report(value, epoch)
        decisions.append(trial.should_prune())
    return decisions


def _stored_study(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    return url, _with_finished_trials(open_study(url, "s", ["maximize"]))


@pytest.mark.parametrize("curve", [BAD, GOOD])
def test_a_job_is_pruned_where_optuna_prunes(tmp_path, curve):
    url, study = _stored_study(tmp_path)
    number = study.ask().number
    job = JobTrial(url, "s", number, _median())
    decisions = [job.report(value, epoch) for epoch, value in enumerate(curve)]
    assert decisions == _optuna_decisions(curve)
    assert any(decisions) == (curve is BAD)          # the bad curve is pruned (at epoch 1), the good one never
    assert job.reported() == dict(enumerate(curve))


def test_a_requeued_job_keeps_its_reports_and_its_fate(tmp_path):
    """Life 1 reports epochs 0 and 1 and is preempted; life 2 (a new process: a new JobTrial) repeats epoch 1 with
    another value and goes on: epoch 1 is not reported twice, and each decision is the uninterrupted one's."""
    url, study = _stored_study(tmp_path)
    number = study.ask().number
    first = JobTrial(url, "s", number, _median())
    decisions = [first.report(BAD[0], 0), first.report(BAD[1], 1)]
    second = JobTrial(url, "s", number, _median())
    decisions += [second.report(BAD[1] + 0.3, 1), second.report(BAD[2], 2)]
    assert second.reported() == {0: BAD[0], 1: BAD[1], 2: BAD[2]}
    expected = _optuna_decisions(BAD)
    assert decisions == expected[:2] + [expected[1], expected[2]]


def test_non_finite_values_are_never_reported(tmp_path):
    url, study = _stored_study(tmp_path)
    job = JobTrial(url, "s", study.ask().number, None)
    assert not job.report(float("nan"), 0) and not job.report(None, 1)
    assert job.report(0.5, 2) is False and job.reported() == {2: 0.5}


# ---- the trainer -------------------------------------------------------------------------------------------------
class StopAt:
    """A trial whose pruner stops the run at `epoch`; records what it was told."""

    def __init__(self, epoch: int):
        self.epoch, self.reports = epoch, []

    def report(self, value, epoch):
        self.reports.append((epoch, value))
        return epoch >= self.epoch


def test_the_trainer_stops_where_the_trial_is_pruned_and_a_resume_trains_nothing(tmp_path):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, generator=gen), torch.randn(8, generator=gen)
    cfg = _cfg(tmp_path, {"data.batch_size": 4, "trainer.max_epochs": 6, "trainer.monitor": "val/score",
                          "trainer.monitor_direction": "maximize"})
    run_dir, scores = tmp_path / "run", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    trial = StopAt(2)
    state = Trainer(cfg, run_dir, Tracker(), DistContext(), trial).fit(ToyTask(cfg), LinearModel(3), MSE(), Scripted(scores),
                                              Items(x=x, y=y), Items(x=x, y=y), {})
    assert trial.reports == [(0, 0.1), (1, 0.2), (2, 0.3)]
    assert (state.epoch, state.pruned_epoch, state.pruned_value, state.best_epoch) == (3, 2, 0.3, 2)
    assert [r["epoch"] for r in _records(run_dir)] == [0, 1, 2]
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert last["epoch"] == 3 and last["fit_state"]["pruned_epoch"] == 2
    assert (run_dir / "checkpoints" / "best.pt").is_file()

    again = StopAt(0)
    metric = Scripted(scores)
    resumed = Trainer(cfg, run_dir, Tracker(), DistContext(), again).fit(ToyTask(cfg), LinearModel(3), MSE(), metric, Items(x=x, y=y),
                                                Items(x=x, y=y), {})
    assert resumed.epoch == 3 and metric.calls == 0 and again.reports == []


# ---- sweeps -----------------------------------------------------------------------------------------------------
ODD = ["hydra.sweeper.pruner={_target_:tests.toy.pruners.OddTrials}", "trainer.max_epochs=2"]


@pytest.mark.slow
@pytest.mark.parametrize("budget_counts", ["complete", "finished"])
def test_two_workers_with_a_pruner_reach_the_budget_exactly(tmp_path, budget_counts):
    """OddTrials prunes every odd-numbered trial at its first report: with budget_counts=complete the study ends
    with exactly 3 COMPLETE trials (and the odd ones PRUNED), with finished with 3 COMPLETE + PRUNED trials."""
    extra = [*ODD, "hydra.sweeper.budget=3", f"hydra.sweeper.budget_counts={budget_counts}"]
    workers = [_worker(tmp_path, f"w{i}", extra, popen=True) for i in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs
    trials = _study(tmp_path).trials
    ran = [t for t in trials if not t.user_attrs.get("surplus")]
    complete = [t for t in ran if t.state == TrialState.COMPLETE]
    pruned = [t for t in ran if t.state == TrialState.PRUNED]
    assert {t.number % 2 for t in complete} <= {0} and {t.number % 2 for t in pruned} <= {1}
    counted = complete if budget_counts == "complete" else complete + pruned
    assert len(counted) == 3 and pruned and not [t for t in ran if t.state == TrialState.FAIL]
    for trial in pruned:
        assert trial.user_attrs["pruned_epoch"] == 0 and trial.user_attrs["epochs_run"] == 1
        assert trial.user_attrs["max_epochs"] == 2 and trial.intermediate_values.keys() == {0}
        metrics = json.loads((_sweep_dir(tmp_path) / f"trial-{trial.number}" / "metrics.json").read_text())
        assert metrics["pruned"] == {"epoch": 0, "value": trial.user_attrs["last_value"]}
    for trial in complete:
        assert trial.user_attrs["epochs_run"] == 2 and trial.intermediate_values.keys() == {0, 1}

    report = subprocess.run([sys.executable, "-m", "sweeps.report", str(_sweep_dir(tmp_path)), "--width", "200"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr
    ran_epochs = sum(t.user_attrs["epochs_run"] for t in complete + pruned)
    assert f"pruned {len(pruned)} (trial@epoch: " in report.stdout
    assert f"epochs run {ran_epochs} of {2 * len(complete + pruned)} ({len(pruned)} saved" in report.stdout
    assert (_sweep_dir(tmp_path) / "intermediate_values.png").is_file()


@pytest.mark.slow
def test_a_bad_pruner_stops_the_sweep_before_its_first_trial(tmp_path):
    out = _worker(tmp_path, "w0", ["hydra.sweeper.pruner={_target_:optuna.samplers.TPESampler}"])
    assert out.returncode != 0
    assert "hydra.sweeper.pruner" in out.stderr + out.stdout and not _sweep_dir(tmp_path).joinpath("trial-0").exists()


def test_a_pruned_run_is_tagged_pruned_in_wandb(monkeypatch, tmp_path):
    from tests import fake_wandb
    from tests.test_tracking import _tracker
    tracker, _ = _tracker(monkeypatch, tmp_path, ["tags=[mine]"])
    tracker.add_tags(["pruned"])
    assert fake_wandb.calls("tags")[-1]["tags"][-2:] == ["mine", "pruned"]


@pytest.mark.parametrize("option, expected", [("none", None), ("median", optuna.pruners.MedianPruner),
                                              ("percentile", optuna.pruners.PercentilePruner),
                                              ("hyperband", optuna.pruners.HyperbandPruner),
                                              ("successive_halving", optuna.pruners.SuccessiveHalvingPruner)])
def test_every_pruner_option_builds_its_pruner(option, expected):
    node = OmegaConf.load(REPO / "conf" / "hydra" / "sweeper" / "pruner" / f"{option}.yaml").pruner
    pruner = build_pruner(node, ["maximize"])
    assert pruner is None if expected is None else type(pruner) is expected
