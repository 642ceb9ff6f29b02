"""What the config stored in a checkpoint may hold before eval / predict rebuild a model from it.

`torch.load(weights_only=True)` keeps a checkpoint from running code while it loads, but its config sections
are handed to `hydra.utils.instantiate`, and a `_target_` there names any callable (`pathlib.Path.write_text`
writes a file). So every section a run copies from a checkpoint is checked against this run's composed config
before anything is built. The schema is the composed config joined with every option file under conf/ (so a
checkpoint of another backbone, model or preset still loads into a plain `task=` run):
- a mapping's keys must be keys of the same mapping in the schema (an unknown key is refused by name), except
  where the schema's mapping is empty (a user-keyed one such as data.encodings);
- a `_target_` may stand only where the schema has one; the composed config's target (or, where it has
  none, the option files' target) is accepted, another one must be a class of the suite's packages or of a
  named model library (ALLOWED_PACKAGES) that is a model (torch.nn.Module), task, metric or augmentation
  class, and its mapping's keys must be parameters of that class. The task class is never taken from a checkpoint: it comes from `task=`;
- no string may hold an interpolation (`${...}`), no mapping a positional `_args_`.
"""
from __future__ import annotations

import copy
import functools
import inspect
from pathlib import Path
from typing import Any

import yaml

ALLOWED_PACKAGES = ("common.", "biomass.", "sclera.", "roadwork.", "timm.", "torch.nn.", "albumentations.")
HYDRA_KEYS = ("_target_", "_partial_", "_convert_", "_recursive_")
FIXED_TARGETS = ("task",)      # sections whose class always comes from the composed config
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
NOT_RUN_CONFIG = ("hydra", "sweeps")       # folders of conf/ that hold launcher and sweeper settings


class UntrustedCheckpoint(ValueError):
    """A checkpoint's config asks for something this suite never writes into one."""


def _allowed_bases() -> tuple[type, ...]:
    import albumentations as A
    from torch import nn

    from common.metric import Metric
    from common.task import Task
    return nn.Module, Task, Metric, A.BasicTransform, A.BaseCompose


def allowed_class(target: Any, where: str) -> type:
    """The class a checkpoint's `_target_` names, when it is one a checkpoint may name."""
    if not isinstance(target, str) or not target.startswith(ALLOWED_PACKAGES):
        raise UntrustedCheckpoint(f"{where}={target!r}: a checkpoint may only name classes of "
                                  f"{', '.join(p.rstrip('.') for p in ALLOWED_PACKAGES)}")
    from hydra.utils import get_class
    try:
        cls = get_class(target)
    except (ImportError, ValueError, AttributeError) as err:
        raise UntrustedCheckpoint(f"{where}={target!r} does not name a class ({err})") from err
    if not f"{cls.__module__}.".startswith(ALLOWED_PACKAGES):
        raise UntrustedCheckpoint(f"{where}={target!r} is {cls.__module__}.{cls.__qualname__}, defined outside "
                                  f"the packages a checkpoint may name")
    if not issubclass(cls, _allowed_bases()):
        raise UntrustedCheckpoint(f"{where}={target!r} is not a model, task, metric or augmentation class")
    return cls


def _parameters(cls: type) -> set[str] | None:
    """Keyword names the class accepts; None when it takes **kwargs."""
    params = inspect.signature(cls).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


def _refuse_unknown(keys, allowed, where: str, source: str) -> None:
    unknown = sorted(str(k) for k in keys if allowed is not None and k not in allowed)
    if unknown:
        raise UntrustedCheckpoint(f"checkpoint {source}: unknown key {where}.{unknown[0]} in its config "
                                  f"(expected one of {sorted(map(str, allowed))}); refusing to build from it")


class _Checker:
    def __init__(self, source: str):
        self.source = source

    def node(self, value: Any, current: Any, where: str, free: bool) -> None:
        """`free`: inside an object whose class differs from the composed config's (keys checked by signature)."""
        if isinstance(value, dict):
            self.mapping(value, current, where, free)
        elif isinstance(value, list):
            template = current if isinstance(current, list) and current else None
            for i, item in enumerate(value):
                self.node(item, template[min(i, len(template) - 1)] if template else None, f"{where}[{i}]", free)
        elif isinstance(value, str) and "${" in value:
            raise UntrustedCheckpoint(f"checkpoint {self.source}: {where}={value!r} holds an interpolation; "
                                      f"a checkpoint's config stores resolved values only")

    def mapping(self, value: dict, current: Any, where: str, free: bool) -> None:
        current_map = current if isinstance(current, dict) else None
        if "_target_" in value:
            free, allowed = self.target(value["_target_"], current_map, where, free)
        else:
            # an empty mapping in the schema is a user-keyed one (data.encodings: set name -> encoding)
            allowed = None if free or not current_map else set(current_map)
        _refuse_unknown(value, allowed, where, self.source)
        for key, item in value.items():
            child = None if current_map is None else current_map.get(key)
            self.node(item, child, f"{where}.{key}", free)

    def target(self, target: Any, current: dict | None, where: str, free: bool) -> tuple[bool, set | None]:
        """(free below, allowed keys) for a mapping with `_target_`."""
        current_target = None if current is None else current.get("_target_")
        if current_target is None and not free:
            raise UntrustedCheckpoint(f"checkpoint {self.source}: {where}._target_={target!r}: a nested _target_ "
                                      f"is not expected at {where}; refusing to build from it")
        if target == current_target and isinstance(target, str):
            return free, set(current) | {"_partial_", "_convert_", "_recursive_"}
        if where in FIXED_TARGETS:
            raise UntrustedCheckpoint(f"checkpoint {self.source}: {where}._target_={target!r} differs from this "
                                      f"run's {current_target!r}: the task class comes from task=, not from "
                                      f"a checkpoint")
        cls = allowed_class(target, f"checkpoint {self.source}: {where}._target_")
        params = _parameters(cls)
        return True, None if params is None else params | set(HYDRA_KEYS)


def _package(path: Path, text: str) -> list[str]:
    """Where an option file's keys go: its `# @package` line, else its top-level group folder."""
    for line in text.splitlines()[:5]:
        if line.startswith("# @package"):
            package = line.split("@package", 1)[1].strip()
            return [] if package == "_global_" else package.split(".")
    group = path.relative_to(CONF_DIR).parts[:-1]
    return list(group[:1])


def _union(into: dict, other: dict) -> None:
    """Adds `other`'s keys missing from `into`, recursively; `into`'s values win."""
    for key, value in other.items():
        if key not in into:
            into[key] = copy.deepcopy(value)
        elif isinstance(into[key], dict) and isinstance(value, dict):
            _union(into[key], value)


@functools.lru_cache(maxsize=1)
def option_tree() -> dict:
    """Every option file under conf/ (no defaults lists, values unresolved) joined into one tree."""
    tree: dict = {}
    for path in sorted(CONF_DIR.rglob("*.yaml")):
        if path.relative_to(CONF_DIR).parts[0] in NOT_RUN_CONFIG:
            continue
        text = path.read_text()
        content = yaml.safe_load(text) or {}
        content.pop("defaults", None)
        for key in reversed(_package(path, text)):
            content = {key: content}
        _union(tree, content)
    return tree


def schema(current: dict) -> dict:
    tree = copy.deepcopy(current)
    _union(tree, option_tree())
    return tree


def check_checkpoint_config(config: Any, current: dict, sections: tuple[str, ...], source: str) -> None:
    """Raise UntrustedCheckpoint naming the first key of `config`'s `sections` that a run composed as `current`
    would not build from."""
    if not isinstance(config, dict):
        raise UntrustedCheckpoint(f"checkpoint {source}: its config is a {type(config).__name__}, not a mapping")
    checker, known = _Checker(source), schema(current)
    for section in sections:
        if section in config:
            checker.node(config[section], known.get(section), section, free=False)
