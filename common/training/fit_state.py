"""What a fit carries from step to step: its state (saved in every checkpoint as `fit_state`), what a Trainer
trains, and the epoch's loss sums, accumulated on the device and read once at the epoch's end."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from common.training.ema import EMA


@dataclass
class FitState:
    epoch: int = 0                       # next epoch to run
    step: int = 0                        # optimiser steps done
    best_value: float | None = None
    best_epoch: int = -1
    best_metrics: dict = field(default_factory=dict)
    last_metrics: dict = field(default_factory=dict)
    epochs_without_improvement: int = 0
    nonfinite_steps: int = 0
    pruned_epoch: int | None = None      # the epoch at which a sweep's pruner stopped this run (a job of a sweep)
    pruned_value: float | None = None    # the monitored value it was stopped on
    batches_done: int = 0                # batches of epoch `epoch` already trained (preempted mid-epoch)
    epoch_sums: dict = field(default_factory=dict)   # their loss sums, so the epoch's mean covers every batch
    last_finite_loss: float | None = None   # for the Diverged message (common.training.divergence)
    last_finite_step: int = -1

    def record_last_loss(self, last_loss: torch.Tensor | None) -> None:
        """The last stepped loss, kept on the device during the epoch, read where the epoch's sums are."""
        if last_loss is not None:
            self.last_finite_loss = float(last_loss)


@dataclass
class Training:
    """What a Trainer trains, built once by Trainer.prepare."""
    model: nn.Module                     # on the device; what is checkpointed, evaluated and EMA-averaged
    criterion: nn.Module
    train_model: nn.Module               # what the training steps call: the model, DDP-wrapped with several processes
    optimizer: torch.optim.Optimizer     # trainer.optim's _target_ over common.training.optim's parameter groups
    schedule: object                     # trainer.schedule's _target_: .apply(optimizer, step) sets each group's lr
    ema: EMA | None
    steps_per_epoch: int                 # optimiser steps per epoch (batches // accumulate_grad_batches)


def add_sums(sums: dict, device: torch.device, values: dict[str, torch.Tensor]) -> None:
    """Add a micro-batch's loss terms to the epoch's sums, on the device (float64 where it has it)."""
    dtype = torch.float32 if device.type == "mps" else torch.float64
    for key, value in values.items():
        sums[key] = sums.get(key, 0.0) + value.detach().to(dtype)


def read_sums(sums: dict) -> dict[str, float]:
    return {k: float(v) for k, v in sums.items()}
