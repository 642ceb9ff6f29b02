"""What a file or a database holds is data: the one check every stored value passes before the suite uses it.

`plain_copy` rebuilds a stored value out of containers the suite makes itself (dict, list) and scalars (None,
bool, int, float, str), and refuses by name anything else: a tuple (it loads under `torch.load(weights_only=True)`
and hides from a walk over dicts and lists), an object, a non-string key, a string holding an interpolation
(`${...}`, which OmegaConf would resolve), and, unless the caller checks them itself against this run's config
(`targets=True`, common.inference.checkpoint_config), the keys with which Hydra names a callable (`_target_`,
`_args_`, ...). A value that passed is therefore safe to hand to code that interprets configs: it names nothing.
"""
from __future__ import annotations

from typing import Any

SCALARS = (type(None), bool, int, float, str)
HYDRA_KEYS = ("_target_", "_args_", "_partial_", "_convert_", "_recursive_")


class UntrustedData(ValueError):
    """Stored data holds something other than plain values (or names a callable)."""


def _refuse(source: str, where: str, why: str) -> UntrustedData:
    return UntrustedData(f"{source}: {where} {why}; refusing to use it (stored files and databases hold plain "
                         f"values: numbers, strings, booleans, null, lists and mappings of them)")


def plain_copy(value: Any, where: str, source: str, *, targets: bool = False, tensors: bool = False) -> Any:
    """A copy of `value` built from fresh dicts and lists; UntrustedData naming `source` and the key `where`
    otherwise. `targets`: Hydra keys are let through (the caller checks them); `tensors`: torch tensors too
    (checkpoint statistics), copied by reference."""
    if isinstance(value, str):
        if "${" in value:
            raise _refuse(source, f"{where}={value!r}", "holds an interpolation")
        return value
    if isinstance(value, SCALARS):
        return value
    if isinstance(value, dict):
        return {_key(k, where, source, targets): plain_copy(v, f"{where}.{k}", source, targets=targets,
                                                          tensors=tensors) for k, v in value.items()}
    if type(value) is list:
        return [plain_copy(v, f"{where}[{i}]", source, targets=targets, tensors=tensors)
                for i, v in enumerate(value)]
    if tensors and _is_tensor(value):
        return value
    raise _refuse(source, where, f"is a {type(value).__module__}.{type(value).__qualname__}, not a plain value")


def _key(key: Any, where: str, source: str, targets: bool) -> str:
    if not isinstance(key, str):
        raise _refuse(source, f"{where}[{key!r}]", f"has a {type(key).__name__} key, not a string")
    if "${" in key:
        raise _refuse(source, f"{where}.{key}", "is a key holding an interpolation")
    if key in HYDRA_KEYS and not targets:
        raise _refuse(source, f"{where}.{key}", "names a callable (a Hydra key)")
    return key


def _is_tensor(value: Any) -> bool:
    import torch
    return type(value) in (torch.Tensor, torch.nn.Parameter)
