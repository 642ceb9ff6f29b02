"""What differs between the two dependency lines (constraints.txt: hydra-core 1.3.8 + omegaconf 2.3;
constraints-modern.txt: hydra-core 1.4 + omegaconf 2.4), in one place, so the rest of the suite reads the same on
both and neither line prints a "will break" warning.

- `version_base`: Hydra 1.3 needs "1.3" (unset means 1.1 behaviour, with a warning); Hydra 1.4 deprecates the
  parameter (its behaviour is 1.3's) and warns whenever it is given.
- Execution whitelist (Hydra 1.4): the `_target_`s that `instantiate` and Hydra's logging config may call. Without
  one Hydra 1.4 warns at every call ("will become an error in Hydra 1.5"); with one a target outside it is refused.
  Hydra 1.3 has no whitelist and calls any target.
- Resolvers: omegaconf 2.4 renamed `register_new_resolver` to `register_resolver` (the old name warns; omegaconf
  2.3's `register_resolver` is an older, different API).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import hydra
from omegaconf import OmegaConf

HYDRA_WHITELIST = "execution_whitelist" in inspect.signature(hydra.main).parameters   # hydra-core >= 1.4

# The code a config may name: the suite's own packages, and the libraries whose classes its configs build. A
# `_target_` outside these fails on the modern line (Hydra's message names it); add its package here to allow it.
TRUSTED_TARGETS = (
    "common.*", "biomass.*", "sclera.*", "roadwork.*", "sweeps.*", "hydra_plugins.vfm_sweeps.*",
    "hydra_plugins.vfm_launchers.*",
    "tests.toy.*",                                         # the test suite's toy task (tests/toy/conf)
    "torch.optim.*", "albumentations.*", "optuna.samplers.*", "optuna.pruners.*",
    "logging.StreamHandler", "logging.FileHandler",       # conf/hydra/*_logging/vfm.yaml
)


def version_base() -> dict[str, Any]:
    """Keyword arguments for hydra.main / initialize_config_dir: version_base="1.3" on Hydra 1.3, none on 1.4."""
    return {} if HYDRA_WHITELIST else {"version_base": "1.3"}


def main_options() -> dict[str, Any]:
    """Keyword arguments for @hydra.main: version_base and, on Hydra 1.4, the execution whitelist."""
    return {"execution_whitelist": TRUSTED_TARGETS} if HYDRA_WHITELIST else version_base()


def trusted_targets():
    """A context in which instantiate() outside @hydra.main (tests, tools composing with the compose API) may call
    TRUSTED_TARGETS; nothing to do on Hydra 1.3."""
    import contextlib
    if not HYDRA_WHITELIST:
        return contextlib.nullcontext()
    from hydra.utils import execution_whitelist
    return execution_whitelist(TRUSTED_TARGETS)


def register_resolver(name: str, resolver: Callable[..., Any]) -> None:
    """Register a cached OmegaConf resolver once, with the name this omegaconf gives the call."""
    if OmegaConf.has_resolver(name):
        return
    if "use_cache" in inspect.signature(OmegaConf.register_resolver).parameters:   # omegaconf >= 2.4
        OmegaConf.register_resolver(name, resolver, use_cache=True)
    else:
        OmegaConf.register_new_resolver(name, resolver, use_cache=True)
