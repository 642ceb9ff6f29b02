"""Entry point: python run.py task=<biomass|sclera|roadwork> [mode=train|eval|predict|cv|synth] [overrides]

Returns the value of `optimized_metric`, so any run can be swept with Optuna (`-m` with a sweeps= config).
"""
import os

from common.cluster import preemption

preemption.install()  # first: a Slurm signal during start-up is kept for the trainer, not fatal

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from common.runs.choices import check_config  # noqa: E402
from common.runs.resolvers import register_resolvers as register_path_resolvers  # noqa: E402
from common.utils.hydra_lines import main_options  # noqa: E402
from sweeps.workers import register_resolvers  # noqa: E402

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("SQLALCHEMY_SILENCE_UBER_WARNING", "1")  # optuna 2.10 pins SQLAlchemy < 2
register_path_resolvers()
register_resolvers()


@hydra.main(config_path="conf", config_name="config", **main_options())
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    check_config(cfg, dict(HydraConfig.get().runtime.choices))
    from common.runs.app import run
    return run(cfg)


if __name__ == "__main__":
    main()
