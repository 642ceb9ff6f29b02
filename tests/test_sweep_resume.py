"""A sweep worker killed mid-trial and restarted with the same id (a Slurm requeue keeps SLURM_JOB_ID; here
SWEEP_WORKER_ID) resumes that trial: same number, parameters and directory, from its last.pt."""
import json
import signal
from pathlib import Path

import pytest
from optuna.trial import TrialState

from tests.test_sweeps import BEAT, _study, _sweep_dir, _wait_for, _worker

SLOW = [*BEAT, "hydra.sweeper.budget=2", "trainer.max_epochs=3", "loss.sleep_s=0.3"]


@pytest.mark.slow
def test_requeued_worker_resumes_its_trial(tmp_path):
    first = _worker(tmp_path, "slurm-77", SLOW, popen=True)
    last_pt = _sweep_dir(tmp_path) / "trial-0" / "checkpoints" / "last.pt"
    _wait_for(last_pt.exists, "trial 0's last.pt after its first epoch")
    first.send_signal(signal.SIGKILL)
    first.wait()
    before = _study(tmp_path).trials
    assert [t.state for t in before] == [TrialState.RUNNING]

    second = _worker(tmp_path, "slurm-77", SLOW)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"resumed from {last_pt}" in second.stdout + second.stderr
    trials = _study(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
    resumed, new = trials
    assert resumed.params == before[0].params and resumed.user_attrs["resumed"] == 1
    assert resumed.user_attrs["run_dir"] == str(last_pt.parents[1])
    epochs = [json.loads(line)["epoch"] for line in (last_pt.parents[1] / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2]  # epoch 0 from the first life, 1 and 2 after the resume: nothing trained twice
    # the restarted worker draws from a new seed: not trial 0's parameters again
    assert new.user_attrs["sampler_seed"] != resumed.user_attrs["sampler_seed"]
    assert new.params != resumed.params
    assert Path(new.user_attrs["run_dir"]).name == "trial-1"
