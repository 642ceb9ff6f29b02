"""BatchNorm over the global batch of a DDP run, on any device (torch.nn.SyncBatchNorm needs CUDA; the CPU / gloo
runs and tests need it too): the training statistics are the two-pass mean and variance of every rank's batch
together, so N processes normalise, update running statistics and back-propagate as one process with N times the
batch. Evaluation (running statistics) and single processes are plain BatchNorm."""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from common.cluster.distributed import global_sum, summing_across_ranks

SYNC_SETTINGS = ("auto", True, False)


class GlobalBatchNorm(_BatchNorm):
    """Same parameters, buffers and state_dict keys as BatchNorm1d / 2d / 3d."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"GlobalBatchNorm expects at least 2-D input (N, C, ...), got {input.dim()}-D")

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and summing_across_ranks()):
            return super().forward(input)
        self._check_input_dim(input)
        x = input.float()
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = global_sum(torch.tensor(float(x.numel() // x.shape[1]), dtype=torch.float64, device=x.device))
        mean = global_sum(x.sum(dims)) / count.float()
        centred = x - mean.view(shape)
        var = global_sum(centred.square().sum(dims)) / count.float()
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            self._update_running(mean.detach(), var.detach(), float(count))
        return out.to(input.dtype)

    @torch.no_grad()
    def _update_running(self, mean: Tensor, var: Tensor, count: float) -> None:
        """As F.batch_norm: exponential (or, momentum None, cumulative) average; the variance unbiased."""
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * count / max(count - 1.0, 1.0)
        self.running_mean.mul_(1.0 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1.0 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)


class GlobalBatchNormAct(GlobalBatchNorm):
    """timm's BatchNormAct2d (BatchNorm, then its drop and act modules), e.g. in timm's DenseNet blocks."""

    def __init__(self, norm: nn.Module):
        super().__init__(norm.num_features, norm.eps, norm.momentum, norm.affine, norm.track_running_stats)
        self.drop, self.act = norm.drop, norm.act

    def forward(self, input: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(input)))


PLAIN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _global_copy(norm: _BatchNorm, path: str) -> GlobalBatchNorm:
    """The same parameter and buffer tensors (the optimiser, EMA and checkpoints see no difference)."""
    from common.utils.timm_import import timm     # here: a run that never converts does not import timm for it
    if type(norm) in PLAIN:
        copy = GlobalBatchNorm(norm.num_features, norm.eps, norm.momentum, norm.affine, norm.track_running_stats)
    elif type(norm) is timm.layers.BatchNormAct2d:
        copy = GlobalBatchNormAct(norm)
    else:     # a subclass may do more than normalise: replacing it would change the model
        raise TypeError(f"trainer.sync_batchnorm: {path} is a {type(norm).__module__}.{type(norm).__name__}, a "
                        f"BatchNorm subclass this suite cannot synchronise; set trainer.sync_batchnorm=false "
                        f"(per-process statistics) or use a plain BatchNorm")
    for name in ("weight", "bias"):
        setattr(copy, name, getattr(norm, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        copy.register_buffer(name, getattr(norm, name))
    copy.train(norm.training)
    return copy


def convert_batchnorm(module: nn.Module, prefix: str = "model") -> int:
    """Replace every BatchNorm1d / 2d / 3d (and timm BatchNormAct2d) below `module` with a GlobalBatchNorm holding
    its tensors; the count. Any other BatchNorm subclass is refused, naming it."""
    replaced = 0
    for name, child in module.named_children():
        if isinstance(child, _BatchNorm) and not isinstance(child, (GlobalBatchNorm, nn.SyncBatchNorm)):
            setattr(module, name, _global_copy(child, f"{prefix}.{name}"))
            replaced += 1
        else:
            replaced += convert_batchnorm(child, f"{prefix}.{name}")
    return replaced


def wants_sync_batchnorm(setting, world_size: int) -> bool:
    """trainer.sync_batchnorm: auto (on with several processes) | true | false."""
    if setting not in SYNC_SETTINGS:
        raise ValueError(f"trainer.sync_batchnorm={setting!r}: expected auto, true or false")
    return world_size > 1 and setting is not False
