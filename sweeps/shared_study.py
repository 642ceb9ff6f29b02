"""An Optuna sweep that many independent workers share: one study, a global trial budget, no lost trials.

Each worker (`python run.py -m sweeps=<space> ...`, one per GPU or Slurm job) runs trials one at a time:
- before each new trial it adopts an orphaned RUNNING trial (sweeps.ownership: one its preempted worker released,
  one an earlier life of itself left (a Slurm requeue keeps the worker id), or one whose heartbeat is older than
  grace_period) and resumes it: same trial number, parameters and directory, from that trial's
  checkpoints/last.pt (trainer.resume=true; from scratch when there is none). No trial is failed for silence;
- while complete + RUNNING trials (orphans included) fill the budget it waits for them instead of stopping, and
  adopts an orphan once it may; it stops when the study holds `budget` complete trials: the budget stays exact;
- the sampler seed mixes the configured seed, the worker id and the study's trial count, so no restart of a
  worker re-proposes the parameters of its previous life;
- trial directories are `<sweep dir>/<subdir>` with hydra.job.num = the trial number: keyed by study and trial
  number, never reused (an existing one for a new trial is an error);
- a trial that raises (an error, out of memory, a diverged loss) or returns a non-finite metric is marked FAIL
  with fail_reason; the worker stops after more than max_failure_rate x budget failures of its own;
- every finished trial gets its run directory and final metrics (metrics.json) as user attributes;
- pruning (sweeps.pruning): each job reports its validations to its trial; a job its pruner stopped writes
  `pruned` in metrics.json and its trial is told PRUNED, with user attributes pruned_epoch and last_value;
  `budget_counts` says whether the budget counts COMPLETE trials (default) or COMPLETE + PRUNED (finished).
"""
from __future__ import annotations

import copy
import json
import logging
import signal
import time
import zlib
from pathlib import Path
from typing import Any, Optional

import optuna
from hydra.core.utils import JobReturn
from hydra.plugins.sweeper import Sweeper
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, read_write
from optuna.trial import FrozenTrial, TrialState

from common.runs.run_dir import drop_lock_of, live_holder_here
from common.utils.atomic import atomic_write_text
from common.utils.hydra_lines import trusted_targets
from common.utils.secrets import protect_process, redact
from sweeps import accounting, ownership
from sweeps.launch_secrets import check_launch, private_job_files
from sweeps.pruning import build_pruner, directions_of
from sweeps.space import SearchSpace, as_overrides, search_space
from sweeps.storage import load_study, open_study
from sweeps.trial_check import resume_problem
from sweeps.workers import worker_id

log = logging.getLogger(__name__)
# a run stopped by one of these is resumed, not failed: 0 (the trainer requeued its Slurm job after SIGUSR1 /
# SIGUSR2) or the trainer's preemption exit code 128 + signal
PREEMPTION_CODES = {0} | {128 + s for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)}


def sampler_seed(seed: int, worker: str, trials_so_far: int) -> int:
    return zlib.crc32(f"{seed}:{worker}:{trials_so_far}".encode())


def read_metrics(run_dir: Path) -> dict[str, Any]:
    """The trial's metrics.json ({} when the run wrote none)."""
    metrics_file = run_dir / "metrics.json"
    return json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}


def final_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    flat = metrics.get("best", metrics)
    return {k: v for k, v in flat.items() if isinstance(v, (int, float, str))}


def epoch_counts(metrics: dict[str, Any], job_return: JobReturn) -> dict[str, int]:
    """epochs_run (from metrics.json) and max_epochs (the job's trainer.max_epochs): what pruning saved."""
    counts = {}
    last = metrics.get("last")
    if isinstance(last, dict) and isinstance(last.get("epoch"), int):
        counts["epochs_run"] = last["epoch"] + 1
    max_epochs = OmegaConf.select(job_return.cfg, "trainer.max_epochs") if job_return.cfg is not None else None
    if isinstance(max_epochs, int):
        counts["max_epochs"] = max_epochs
    return counts


def quiet_optuna_logging() -> None:
    """Optuna's lines through Hydra's handlers (one format, no colour codes), not its own coloured handler."""
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()


class SharedStudySweeper(Sweeper):
    def __init__(self, sampler: DictConfig, direction: str, storage: str, study_name: str, budget: int,
                 n_jobs: int, max_failure_rate: float, heartbeat_interval: int, grace_period: int, wait_interval: int,
                 budget_counts: str = "complete", pruner: Optional[DictConfig] = None,
                 params: Optional[DictConfig] = None) -> None:
        if n_jobs != 1:
            raise ValueError(f"hydra.sweeper.n_jobs={n_jobs}: shared-study workers run one trial at a time; "
                             f"start more workers instead")
        if not (isinstance(heartbeat_interval, int) and isinstance(grace_period, int)
                and 0 < heartbeat_interval < grace_period):
            raise ValueError(f"hydra.sweeper.heartbeat_interval={heartbeat_interval}, grace_period={grace_period}: "
                             f"expected positive integers (seconds) with heartbeat_interval < grace_period")
        if not (isinstance(wait_interval, int) and wait_interval > 0):
            raise ValueError(f"hydra.sweeper.wait_interval={wait_interval!r}: expected a positive integer (seconds)")
        if budget_counts not in accounting.BUDGET_COUNTS:
            raise ValueError(f"hydra.sweeper.budget_counts={budget_counts!r}: expected one of "
                             f"{', '.join(accounting.BUDGET_COUNTS)}")
        self.pruner = build_pruner(pruner, directions_of(direction))
        self.budget_counts = budget_counts
        self.sampler_cfg, self.direction, self.storage = sampler, direction, storage
        self.study_name, self.budget, self.max_failure_rate = study_name, budget, max_failure_rate
        self.heartbeat_interval, self.grace_period, self.params = heartbeat_interval, grace_period, params
        self.wait_interval = wait_interval
        self.worker = worker_id()
        self.life, self.lock = ownership.life_of(self.worker), ownership.lock_for(storage)
        self._waited = False
        self._late: set[int] = set()     # trials whose late worker still runs them (_still_running said so)
        protect_process(storage)
        quiet_optuna_logging()

    def setup(self, *, hydra_context, task_function, config) -> None:
        from hydra.core.plugins import Plugins
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function)
        check_launch(config, self.launcher)

    # ---- study -------------------------------------------------------------------------------------------
    def _open(self) -> optuna.Study:
        study = open_study(self.storage, self.study_name, [self.direction])
        study.set_user_attr("metric", str(self.config.optimized_metric))  # for sweeps.report
        study.set_user_attr("budget", self.budget)
        study.set_user_attr("budget_counts", self.budget_counts)
        seed = sampler_seed(int(self.sampler_cfg.seed), self.worker, len(study.get_trials(deepcopy=False)))
        self.seed = seed
        with trusted_targets():         # also outside @hydra.main (Hydra 1.4's execution whitelist)
            sampler = instantiate(self.sampler_cfg, seed=seed)
        log.info(f"study {self.study_name} in {redact(self.storage)}: budget {self.budget} {self.budget_counts} trials; "
                 f"worker {self.worker}, sampler seed {seed}")
        return load_study(self.storage, self.study_name, sampler=sampler, pruner=self.pruner)

    def _search_space(self, arguments: list[str]) -> SearchSpace:
        """hydra.sweeper.params, then the command line's overrides (a key given on both: the command line's)."""
        return search_space([f"{k!s}={v}" for k, v in (self.params or {}).items()] + list(arguments))

    def trial_dir(self, number: int) -> Path:
        cfg = copy.deepcopy(self.config)
        with read_write(cfg.hydra.job):  # Hydra 1.4 hands the sweeper read-only nodes
            cfg.hydra.job.num = number
        return Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)

    # ---- one trial ---------------------------------------------------------------------------------------
    def _launch(self, study: optuna.Study, trial_id: int, number: int, overrides: list[str]) -> JobReturn:
        with accounting.Heartbeat(study, trial_id, self.heartbeat_interval, self.life):
            try:
                with private_job_files(self.launcher):
                    return self.launcher.launch([overrides], initial_job_idx=number)[0]
            except SystemExit as stop:
                if stop.code in PREEMPTION_CODES:
                    self._release(study, trial_id, number, stop.code)
                raise

    def _release(self, study: optuna.Study, trial_id: int, number: int, code: int) -> None:
        """A preempted trial stays RUNNING, marked `preempted`, and goes to the next worker that looks."""
        how = "requeued" if code == 0 else f"exit {code}"
        optuna.trial.Trial(study, trial_id).set_user_attr(
            "preempted", f"worker {self.worker} stopped ({how}) at {time.strftime('%Y-%m-%d %H:%M:%S')}")
        released = ownership.release(study, trial_id, self.life, self.lock)
        log.warning(f"trial {number} preempted ({how}): it stays RUNNING"
                    + (" and the next worker of this study to start a trial resumes it from its last.pt"
                       if released else f", but it already belongs to {ownership.owner(study, trial_id)}"))

    def _record(self, study: optuna.Study, trial_id: int, number: int, job_return: JobReturn,
                run_dir: Path) -> str:
        """Tell the study how the trial ended: "complete", "pruned" or "failed"; "lost" (nothing told) when another
        worker adopted the trial meanwhile."""
        try:
            value = job_return.return_value
        except Exception as err:  # the trial's own exception (re-raised by JobReturn): its reason
            reason = accounting.failure_reason(err)
        else:
            reason = accounting.value_failure(value, str(self.config.optimized_metric), str(run_dir))
        if ownership.owner(study, trial_id) != self.life:
            log.warning(f"trial {number} ended here, but another worker adopted it meanwhile (this worker's "
                        f"heartbeats were late): its result is theirs to record; this run is in {run_dir}")
            return "lost"
        trial = optuna.trial.Trial(study, trial_id)
        metrics = read_metrics(run_dir)
        for key, attr in {**final_metrics(metrics), **epoch_counts(metrics, job_return)}.items():
            trial.set_user_attr(key, attr)
        if reason is not None:
            accounting.mark_failed(study, trial_id, number, reason)
            return "failed"
        pruned = metrics.get("pruned")     # {"epoch", "value"} where the trial's pruner stopped its run
        if pruned is not None:
            trial.set_user_attr("pruned_epoch", pruned["epoch"])
            trial.set_user_attr("last_value", pruned["value"])
        outcome = "complete" if pruned is None else "pruned"
        try:
            if pruned is None:
                study.tell(number, values=[float(value)])
            else:
                study.tell(number, state=TrialState.PRUNED)
        except (RuntimeError, ValueError) as err:
            log.warning(f"trial {number} ended ({outcome}) but had been finished by another worker meanwhile: "
                        f"{err}; its run is in {run_dir}")
            return "failed"
        if pruned is not None:
            log.info(f"trial {number} pruned at epoch {pruned['epoch']} (value {pruned['value']})")
        return outcome

    def _run(self, study: optuna.Study, trial: FrozenTrial, overrides: list[str]) -> str:
        run_dir = Path(self.trial_dir(trial.number))
        job_return = self._launch(study, trial._trial_id, trial.number, overrides)
        return self._record(study, trial._trial_id, trial.number, job_return, run_dir)

    def _new_trial(self, study: optuna.Study, space: SearchSpace) -> Optional[FrozenTrial]:
        trial = study.ask(fixed_distributions=space.distributions)
        if accounting.is_surplus(study, trial.number, self.budget, self.budget_counts):
            trial.set_user_attr("surplus", True)
            study.tell(trial, state=TrialState.PRUNED)
            return None
        run_dir = self.trial_dir(trial.number)
        if run_dir.exists():
            accounting.mark_failed(study, trial._trial_id, trial.number, f"trial directory {run_dir} exists")
            raise FileExistsError(f"trial {trial.number}: its directory {run_dir} already exists (a deleted study "
                                  f"of the same name?): choose another hydra.sweeper.study_name or move it")
        ownership.take_new(study, trial._trial_id, self.life)
        accounting.claim(study, trial._trial_id, self.worker, run_dir=str(run_dir), sampler_seed=self.seed)
        return study._storage.get_trial(trial._trial_id)

    def _adopt(self, study: optuna.Study, space: SearchSpace) -> tuple[Optional[FrozenTrial], int]:
        """An orphaned RUNNING trial this worker won (sweeps.ownership), or None; and how many orphans it failed
        instead: one whose stored parameters or directory are not what this worker could have proposed
        (sweeps.trial_check) is failed with the reason, never run."""
        failed = 0
        for frozen, why in ownership.orphans(study, self.worker, self.grace_period, time.time()):
            run_dir = frozen.user_attrs.get("run_dir")
            if run_dir and self._still_running(frozen.number, why, run_dir):
                continue
            if not ownership.adopt(study, frozen, self.life, self.lock):
                continue                    # another worker adopted it first
            problem = resume_problem(frozen.params, space.distributions, run_dir,
                                     str(self.trial_dir(frozen.number)))
            if problem is not None:
                accounting.mark_failed(study, frozen._trial_id, frozen.number,
                                       f"not resumed: the study database holds {problem}")
                failed += 1
                continue
            previous = ownership.process_of(frozen.system_attrs.get(ownership.OWNER))
            if previous is not None:        # the run of a worker presumed dead on another host held its directory
                drop_lock_of(run_dir, *previous)
            trial = optuna.trial.Trial(study, frozen._trial_id)
            trial.set_user_attr("resumed", int(frozen.user_attrs.get("resumed", 0)) + 1)
            accounting.claim(study, frozen._trial_id, self.worker)
            last_pt = Path(frozen.user_attrs["run_dir"]) / "checkpoints" / "last.pt"
            log.info(f"adopting trial {frozen.number} ({why}): resuming it in {frozen.user_attrs['run_dir']} with "
                     f"its parameters {frozen.params}, "
                     + (f"from {last_pt}" if last_pt.is_file() else "from scratch (it has no last.pt)"))
            return frozen, failed
        return None, failed

    def _still_running(self, number: int, why: str, run_dir: str) -> bool:
        """Whether a live process of this host still runs the trial in `run_dir` (its heartbeats only late): not
        an orphan; said once per trial."""
        holder = live_holder_here(run_dir)
        if holder is not None and number not in self._late:
            log.info(f"trial {number} looks orphaned ({why}), but {holder} still runs it in {run_dir}: "
                     f"left to it")
            self._late.add(number)
        return holder is not None

    # ---- the loop ----------------------------------------------------------------------------------------
    def _wait_for_running(self, study: optuna.Study, complete: int, live: int) -> None:
        if not self._waited:
            log.info(f"study {self.study_name}: {complete} complete + {live} running trials of other workers fill "
                     f"the budget {self.budget}; waiting for them to finish (or to miss heartbeats for "
                     f"{self.grace_period} s, when this worker adopts and resumes them)")
            self._waited = True
        time.sleep(self.wait_interval)

    def _check_failures(self, failures: int) -> None:
        if failures > self.max_failure_rate * self.budget:
            raise RuntimeError(f"{failures} trials failed in this worker, more than max_failure_rate="
                               f"{self.max_failure_rate} of the budget {self.budget}; see each trial's fail_reason "
                               f"(python -m sweeps.report {Path(str(self.config.hydra.sweep.dir))})")

    def sweep(self, arguments: list[str]) -> None:
        space = self._search_space(arguments)
        study = self._open()
        ran = failures = 0
        while True:
            trial, failed = self._adopt(study, space)
            failures += failed
            if trial is not None:
                overrides = as_overrides(trial.params, space) + ["trainer.resume=true"]
            else:
                complete, live = accounting.counts(study, self.budget_counts)
                if complete >= self.budget:
                    break
                if complete + live >= self.budget:
                    self._wait_for_running(study, complete, live)
                    continue
                trial = self._new_trial(study, space)
                if trial is None:
                    continue
                overrides = as_overrides(trial.params, space)
            ran += 1
            failures += self._run(study, trial, overrides) == "failed"
            self._check_failures(failures)
        self._finish(study, ran)

    def _finish(self, study: optuna.Study, ran: int) -> None:
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        pruned = [t for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
                  if not t.user_attrs.get("surplus")]
        counted = f"{len(complete)} complete and {len(pruned)} pruned trials (budget {self.budget} {self.budget_counts})"
        if not complete:
            log.info(f"study {self.study_name}: {counted}: no trial completed, so no best value")
            return
        best = study.best_trial
        if ran == 0:
            log.info(f"study {self.study_name} is finished: {counted}; nothing to run. Best value {best.value} "
                     f"(trial {best.number}); see python -m sweeps.report {Path(str(self.config.hydra.sweep.dir))}")
            return
        results = {"name": "optuna", "study_name": study.study_name, "complete_trials": len(complete),
                   "pruned_trials": len(pruned), "best_trial": best.number, "best_params": best.params,
                   "best_value": best.value}
        atomic_write_text(Path(str(self.config.hydra.sweep.dir)) / "optimization_results.yaml",
                          OmegaConf.to_yaml(results))
        log.info(f"study {self.study_name}: {counted}; best value {best.value} (trial {best.number})")
