"""Optuna pruning for shared-study sweeps: each job reports its validations to its own trial, the sweep's pruner
decides whether it goes on.

Hydra's Optuna sweeper never gave a job its trial (hydra issue 1954). Here the job opens it itself: a job of a
shared-study sweep (sweeps/_base.yaml sets `sweep_trial` to JobTrial.from_hydra) reads the storage, the study name
and the trial number (hydra.job.num) from its own Hydra config, so the same code serves an in-process job, a
submitit job on a Slurm node and a requeued one: the intermediate values live in the study, never in a process.

- `hydra.sweeper.pruner`: any optuna pruner `_target_` (MedianPruner, PercentilePruner, SuccessiveHalvingPruner,
  HyperbandPruner, ThresholdPruner, or a BasePruner subclass of your own), or null: trials report, none is pruned.
- The trainer calls `JobTrial.report(value, epoch)` after every validation: the monitored metric, reported in the
  study's direction; an epoch the trial already holds (a requeued job repeating it) is not reported again, and a
  non-finite value is never reported. It returns True when the pruner stops the trial.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Optional

import optuna
from hydra.utils import instantiate
from omegaconf import DictConfig

log = logging.getLogger(__name__)
PRUNER_KEY = "hydra.sweeper.pruner"


def directions_of(direction) -> list[str]:
    """hydra.sweeper.direction as a list: one direction (a string) or several."""
    return [direction] if isinstance(direction, str) else list(direction)


def build_pruner(node: Optional[DictConfig], directions: list[str]) -> Optional[optuna.pruners.BasePruner]:
    """The pruner of `hydra.sweeper.pruner` (None when null); a clear error naming the key otherwise."""
    if node is None:
        return None
    if not isinstance(node, DictConfig) or not isinstance(node.get("_target_"), str):
        raise ValueError(f"{PRUNER_KEY}: expected null or a node with `_target_: optuna.pruners.<Pruner>` "
                         f"(MedianPruner, PercentilePruner, SuccessiveHalvingPruner, HyperbandPruner, "
                         f"ThresholdPruner) and its arguments, got {node!r}")
    if len(directions) > 1:
        raise ValueError(f"{PRUNER_KEY}={node._target_} with {len(directions)} directions {directions}: Optuna "
                         f"prunes single-objective studies only; set {PRUNER_KEY}=null")
    pruner = instantiate(node)
    if not isinstance(pruner, optuna.pruners.BasePruner):
        raise ValueError(f"{PRUNER_KEY}: {node._target_} made a {type(pruner).__name__}, not an optuna pruner "
                         f"(a subclass of optuna.pruners.BasePruner)")
    return pruner


class JobTrial:
    """Trial `number` of a study, reported to by one run (and by its requeued lives: what it reported lives in the
    study). `from_hydra()` (the `_target_` of `sweep_trial`) opens the trial of this sweep job."""

    def __init__(self, storage: str, study_name: str, number: int, pruner: Optional[optuna.pruners.BasePruner]):
        from sweeps.storage import load_study
        self.study = load_study(storage, study_name, pruner=pruner)
        self.number = int(number)
        self.trial_id = self.study._storage.get_trial_id_from_study_id_trial_number(self.study._study_id, number)
        self.trial = optuna.trial.Trial(self.study, self.trial_id)

    @classmethod
    def from_hydra(cls) -> "JobTrial":
        from hydra.core.hydra_config import HydraConfig
        hydra = HydraConfig.get()
        direction = hydra.sweeper.direction
        pruner = build_pruner(hydra.sweeper.get("pruner"), directions_of(direction))
        return cls(str(hydra.sweeper.storage), str(hydra.sweeper.study_name), int(hydra.job.num), pruner)

    def reported(self) -> dict[int, float]:
        """What the trial holds: {epoch: value}."""
        return dict(self.study._storage.get_trial(self.trial_id).intermediate_values)

    def report(self, value: Any, epoch: int) -> bool:
        """Report `value` at `epoch` (an epoch already reported, by an earlier life of a requeued job, is not
        reported again; a non-finite value never is); True when the pruner stops the trial here."""
        if epoch not in self.reported() and isinstance(value, (int, float)) and math.isfinite(value):
            self.trial.report(float(value), epoch)
        prune = self.trial.should_prune()
        if prune:
            log.info(f"[sweep] trial {self.number} pruned at epoch {epoch} (value {value}) by "
                     f"{type(self.study.pruner).__name__}")
        return prune
