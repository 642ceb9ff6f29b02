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
        statistics are one process's."""
        x = features.detach().float().reshape(-1, self.mean.numel())
        n = int(global_sum(torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device)))
        if n == 0:
            return
        batch_mean = global_sum(x.sum(0)) / n
        batch_var = global_sum((x - batch_mean).square().sum(0)) / n
        with torch.no_grad():
            self._merge(batch_mean, batch_var, n)

    def _merge(self, batch_mean: Tensor, batch_var: Tensor, n: int) -> None:
        """Fold a batch of n features (mean, biased variance) into the running statistics."""
        if self.count == 0 or self.momentum is None:
            # Chan et al.: merge (count, mean, var) with the batch's exactly.
            total = self.count + n
            delta = batch_mean - self.mean
            m2 = self.var * self.count + batch_var * n + delta.pow(2) * self.count * n / total
            self.mean.add_(delta * n / total)
            self.var.copy_(m2 / total)
        else:
            self.mean.lerp_(batch_mean, self.momentum)
            self.var.lerp_(batch_var, self.momentum)
        self.count.add_(n)

    def distance(self, features: Tensor) -> Tensor:
        """(..., D) -> (...): root mean squared standardised distance to the training mean."""
        if self.count == 0:
            raise ValueError("the model's training feature statistics are empty: the checkpoint was not trained "
                             "with this model version, so feature-distance filtering (tta) cannot rank views")
        z = (features.float() - self.mean) / (self.var + self.eps).sqrt()
        return z.pow(2).mean(-1).sqrt()
