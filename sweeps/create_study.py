"""Create a sweep's study before its workers start (two workers creating one new study at once can race).

    python -m sweeps.create_study task=sclera sweeps=sclera_adapters [hydra.sweeper.storage=postgresql://...]

Prints the study name and storage (password redacted); running it again is harmless.
"""
from __future__ import annotations

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from common.runs.resolvers import register_resolvers as register_path_resolvers
from common.utils.hydra_lines import version_base
from common.utils.secrets import protect_process, redact
from sweeps.storage import open_study
from sweeps.workers import register_resolvers

CONF = Path(__file__).resolve().parents[1] / "conf"


def main(overrides: list[str]) -> None:
    register_path_resolvers()          # ${cwd:} of paths (as run.py)
    register_resolvers()
    protect_process(None)
    with initialize_config_dir(config_dir=str(CONF), **version_base()):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    sweeper = cfg.hydra.sweeper
    if "budget" not in sweeper:
        raise SystemExit("no sweeps=<search space> given: e.g. python -m sweeps.create_study task=sclera "
                         "sweeps=sclera_adapters")
    protect_process(sweeper.storage)
    study = open_study(sweeper.storage, sweeper.study_name, [sweeper.direction])
    print(f"study {study.study_name} ready in {redact(sweeper.storage)} ({len(study.trials)} trials so far)")


if __name__ == "__main__":
    main(sys.argv[1:])
