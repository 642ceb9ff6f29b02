"""Loss functions shared by the tasks: pure functions on tensors, every hyperparameter an argument.

All losses are computed in float32 (low-precision inputs are upcast; float64 stays float64), so they
behave the same under bf16 autocast.
Missing labels are masked, never filled: masked entries are replaced with `torch.where` BEFORE the
element-wise loss, so NaN targets at masked positions give neither a NaN loss nor a NaN gradient.
A batch where everything is masked gives exactly 0.0 with a zero (not NaN) gradient.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from common.cluster.distributed import global_sum

REGRESSION_KINDS = ("mse", "huber", "smooth_l1", "tweedie", "log_cosh")


def _upcast(x: Tensor) -> Tensor:
    """float32 for low-precision or integer inputs; float64 stays float64 (for exact checks)."""
    return x if x.dtype == torch.float64 else x.float()


def check_values(ok: Tensor, message: str) -> None:
    """ValueError(message) unless `ok` (a bool tensor) is True, without the host waiting for the device: an
    asynchronous device assertion there (a failure surfaces as a device-side assert at the next read), checked at
    once on the CPU."""
    try:
        torch._assert_async(ok, message)
    except RuntimeError as err:
        raise ValueError(message) from err


def as_bool_mask(mask: Tensor, shape: torch.Size, name: str = "mask") -> Tensor:
    """A bool mask broadcast to `shape`; numeric masks must hold only 0 and 1."""
    if mask.dtype != torch.bool:
        check_values(((mask == 0) | (mask == 1)).all(), f"{name} must be bool or hold only 0/1 values, got other values")
        mask = mask != 0
    try:
        return torch.broadcast_to(mask, shape)
    except RuntimeError as err:
        raise ValueError(f"{name} of shape {tuple(mask.shape)} does not broadcast to {tuple(shape)}") from err


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` where mask is True; 0.0 with zero gradient when nothing is observed. In a DDP training
    step the mean of the global batch (common.cluster.distributed.global_sum), as one process computes it."""
    total = global_sum(torch.where(mask, values, torch.zeros_like(values)).sum())
    return total / global_sum(mask.sum()).clamp_min(1).to(values.dtype)


def _tweedie_nll(pred: Tensor, target: Tensor, p: float, min_mu: float) -> Tensor:
    """Tweedie negative log-likelihood up to terms constant in the mean (can be negative)."""
    mu = F.softplus(pred).clamp_min(min_mu)
    return -target * mu.pow(1.0 - p) / (1.0 - p) + mu.pow(2.0 - p) / (2.0 - p)


def _log_cosh(error: Tensor) -> Tensor:
    """log(cosh(x)) = x + softplus(-2x) - log 2, without cosh's overflow for large |x|."""
    return error + F.softplus(-2.0 * error) - torch.log(torch.tensor(2.0, dtype=error.dtype))


def masked_regression_loss(pred: Tensor, target: Tensor, mask: Tensor, kind: str = "mse",
                           delta: float = 1.0, tweedie_p: float = 1.5, tweedie_min_mu: float = 1e-8) -> Tensor:
    """Mean element-wise regression loss over the observed (mask == 1) elements.

    kind: "mse"; "huber" (F.huber_loss with `delta`); "smooth_l1" (F.smooth_l1_loss with beta=`delta`);
    "tweedie": `pred` is the raw output and the positive mean is mu = softplus(pred) (floored at
    `tweedie_min_mu` against underflow); loss = -y mu^(1-p)/(1-p) + mu^(2-p)/(2-p) with 1 < p < 2;
    "log_cosh": log(cosh(pred - y)) (quadratic near 0, linear for large errors).
    `mask` is bool or 0/1, same shape as `target` or broadcastable to it; `target` may hold NaN where masked.
    """
    if kind not in REGRESSION_KINDS:
        raise ValueError(f"kind must be one of {REGRESSION_KINDS}, got {kind!r}")
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    if kind in ("huber", "smooth_l1") and not delta > 0:
        raise ValueError(f"delta must be > 0 for {kind}, got {delta}")
    if kind == "tweedie" and not 1.0 < tweedie_p < 2.0:
        raise ValueError(f"tweedie_p must satisfy 1 < p < 2, got {tweedie_p}")
    pred = _upcast(pred)
    target = target.to(pred.dtype)
    observed = as_bool_mask(mask, target.shape)
    target = torch.where(observed, target, torch.zeros_like(target))
    if kind == "mse":
        values = F.mse_loss(pred, target, reduction="none")
    elif kind == "huber":
        values = F.huber_loss(pred, target, reduction="none", delta=delta)
    elif kind == "smooth_l1":
        values = F.smooth_l1_loss(pred, target, reduction="none", beta=delta)
    elif kind == "log_cosh":
        values = _log_cosh(pred - target)
    else:
        values = _tweedie_nll(pred, target, tweedie_p, tweedie_min_mu)
    return masked_mean(values, observed)


def dice_bce_loss(logits: Tensor, target: Tensor, dice_weight: float = 0.4, bce_weight: float = 0.6,
                  smooth: float = 1.0) -> Tensor:
    """dice_weight * (1 - soft Dice) + bce_weight * BCE-with-logits for binary segmentation.

    logits and target are (B, 1, H, W) or (B, H, W), target in [0, 1]. Soft Dice per image,
    (2 sum(p t) + smooth) / (sum p + sum t + smooth) with p = sigmoid(logits), then mean over images;
    BCE is the mean over all pixels.
    """
    if logits.shape != target.shape:
        raise ValueError(f"logits shape {tuple(logits.shape)} != target shape {tuple(target.shape)}")
    if logits.dim() not in (3, 4) or (logits.dim() == 4 and logits.shape[1] != 1):
        raise ValueError(f"expected (B,1,H,W) or (B,H,W) logits, got {tuple(logits.shape)}")
    logits = _upcast(logits)
    target = target.to(logits.dtype)
    prob = torch.sigmoid(logits).flatten(1)
    flat_target = target.flatten(1)
    inter = (prob * flat_target).sum(1)
    dice = (2.0 * inter + smooth) / (prob.sum(1) + flat_target.sum(1) + smooth)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    return dice_weight * (1.0 - dice).mean() + bce_weight * bce


def _sample_mask(mask: Tensor | None, batch: int, device: torch.device) -> Tensor:
    if mask is None:
        return torch.ones(batch, dtype=torch.bool, device=device)
    if mask.shape != (batch,):
        raise ValueError(f"mask must have shape ({batch},), got {tuple(mask.shape)}")
    return as_bool_mask(mask, torch.Size((batch,)))


def _binary_focal(logits: Tensor, target: Tensor, alpha: float | None, gamma: float, eps: float) -> Tensor:
    y = target * (1.0 - eps) + eps / 2.0
    ce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    prob = torch.sigmoid(logits)
    p_t = prob * y + (1.0 - prob) * (1.0 - y)
    loss = ce * (1.0 - p_t).pow(gamma)
    if alpha is not None:
        loss = (alpha * y + (1.0 - alpha) * (1.0 - y)) * loss
    return loss


def _soft_targets(target: Tensor, num_classes: int, valid: Tensor, dtype: torch.dtype) -> Tensor:
    if target.dim() == 1:
        if target.dtype.is_floating_point:
            raise ValueError(f"class-index targets must be integer, got {target.dtype}")
        index = torch.where(valid, target, torch.zeros_like(target))
        check_values(((index >= 0) & (index < num_classes)).all(),
                     f"class-index targets must be in [0, {num_classes}) where not masked")
        return F.one_hot(index, num_classes).to(dtype)
    return torch.where(valid[:, None], target.to(dtype), torch.zeros_like(target, dtype=dtype))


def _multiclass_focal(logits: Tensor, target: Tensor, alpha: float | Sequence[float] | None, gamma: float,
                      eps: float, valid: Tensor) -> Tensor:
    num_classes = logits.shape[1]
    q = _soft_targets(target, num_classes, valid, logits.dtype)
    q = (1.0 - eps) * q + eps / num_classes
    log_p = F.log_softmax(logits, dim=1)
    per_class = -q * (1.0 - log_p.exp()).pow(gamma) * log_p
    if alpha is not None:
        weights = torch.as_tensor(alpha, dtype=per_class.dtype, device=per_class.device)
        if weights.dim() == 1 and weights.numel() != num_classes:
            raise ValueError(f"per-class alpha needs {num_classes} values, got {weights.numel()}")
        per_class = per_class * weights
    return per_class.sum(1)


def focal_loss(logits: Tensor, target: Tensor, alpha: float | Sequence[float] | None = 0.25, gamma: float = 2.0,
               label_smoothing: float = 0.0, mask: Tensor | None = None) -> Tensor:
    """Focal loss (Lin et al. 2017), mean over unmasked samples; all masked -> 0 with zero gradient.

    Binary, logits (B,): target float 0/1 (B,), smoothed to y (1 - eps) + eps / 2; alpha weights positives,
    1 - alpha negatives (alpha=None: no weighting); loss = a_t (1 - p_t)^gamma BCE(logit, y), the
    torchvision.ops.sigmoid_focal_loss form with p_t = p y + (1 - p)(1 - y).
    Multi-class, logits (B, K): target int (B,) or soft (B, K), smoothed to (1 - eps) q + eps / K;
    loss = -sum_k alpha_k q_k (1 - p_k)^gamma log p_k; alpha a scalar (same for every class), a per-class
    list of K values, or None. mask (B,) bool/0-1 excludes samples (their targets may be NaN/invalid).
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if logits.dim() not in (1, 2):
        raise ValueError(f"logits must be (B,) or (B, K), got {tuple(logits.shape)}")
    batch = logits.shape[0]
    valid = _sample_mask(mask, batch, logits.device)
    logits = _upcast(logits)
    if logits.dim() == 1:
        if target.shape != logits.shape:
            raise ValueError(f"binary target shape {tuple(target.shape)} != logits shape {tuple(logits.shape)}")
        if alpha is not None and not isinstance(alpha, (int, float)):
            raise ValueError("binary focal loss takes a scalar alpha")
        y = torch.where(valid, target.to(logits.dtype), torch.zeros_like(logits))
        per_sample = _binary_focal(logits, y, alpha, gamma, label_smoothing)
    else:
        if target.shape not in ((batch,), logits.shape):
            raise ValueError(f"target must be ({batch},) ints or {tuple(logits.shape)} soft, got {tuple(target.shape)}")
        per_sample = _multiclass_focal(logits, target, alpha, gamma, label_smoothing, valid)
    return masked_mean(per_sample, valid)


def view_consistency_kl(logits: Tensor, view_mask: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """Agreement between the class distributions predicted for several views of one sample.

    logits (B, V, K); p_v = softmax(logits_v); p_mean = mean of p_v over the valid views of the sample.
    Per sample: mean (reduction="mean") or sum (reduction="sum": sum_v KL(p_v || p_mean)) over its valid views of
    KL(p_v || p_mean) = sum_k p_v,k (log p_v,k - log p_mean,k)
    (this is the generalised Jensen-Shannon divergence of the views). Loss: mean over samples that have at
    least one valid view; 0 with zero gradient if none. p_mean is NOT detached; because p_mean minimises
    sum_v KL(p_v || q) over distributions q, the gradient through p_mean is zero anyway, so detaching would
    give the same gradient (each view is pulled towards the consensus). view_mask (B, V) bool, True = valid.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be (B, V, K), got {tuple(logits.shape)}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"view reduction {reduction!r}: expected 'mean' or 'sum'")
    batch, views, _ = logits.shape
    if view_mask is None:
        valid = torch.ones(batch, views, dtype=torch.bool, device=logits.device)
    else:
        if view_mask.shape != (batch, views):
            raise ValueError(f"view_mask must be ({batch}, {views}), got {tuple(view_mask.shape)}")
        valid = as_bool_mask(view_mask, torch.Size((batch, views)), "view_mask")
    logits = _upcast(logits)
    logits = torch.where(valid[..., None], logits, torch.zeros_like(logits))
    log_p = F.log_softmax(logits, dim=-1)
    prob = log_p.exp() * valid[..., None]
    n_views = valid.sum(1).clamp_min(1)
    p_mean = prob.sum(1) / n_views[:, None]
    log_mean = p_mean.clamp_min(torch.finfo(p_mean.dtype).tiny).log()
    kl = (prob * (log_p - log_mean[:, None, :])).sum(-1)
    per_sample = torch.where(valid, kl, torch.zeros_like(kl)).sum(1)
    if reduction == "mean":
        per_sample = per_sample / n_views
    return masked_mean(per_sample, valid.any(1))
