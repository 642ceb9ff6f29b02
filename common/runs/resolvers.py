"""OmegaConf resolvers the config tree uses; registered by run.py (and the tests) before Hydra composes.

`${cwd:}` is the directory the command was started from. Hydra's own `${hydra:runtime.cwd}` cannot be used
in keys that Hydra resolves before a job exists (`hydra.sweep.dir` of a `-m` run), hence this resolver.
"""
from __future__ import annotations

import os

from common.utils.hydra_lines import register_resolver


def register_resolvers() -> None:
    register_resolver("cwd", os.getcwd)
