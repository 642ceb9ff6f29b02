"""What the config stored in a checkpoint may hold before eval / predict rebuild a model from it.

A checkpoint is data. `torch.load(weights_only=True)` keeps it from running code while it loads; after that, every
section a run copies from it is rebuilt as plain values (common.utils.plain_data: fresh dicts and lists of numbers,
strings, booleans and null; a tuple, an object or an interpolation is refused by name) and checked against this
run's own config before anything is built. The schema is the composed config joined with every option file
under conf/ (so a checkpoint of another backbone, model or preset still loads into a plain `task=` run):
- a mapping's keys must be keys of the same mapping in the schema (an unknown key is refused by name), except
  where the schema's mapping is empty (a user-keyed one such as data.encodings);
- a `_target_` is accepted only where this run's config or an option file under conf/ has one, and only when it
  equals one of the targets they hold at that place (list positions are one place); any other is refused by
  name. Where it is not this run's target, its mapping's keys must be parameters of that class. The task class
  is never taken from a checkpoint: it comes from `task=`;
- no mapping may hold a positional `_args_` (no config of the suite does).
So the components of eval / predict are only ever classes that this run's config or the suite's option files name.
"""
from __future__ import annotations

import copy
import functools
import inspect
from pathlib import Path
from typing import Any

import yaml

from common.utils.plain_data import HYDRA_KEYS, UntrustedData, plain_copy

FIXED_TARGETS = ("task",)      # sections whose class always comes from the composed config
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
NOT_RUN_CONFIG = ("hydra", "sweeps")       # folders of conf/ that hold launcher and sweeper settings

UntrustedCheckpoint = UntrustedData       # one error for stored data the suite refuses


def _parameters(target: str, where: str) -> set[str] | None:
    """Keyword names the class `target` (one the suite's configs name) accepts; None when it takes **kwargs."""
    from hydra.utils import get_class
    try:
        cls = get_class(target)
    except (ImportError, ValueError, AttributeError) as err:
        raise UntrustedCheckpoint(f"{where}._target_={target!r} does not name a class ({err})") from err
    params = inspect.signature(cls).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


def _refuse_unknown(keys, allowed, where: str, source: str) -> None:
    unknown = sorted(str(k) for k in keys if allowed is not None and k not in allowed)
    if unknown:
        raise UntrustedCheckpoint(f"checkpoint {source}: unknown key {where}.{unknown[0]} in its config "
                                  f"(expected one of {sorted(map(str, allowed))}); refusing to build from it")


def _few(names: set, shown: int = 6) -> str:
    names = sorted(names)
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def targets_by_place(value: Any, place: str = "", into: dict | None = None) -> dict[str, set]:
    """{place: the `_target_`s a config holds there}; a place is a dotted key path, `[]` for any list position."""
    into = {} if into is None else into
    if isinstance(value, dict):
        if isinstance(value.get("_target_"), str):
            into.setdefault(place, set()).add(value["_target_"])
        for key, item in value.items():
            targets_by_place(item, f"{place}.{key}" if place else str(key), into)
    elif isinstance(value, list):
        for item in value:
            targets_by_place(item, f"{place}[]", into)
    return into


class _Checker:
    def __init__(self, source: str, targets: dict[str, set]):
        self.source, self.targets = source, targets

    def node(self, value: Any, current: Any, where: str, place: str, free: bool) -> None:
        """`free`: inside an object whose class differs from the composed config's (keys checked by signature)."""
        if isinstance(value, dict):
            self.mapping(value, current, where, place, free)
        elif isinstance(value, list):
            template = current if isinstance(current, list) and current else None
            for i, item in enumerate(value):
                self.node(item, template[min(i, len(template) - 1)] if template else None, f"{where}[{i}]",
                          f"{place}[]", free)

    def mapping(self, value: dict, current: Any, where: str, place: str, free: bool) -> None:
        current_map = current if isinstance(current, dict) else None
        if "_target_" in value:
            free, allowed = self.target(value["_target_"], current_map, where, place, free)
        else:   # an empty mapping in the schema is a user-keyed one (data.encodings: set name -> encoding)
            allowed = None if free or not current_map else set(current_map)
        if "_args_" in value:
            raise UntrustedCheckpoint(f"checkpoint {self.source}: {where}._args_: positional arguments are not "
                                      f"something this suite writes into a config; refusing to build from it")
        _refuse_unknown(value, allowed, where, self.source)
        for key, item in value.items():
            child = None if current_map is None else current_map.get(key)
            self.node(item, child, f"{where}.{key}", f"{place}.{key}", free)

    def target(self, target: Any, current: dict | None, where: str, place: str,
               free: bool) -> tuple[bool, set | None]:
        """(free below, allowed keys) for a mapping with `_target_`."""
        current_target = None if current is None else current.get("_target_")
        known = self.targets.get(place, set())
        if where in FIXED_TARGETS and target != current_target:
            raise UntrustedCheckpoint(f"checkpoint {self.source}: {where}._target_={target!r} differs from this "
                                      f"run's {current_target!r}: the task class comes from task=, not from "
                                      f"a checkpoint")
        if not known:
            raise UntrustedCheckpoint(f"checkpoint {self.source}: {where}._target_={target!r}: a nested _target_ "
                                      f"is not expected at {where}; refusing to build from it")
        if not isinstance(target, str) or target not in known:
            raise UntrustedCheckpoint(f"checkpoint {self.source}: {where}._target_={target!r} is not a target this "
                                      f"suite configures at {where} (this run's config and conf/ name "
                                      f"{_few(known)} there); refusing to build from it")
        if target == current_target:
            return free, set(current) | {"_partial_", "_convert_", "_recursive_"}
        params = _parameters(target, f"checkpoint {self.source}: {where}")
        return True, None if params is None else params | set(HYDRA_KEYS) - {"_args_"}


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


def _option_files() -> list[dict]:
    """Every option file under conf/ (no defaults lists, values unresolved), placed at its package."""
    files = []
    for path in sorted(CONF_DIR.rglob("*.yaml")):
        if path.relative_to(CONF_DIR).parts[0] in NOT_RUN_CONFIG:
            continue
        text = path.read_text()
        content = yaml.safe_load(text) or {}
        content.pop("defaults", None)
        for key in reversed(_package(path, text)):
            content = {key: content}
        files.append(content)
    return files


@functools.lru_cache(maxsize=1)
def option_tree() -> dict:
    """Every option file under conf/ joined into one tree (the first file's value wins)."""
    tree: dict = {}
    for content in _option_files():
        _union(tree, content)
    return tree


@functools.lru_cache(maxsize=1)
def option_targets() -> dict[str, set]:
    """{place: every `_target_` an option file under conf/ holds there}."""
    targets: dict[str, set] = {}
    for content in _option_files():
        targets_by_place(content, "", targets)
    return targets


def schema(current: dict) -> dict:
    tree = copy.deepcopy(current)
    _union(tree, option_tree())
    return tree


def check_checkpoint_config(config: Any, current: dict, sections: tuple[str, ...], source: str) -> dict:
    """`config`'s `sections` rebuilt as plain values, once checked against a run composed as `current`;
    UntrustedCheckpoint naming the first key it would not build from otherwise."""
    if not isinstance(config, dict):
        raise UntrustedCheckpoint(f"checkpoint {source}: its config is a {type(config).__name__}, not a mapping")
    plain = {section: plain_copy(config[section], section, f"checkpoint {source}", targets=True)
             for section in sections if section in config}
    targets = targets_by_place(current)
    for place, names in option_targets().items():
        targets.setdefault(place, set()).update(names)
    checker, known = _Checker(source, targets), schema(current)
    for section, value in plain.items():
        checker.node(value, known.get(section), section, section, free=False)
    return plain
