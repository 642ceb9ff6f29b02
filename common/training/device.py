"""Batches and models onto a device: moving a batch, its size, outputs back to the CPU, channels_last weights."""
from __future__ import annotations

from dataclasses import is_dataclass
from typing import Any

import torch
from torch import nn


def move_to(batch: Any, device: torch.device) -> Any:
    """Tensors of a batch (dict, list of tensors, dataclasses with a `to`, such as cached features) on `device`;
    other values (ids, names) stay as they are."""
    if isinstance(batch, torch.Tensor) or is_dataclass(batch) and hasattr(batch, "to"):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, list) and batch and isinstance(batch[0], torch.Tensor):
        return [move_to(v, device) for v in batch]
    return batch


def batch_size_of(batch: dict) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    raise ValueError("batch holds no tensor: cannot tell its size")


def to_cpu(outputs: dict) -> dict:
    """Tensor outputs detached on the CPU, floating point ones as float32."""
    return {k: (v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu())
            if isinstance(v, torch.Tensor) else v for k, v in outputs.items()}


def resolve_channels_last(setting, device: torch.device) -> bool:
    """trainer.channels_last: auto = on CUDA (cuDNN's NHWC convolutions, faster under bf16), off on the CPU."""
    if setting == "auto":
        return device.type == "cuda"
    if not isinstance(setting, bool):
        raise ValueError(f"trainer.channels_last={setting!r}: expected auto, true or false")
    return setting


def to_channels_last(model: nn.Module) -> nn.Module:
    """2-D convolution weights in channels_last memory format, in place (same values, other strides); their
    outputs follow. Other 4-D tensors keep their layout, a ViT's linears are unaffected."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)) and weight is not None and weight.dim() == 4 \
                and not weight.is_contiguous(memory_format=torch.channels_last):
            weight.data = weight.data.contiguous(memory_format=torch.channels_last)
    return model
