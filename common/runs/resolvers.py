"""OmegaConf resolvers the config tree uses; registered by run.py (and the tests) before Hydra composes.

`${cwd:}` is the directory the command was started from. Hydra's own `${hydra:runtime.cwd}` cannot be used
in keys that Hydra resolves before a job exists (`hydra.sweep.dir` of a `-m` run), hence this resolver.
"""
from __future__ import annotations

import os

from omegaconf import OmegaConf


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("cwd"):
        OmegaConf.register_new_resolver("cwd", os.getcwd, use_cache=True)
