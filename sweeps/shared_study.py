"""An Optuna sweep that many independent workers share: one study, a global trial budget, no lost trials.

Each worker (`python run.py -m sweeps=<space> ...`, one per GPU or Slurm job) runs trials one at a time:
- the study is created under a file lock (SQLite) or beforehand with `python -m sweeps.create_study`;
- before each trial, trials whose worker stopped sending heartbeats (killed, node lost) are marked FAIL;
- a trial asked beyond the budget (complete + running trials, ordered by trial number) is marked PRUNED
  with user attribute `surplus`, and the worker stops: the study ends with exactly `budget` complete trials;
- a trial that raises (an error, out of memory, a diverged loss) is marked FAIL with its reason in the user
  attribute `fail_reason`, and the sweep goes on until more than `max_failure_rate * budget` trials failed;
- every finished trial gets its run directory and final metrics (metrics.json) as user attributes.
"""
from __future__ import annotations

import json
import logging
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import optuna
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from omegaconf import OmegaConf
from optuna.trial import TrialState

from common.atomic import atomic_write_text, file_lock

log = logging.getLogger(__name__)


def make_storage(url: str, heartbeat_interval: Optional[int], grace_period: Optional[int]):
    if not url:
        raise ValueError("hydra.sweeper.storage is empty: a shared study needs a database URL "
                         "(sqlite:///path/study.db on one machine, postgresql://... for many; or OPTUNA_STORAGE)")
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                                      grace_period=grace_period)


@contextmanager
def creation_lock(url: str):
    """Serialise study creation between processes of one machine (SQLite); other databases: pre-create."""
    if not url.startswith("sqlite:///"):
        yield
        return
    with file_lock(url[len("sqlite:///"):] + ".lock"):
        yield


def open_study(url: str, study_name: str, directions: list[str], sampler=None,
               heartbeat_interval: Optional[int] = None, grace_period: Optional[int] = None) -> optuna.Study:
    with creation_lock(url):  # RDBStorage creates the schema tables: that races too, not only create_study
        storage = make_storage(url, heartbeat_interval, grace_period)
        return optuna.create_study(study_name=study_name, storage=storage, sampler=sampler,
                                   directions=directions, load_if_exists=True)


class Heartbeat:
    """Records the trial's heartbeat every `interval` seconds while the trial runs in this process."""

    def __init__(self, storage, trial_id: int, interval: Optional[int]):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self):
        while not self._stop.wait(self.interval):
            self.storage.record_heartbeat(self.trial_id)

    def __enter__(self):
        if self.interval:
            self.storage.record_heartbeat(self.trial_id)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def is_surplus(study: optuna.Study, trial: optuna.trial.Trial, budget: int) -> bool:
    active = sorted(t.number for t in study.get_trials(deepcopy=False,
                                                       states=(TrialState.COMPLETE, TrialState.RUNNING)))
    return active.index(trial.number) >= budget


def final_metrics(job_return) -> dict[str, Any]:
    run_dir = Path(job_return.hydra_cfg.hydra.runtime.output_dir)
    metrics_file = run_dir / "metrics.json"
    attrs: dict[str, Any] = {"run_dir": str(run_dir)}
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
        flat = metrics.get("best", metrics)
        attrs.update({k: v for k, v in flat.items() if isinstance(v, (int, float, str))})
    return attrs


class SharedStudySweeperImpl(OptunaSweeperImpl):
    def __init__(self, *args, budget: int, heartbeat_interval: Optional[int], grace_period: Optional[int],
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.budget, self.heartbeat_interval, self.grace_period = budget, heartbeat_interval, grace_period

    def _search_space(self, arguments: list[str]):
        self._process_searchspace_config()
        params_conf = self._parse_sweeper_params_config() + list(arguments)
        distributions, fixed = create_params_from_overrides(params_conf)
        distributions = {**(self.search_space_distributions or {}), **distributions}
        for name in fixed:
            distributions.pop(name, None)
        return distributions, fixed

    def _record(self, study: optuna.Study, trial, job_return) -> bool:
        """Tell the study how the trial ended; True when it completed."""
        storage = study._storage
        try:
            value = float(job_return.return_value)
            if value != value:  # NaN: nothing was ever finite
                raise ValueError("the monitored metric was never finite (the run diverged)")
        except Exception as err:  # the trial's own exception (re-raised by JobReturn), kept as its reason
            storage.set_trial_user_attr(trial._trial_id, "fail_reason", f"{type(err).__name__}: {err}"[:2000])
            study.tell(trial, state=TrialState.FAIL)
            log.warning(f"trial {trial.number} failed: {type(err).__name__}: {err}")
            return False
        for key, attr in final_metrics(job_return).items():
            storage.set_trial_user_attr(trial._trial_id, key, attr)
        study.tell(trial, values=[value])
        return True

    def sweep(self, arguments: list[str]) -> None:
        if self.n_jobs != 1:
            raise ValueError(f"hydra.sweeper.n_jobs={self.n_jobs}: shared-study workers run one trial at a time; "
                             f"start more workers instead")
        distributions, fixed = self._search_space(arguments)
        study = open_study(self.storage, self.study_name, self._get_directions(), self.sampler,
                           self.heartbeat_interval, self.grace_period)
        log.info(f"study {study.study_name} in {self.storage}: budget {self.budget} complete trials")
        failures = 0
        while True:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
            trial = study.ask()
            if is_surplus(study, trial, self.budget):
                study._storage.set_trial_user_attr(trial._trial_id, "surplus", True)
                study.tell(trial, state=TrialState.PRUNED)
                break
            overrides = self._configure_trials([trial], distributions, fixed)
            with Heartbeat(study._storage, trial._trial_id, self.heartbeat_interval):
                job_return = self.launcher.launch(overrides, initial_job_idx=self.job_idx)[0]
            self.job_idx += 1
            if not self._record(study, trial, job_return):
                failures += 1
                if failures > self.max_failure_rate * self.budget:
                    raise RuntimeError(f"{failures} trials failed in this worker, more than max_failure_rate="
                                       f"{self.max_failure_rate} of the budget {self.budget}; see each trial's "
                                       f"fail_reason in the study")
        self._write_results(study)

    def _write_results(self, study: optuna.Study) -> None:
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        results = {"name": "optuna", "study_name": study.study_name, "complete_trials": len(complete)}
        if complete:
            results.update(best_params=study.best_trial.params, best_value=study.best_trial.value)
        atomic_write_text(Path(self.config.hydra.sweep.dir) / "optimization_results.yaml", OmegaConf.to_yaml(results))
        log.info(f"study {study.study_name}: {len(complete)} complete trials; {results.get('best_value')}")
