"""trainer.precision: the autocast dtype of forward passes and, for fp16, the loss scaler (torch.amp.GradScaler).

- auto: bf16 autocast on CUDA, fp32 elsewhere
- bf16: bf16 autocast (no scaler: bf16 has fp32's exponent range)
- fp16: fp16 autocast with a GradScaler, on CUDA; on another device it falls back to fp32 and says so in the log
  (fp16 training is a CUDA recipe: a run that asks for it elsewhere still runs, in full precision)
- fp32: no autocast

With the scaler, each backward pass is of the loss times the current scale; `unscale_` divides the gradients
back before clipping, and a step whose unscaled gradients are not finite is an fp16 overflow: the scaler skips
it and lowers its scale (`overflowed`), which is the scaler's ordinary work, not a divergence.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Optional

import torch

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def fp16_supported(device: torch.device) -> bool:
    return device.type == "cuda"


class Precision:
    def __init__(self, setting: str, device: torch.device):
        if setting not in PRECISIONS:
            raise ValueError(f"trainer.precision={setting!r}: expected one of {', '.join(PRECISIONS)}")
        self.device = device
        self.dtype = self._dtype(setting, device)
        self.scaler = torch.amp.GradScaler(device.type) if self.dtype == torch.float16 else None

    @staticmethod
    def _dtype(setting: str, device: torch.device) -> Optional[torch.dtype]:
        if setting == "auto":
            return torch.bfloat16 if device.type == "cuda" else None
        if setting == "fp16" and not fp16_supported(device):
            log.warning(f"[trainer] trainer.precision=fp16 needs CUDA (fp16 autocast with a grad scaler); "
                        f"running fp32 on {device.type}")
            return None
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[setting]

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to call backward on: times the scaler's current scale under fp16."""
        return loss if self.scaler is None else self.scaler.scale(loss)

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def overflowed(self) -> bool:
        """After non-finite unscaled gradients: True (and the scale lowered) when they are an fp16 overflow."""
        if self.scaler is None:
            return False
        self.scaler.update()
        return True

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> Optional[dict]:
        return None if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: Optional[dict]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
