"""The study database is data (issue 30): a RUNNING trial planted in it, with a parameter holding a `_target_`, an
out-of-range value, an extra key or another directory, is failed with the reason and never run by the worker
that would resume it; a trial it could have proposed itself is resumed."""
from __future__ import annotations

import functools
import re
import types

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from sweeps.shared_study import SharedStudySweeper
from sweeps.space import int_distribution, search_space
from sweeps.trial_check import resume_problem

SPACE = ["trainer.optim.lr=tag(log, interval(1e-4, 1e-2))", "model.head.hidden=choice(128, 256, 512)",
         "model.head.dropout=interval(0.0, 0.4)"]
PAYLOAD = "{_target_: pathlib.Path.write_text, _args_: [{_target_: pathlib.Path, _args_: [/tmp/x.pth]}, 'import os']}"


def _running_study(tmp_path, planted: list[dict]):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="s", direction="maximize")
    for params, run_dir in planted:
        trial = study.ask()
        for name, value in params.items():     # a one-choice distribution: the sampler can only store `value`
            trial._suggest(name, CategoricalDistribution([value]))
        trial.set_user_attr("worker", "w1")
        trial.set_user_attr("run_dir", run_dir)
    return study


def _worker(tmp_path):
    """What SharedStudySweeper._adopt reads of the worker: w1 again (a requeued life), adopting its trial."""
    worker = types.SimpleNamespace(worker="w1", life="w1 host 2 2.0", lock=None, grace_period=180, seed=0,
                                   trial_dir=lambda number: tmp_path / f"trial-{number}", _late=set())
    worker._still_running = functools.partial(SharedStudySweeper._still_running, worker)
    return worker


GOOD = {"trainer.optim.lr": 1e-3, "model.head.hidden": 256, "model.head.dropout": 0.1}


@pytest.mark.parametrize("change,reason", [
    ({"model.head.hidden": PAYLOAD}, r"model\.head\.hidden=.\{_target_: pathlib.*is not one of its choices"),
    ({"trainer.optim.lr": 10.0}, r"trainer\.optim\.lr=10\.0 is outside \[0\.0001, 0\.01\]"),
    ({"model.head.hidden": 257}, r"model\.head\.hidden=257 is not one of its choices \[128, 256, 512\]"),
    ({"model.head._target_": "pathlib.Path.write_text"}, r"extra \['model\.head\._target_'\]"),
])
def test_a_planted_running_trial_is_failed_and_never_run(tmp_path, change, reason):
    study = _running_study(tmp_path, [({**GOOD, **change}, str(tmp_path / "trial-0"))])
    worker = _worker(tmp_path)
    assert SharedStudySweeper._adopt(worker, study, search_space(SPACE)) == (None, 1)
    trial = study.trials[0]
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs["fail_reason"].startswith("not resumed: the study database holds ")
    assert re.search(reason, trial.user_attrs["fail_reason"])


def test_a_trial_the_worker_could_propose_is_resumed(tmp_path):
    study = _running_study(tmp_path, [(GOOD, str(tmp_path / "trial-0"))])
    trial, failed = SharedStudySweeper._adopt(_worker(tmp_path), study, search_space(SPACE))
    assert failed == 0 and trial.number == 0 and trial.params == GOOD
    assert study.trials[0].state == TrialState.RUNNING and study.trials[0].user_attrs["resumed"] == 1


def test_another_run_dir_and_types_are_refused():
    space = search_space(SPACE).distributions
    assert "is not '/sweep/trial-0'" in resume_problem(GOOD, space, "/home/victim", "/sweep/trial-0")
    assert resume_problem(GOOD, space, "/sweep/trial-0", "/sweep/trial-0") is None
    ints = {"n": int_distribution(1, 9, step=2)}
    assert "is not an integer" in resume_problem({"n": "3"}, ints, "d", "d")
    assert "is not on the grid 1 + k * 2" in resume_problem({"n": 4}, ints, "d", "d")
    assert resume_problem({"n": 5}, ints, "d", "d") is None
    assert "is not a finite number" in resume_problem({**GOOD, "model.head.dropout": float("nan")}, space, "d", "d")
