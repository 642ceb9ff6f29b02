"""Flat config sections -> small option groups (dataclasses).

A model whose config section has many flat keys (conf/model/<task>/*.yaml, stored as written in every
checkpoint's config) takes a few groups instead of one long argument list: its `from_options(backbone,
**flat_keys)` hands each key to the group with a field of that name. The yaml keys and the checkpoints stay
as they are.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping


def group_options(options: Mapping[str, Any], groups: Mapping[str, type], owner: str) -> dict[str, Any]:
    """{group name: dataclass instance}, each built from the options named like its fields. An option that no
    group takes is a TypeError naming it (as an unknown keyword argument would be); a missing option without
    a default raises the dataclass's own TypeError."""
    seen: dict[str, str] = {}
    for name, group in groups.items():
        for field in dataclasses.fields(group):
            if field.name in seen:
                raise TypeError(f"{owner}: option {field.name!r} is in groups {seen[field.name]!r} and {name!r}")
            seen[field.name] = name
    unknown = sorted(set(options) - set(seen))
    if unknown:
        raise TypeError(f"{owner}: unknown option(s) {unknown}; expected some of {sorted(seen)}")
    return {name: group(**{k: v for k, v in options.items() if seen[k] == name}) for name, group in groups.items()}


def instantiate_grouped(section: Mapping[str, Any], base: type, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate` for a class built from option groups: `section` is the config section as composed
    or as a checkpoint stores it (plain containers, flat keys, `_target_` naming `base` or a subclass), `kwargs`
    what the caller adds (the backbone, data-derived inputs) -> `cls.from_options(**kwargs, **flat keys)`."""
    from hydra.utils import get_class
    options = dict(section)
    target = options.pop("_target_")
    cls = get_class(target)
    if not issubclass(cls, base):
        raise ValueError(f"_target_={target!r}: expected {base.__module__}.{base.__qualname__} or a subclass")
    return cls.from_options(**kwargs, **options)
