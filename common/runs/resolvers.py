"""OmegaConf resolvers the config tree uses; registered by run.py (and the tests) before Hydra composes.

`${cwd:}` is the directory the command was started from. Hydra's own `${hydra:runtime.cwd}` cannot be used
in keys that Hydra resolves before a job exists (`hydra.sweep.dir` of a `-m` run), hence this resolver.

`${config_groups:}` is the list of config groups `--help` prints (hydra.help.template in conf/config.yaml): Hydra's
own list ($APP_CONFIG_GROUPS), without the private options, the files whose name starts with `_` (shared parts
such as model/biomass/_common or sweeps/_base, composed by other options, never chosen on the command line).
"""
from __future__ import annotations

import os

from common.utils.hydra_lines import register_resolver


def public_config_groups() -> str:
    """`group: option, option` lines of every config group but Hydra's own, as Hydra's --help lists them
    (its config search path included), private options left out."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.object_type import ObjectType
    hydra = GlobalHydra.instance().hydra
    if hydra is None:
        raise RuntimeError("${config_groups:} lists the groups of a running Hydra app (python run.py --help)")
    lines = []
    for group in sorted(hydra.list_all_config_groups()):
        options = [o for o in sorted(hydra.config_loader.get_group_options(group, ObjectType.CONFIG))
                   if not o.startswith("_")]
        if options and group.split("/")[0] != "hydra":
            lines.append(f"{group}: {', '.join(options)}")
    return "\n".join(lines)


def register_resolvers() -> None:
    register_resolver("cwd", os.getcwd)
    register_resolver("config_groups", public_config_groups)
