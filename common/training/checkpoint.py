"""Checkpoints: trainable weights + optimiser + EMA + RNG + config + data statistics, written atomically.

A checkpoint holds only what training changed (frozen backbone weights come from `backbone.weights`, or
from the seeded random init), loads with `torch.load(weights_only=True)`, and names its task so that a
checkpoint of another task is refused with a clear message.
"""
from __future__ import annotations

import errno
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.utils.atomic import atomic_path
from common.utils.plain_data import plain_copy

FORMAT_VERSION = 1
LOW_DISK_BYTES = 64 * 2 ** 20       # less free space than this after torch.save failed: the disk is full


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict without frozen parameters (buffers such as BatchNorm statistics are kept), except those
    named in `module.keep_frozen`: weights an adaptation froze, which came from a checkpoint (common.training.adapt)."""
    keep = getattr(module, "keep_frozen", set())
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad and n not in keep}
    return {k: v.detach().cpu() for k, v in module.state_dict().items() if k not in frozen}


def load_trainable_state(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    expected = trainable_state(module)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(module.state_dict()))
    if missing or unexpected:
        raise ValueError(f"checkpoint {source} does not match the model built from the config: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]} "
                         f"(was it written with another model, backbone or peft config?)")
    module.load_state_dict(state, strict=False)


def restore_for_inference(model: nn.Module, ckpt: dict, source: str) -> nn.Module:
    """Trainable weights of the checkpoint, with its EMA weights swapped in when it has them."""
    load_trainable_state(model, ckpt["model"], source)
    if ckpt.get("ema"):
        params = dict(model.named_parameters())
        for name, value in ckpt["ema"]["shadow"].items():
            params[name].data.copy_(value)
    return model


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
             "numpy_pos": int(np_state[2]), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_torch_save(obj, path: Path) -> None:
    """torch.save to a temp file in the same directory, fsync, then rename over `path`."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        try:
            torch.save(obj, handle)
        except RuntimeError as err:     # torch reports a full disk as "enforce fail ... unexpected pos"
            if shutil.disk_usage(Path(path).parent).free < LOW_DISK_BYTES:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from err
            raise
        handle.flush()
        os.fsync(handle.fileno())


def written_checkpoints(folder: Path, names: tuple[str, ...] = ("best", "last")) -> dict[str, str]:
    """{name: path} of the checkpoints `folder` holds (a diverged run has no best.pt)."""
    paths = {name: Path(folder) / f"{name}.pt" for name in names}
    return {name: str(path) for name, path in paths.items() if path.is_file()}


def load_checkpoint(path, task_name: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={path}: no such checkpoint file "
                                f"(expected <run dir>/checkpoints/best.pt or last.pt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt files; re-raise one clear error
        raise ValueError(f"checkpoint {path} could not be read ({type(err).__name__}: {err}); "
                         f"expected a file written by this suite's train or cv mode") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {path} is not a suite checkpoint of format {FORMAT_VERSION}")
    if ckpt.get("task") != task_name:
        raise ValueError(f"checkpoint {path} was trained for task '{ckpt['task']}', not '{task_name}'; "
                         f"pass task={ckpt['task']} or a checkpoint of task {task_name}")
    return _with_plain_data(ckpt, f"checkpoint {path}")


def _with_plain_data(ckpt: dict, source: str) -> dict:
    """The checkpoint with its config, statistics and loop state rebuilt as plain values (UntrustedData naming the
    key otherwise): the config's `_target_`s are checked against the run's config where eval / predict rebuild a
    model from it (common.inference.checkpoint_config); the statistics and loop state name no callable at all."""
    for key in ("config", "stats"):
        if key not in ckpt:
            raise ValueError(f"{source} has no {key!r} entry (expected a file written by this suite's train or cv "
                             f"mode, format {FORMAT_VERSION})")
    plain = {"config": plain_copy(ckpt["config"], "config", source, targets=True),
             "stats": plain_copy(ckpt["stats"], "stats", source, tensors=True)}
    if "fit_state" in ckpt:
        plain["fit_state"] = plain_copy(ckpt["fit_state"], "fit_state", source)
    return {**ckpt, **plain}
