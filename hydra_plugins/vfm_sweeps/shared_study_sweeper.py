"""Hydra discovers sweepers only under the `hydra_plugins` namespace: this shim exposes sweeps.shared_study."""
from typing import Any, List, Optional

from hydra.plugins.sweeper import Sweeper


class SharedStudySweeper(Sweeper):
    def __init__(self, sampler: Any, direction: Any, storage: str, study_name: str, budget: int, n_jobs: int,
                 max_failure_rate: float, heartbeat_interval: int, grace_period: int, wait_interval: int,
                 budget_counts: str = "complete", pruner: Optional[Any] = None, params: Optional[Any] = None) -> None:
        from sweeps.shared_study import SharedStudySweeper as Impl

        self.sweeper = Impl(sampler=sampler, direction=direction, storage=storage, study_name=study_name,
                            budget=budget, n_jobs=n_jobs, max_failure_rate=max_failure_rate,
                            heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                            wait_interval=wait_interval,
                            budget_counts=budget_counts, pruner=pruner, params=params)

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> None:
        return self.sweeper.sweep(arguments)
