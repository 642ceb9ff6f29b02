"""A pruner whose decisions a test can predict: trials with an odd number are pruned at their first report."""
import optuna


class OddTrials(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return trial.number % 2 == 1 and bool(trial.intermediate_values)
