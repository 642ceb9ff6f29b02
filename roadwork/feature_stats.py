"""The training feature distribution, kept in the model so that every checkpoint carries it.

Running per-dimension mean and variance of the fused vision features seen in training (updated in
training-mode forwards only, like BatchNorm statistics, and saved as buffers). Test-time augmentation
(roadwork.tta) ranks augmented copies of an image by their distance to this distribution.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from common.cluster.distributed import global_sum


class FeatureStats(nn.Module):
    def __init__(self, dim: int, momentum: Optional[float], eps: float = 1e-6):
        """momentum None: the exact mean / variance of every feature seen; a float: an exponential moving
        average (weight `momentum` on each new batch), which follows the features of the final weights."""
        super().__init__()
        if momentum is not None and not 0.0 < momentum <= 1.0:
            raise ValueError(f"model.feature_stats_momentum={momentum}: expected null or a value in (0, 1]")
        self.momentum, self.eps = momentum, eps
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def update(self, features: Tensor) -> None:
        """features (N, D) of one training batch; in a DDP training step the global batch's (global_sum), so the
        statistics are one process's. Merged on the device: training never waits for it (one process knows its
        batch's size; several read the global count once)."""
        x = features.detach().float().reshape(-1, self.mean.numel())
        local = torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device)
        total_n = global_sum(local)
        n = x.shape[0] if total_n is local else int(total_n)
        if n == 0:
            return
        batch_mean = global_sum(x.sum(0)) / n
        batch_var = global_sum((x - batch_mean).square().sum(0)) / n
        with torch.no_grad():
            self._merge(batch_mean, batch_var, n)

    def _merge(self, batch_mean: Tensor, batch_var: Tensor, n: int) -> None:
        """Fold a batch of n features (mean, biased variance) into the running statistics: Chan et al.'s exact
        merge of (count, mean, var), or with a momentum an exponential moving average (from an empty state: the
        batch's own), chosen on the device."""
        total = self.count + n
        delta = batch_mean - self.mean
        mean = self.mean + delta * n / total
        var = (self.var * self.count + batch_var * n + delta.pow(2) * self.count * n / total) / total
        if self.momentum is not None:
            first = self.count == 0
            mean = torch.where(first, mean, self.mean.lerp(batch_mean, self.momentum))
            var = torch.where(first, var, self.var.lerp(batch_var, self.momentum))
        self.mean.copy_(mean)
        self.var.copy_(var)
        self.count.add_(n)

    def distance(self, features: Tensor) -> Tensor:
        """(..., D) -> (...): root mean squared standardised distance to the training mean."""
        if self.count == 0:
            raise ValueError("the model's training feature statistics are empty: the checkpoint was not trained "
                             "with this model version, so feature-distance filtering (tta) cannot rank views")
        z = (features.float() - self.mean) / (self.var + self.eps).sqrt()
        return z.pow(2).mean(-1).sqrt()
