"""Hydra callback of every sweep (sweeps/_base.yaml): the storage password never reaches a file or a log line.

Hydra writes the job's `.hydra/{config,hydra,overrides}.yaml` (hydra.yaml holds the command line's
`hydra.sweeper.storage=...`) just before on_job_start: they are rewritten redacted before the run starts.
"""
from __future__ import annotations

from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from common.utils.secrets import protect_process, redact_file


class RedactSecrets(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        protect_process(str(config.hydra.sweeper.storage))

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        protect_process(str(config.hydra.sweeper.storage))
        if config.hydra.output_subdir is not None:
            hydra_dir = Path(config.hydra.runtime.output_dir) / str(config.hydra.output_subdir)
            for path in sorted(hydra_dir.glob("*.yaml")):
                redact_file(path)
