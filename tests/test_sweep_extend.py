"""A finished sweep extended as the README's Slurm section says: workers started again with a larger
hydra.sweeper.budget add trials numbered after the existing ones, in new trial-<n>/ directories, until the study
holds the new budget; a worker with the old budget adds nothing."""
from pathlib import Path

import pytest
from optuna.trial import TrialState

from tests.test_sweeps import _study, _sweep_dir, _worker


@pytest.mark.slow
def test_a_larger_budget_extends_a_finished_sweep(tmp_path):
    first = _worker(tmp_path, "w0", ["hydra.sweeper.budget=1"])
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    before = _study(tmp_path).trials
    assert [t.state for t in before] == [TrialState.COMPLETE]

    old = _worker(tmp_path, "w1", ["hydra.sweeper.budget=1"])
    assert "is finished: 1 complete and 0 pruned trials (budget 1 complete); nothing to run" in old.stdout
    more = _worker(tmp_path, "w2", ["hydra.sweeper.budget=2"])
    assert more.returncode == 0, more.stdout[-3000:] + more.stderr[-3000:]
    trials = _study(tmp_path).trials
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 2 and complete[0].params == before[0].params
    added = complete[1]
    assert added.number > before[0].number and added.user_attrs["worker"] == "w2"
    assert added.params != before[0].params
    assert Path(added.user_attrs["run_dir"]) == _sweep_dir(tmp_path) / f"trial-{added.number}"
    assert (_sweep_dir(tmp_path) / f"trial-{added.number}" / "metrics.json").is_file()
