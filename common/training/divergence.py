"""Divergence is a failure: what the trainer checks at each validation, and how a skipped step leaves no trace.

A run is stopped with `Diverged` (naming the step, the quantity and the last finite value) when, at a validation,
every optimiser step so far was skipped as non-finite, the model holds a non-finite parameter or buffer
(BatchNorm running statistics included), or the trained model's validation outputs are not finite. A skipped step
must not change the model: its forward passes updated running statistics (BatchNorm's, roadwork's feature_stats),
so `BufferSnapshot` takes the model's buffers at the start of each optimiser step and puts them back when that
step is skipped.
"""
from __future__ import annotations

import torch
from torch import nn

ADVICE = "Lower trainer.optim.lr, set trainer.grad_clip, or check the data for NaN / inf inputs and targets"


class NonFiniteLossError(RuntimeError):
    pass


class Diverged(NonFiniteLossError):
    """Training produced nothing finite to keep: no finite monitored metric, or a non-finite model."""


def raise_if_diverged(state, monitor: str) -> None:
    """A run whose monitored metric was never finite has no best model: fail it, saying what to change."""
    if state.best_value is not None or state.epoch == 0:
        return
    last = state.last_metrics.get(monitor)
    raise Diverged(f"the run diverged: {monitor} was not finite in any of {state.epoch} epochs (last value "
                   f"{last}; {state.nonfinite_steps} optimiser steps had a non-finite loss or gradient), so no "
                   f"best checkpoint was written. {ADVICE}")


def diverged(state, quantity: str) -> Diverged:
    """The error for `quantity` found non-finite at state.step, with the last finite training loss."""
    last = "none (no finite training loss yet)" if state.last_finite_loss is None else \
        f"{state.last_finite_loss:.6g} at step {state.last_finite_step}"
    return Diverged(f"the run diverged at step {state.step} (epoch {state.epoch}): {quantity} is not finite; last "
                    f"finite training loss {last}; {state.nonfinite_steps} optimiser steps skipped as non-finite. "
                    f"{ADVICE}")


def check_at_validation(model: nn.Module, state) -> None:
    """Diverged when every optimiser step so far was skipped, or a parameter or buffer of `model` is not finite."""
    if state.step == 0 and state.nonfinite_steps > 0:
        raise diverged(state, f"every optimiser step ({state.nonfinite_steps}): the loss or gradient")
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, value in named:
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise diverged(state, f"{kind} {name}")


def check_outputs(outputs: dict, state) -> None:
    """Diverged when a floating output of the trained model at validation is not finite."""
    for key, value in outputs.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            raise diverged(state, f"the validation output {key!r}")


class BufferSnapshot:
    """The buffers of a model (BatchNorm running statistics, other running statistics), to put back after a
    skipped step."""

    def __init__(self, model: nn.Module):
        self.buffers = [buf for _, buf in model.named_buffers() if buf is not None]
        self.saved: list[torch.Tensor] = []

    def take(self) -> None:
        self.saved = [buf.detach().clone() for buf in self.buffers]

    def restore(self) -> None:
        with torch.no_grad():
            for buf, saved in zip(self.buffers, self.saved):
                buf.copy_(saved)
