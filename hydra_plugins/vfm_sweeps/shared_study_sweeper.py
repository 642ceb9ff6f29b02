"""Hydra discovers sweepers only under the `hydra_plugins` namespace: this shim exposes sweeps.shared_study."""
from typing import Any, List, Optional

from hydra.plugins.sweeper import Sweeper


class SharedStudySweeper(Sweeper):
    def __init__(self, sampler: Any, direction: Any, storage: Optional[str], study_name: str, budget: int,
                 n_jobs: int, max_failure_rate: float, heartbeat_interval: Optional[int],
                 grace_period: Optional[int], params: Optional[Any] = None) -> None:
        from sweeps.shared_study import SharedStudySweeperImpl

        # The parent's n_trials slot gets the budget too, but the loop counts the study's trials, not its own.
        self.sweeper = SharedStudySweeperImpl(
            sampler, direction, storage, study_name, budget, n_jobs, max_failure_rate, None, None, params,
            budget=budget, heartbeat_interval=heartbeat_interval, grace_period=grace_period)

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> None:
        return self.sweeper.sweep(arguments)
