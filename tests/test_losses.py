"""Losses against independent formulas (numpy / loops, float64) and torch references."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from common.training.losses import dice_bce_loss, focal_loss, masked_regression_loss, view_consistency_kl


def _np_regression(pred, target, kind, delta=1.0, p=1.5):
    pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    diff = pred - target
    if kind == "mse":
        return diff ** 2
    if kind == "huber":
        return np.where(np.abs(diff) < delta, 0.5 * diff ** 2, delta * (np.abs(diff) - 0.5 * delta))
    if kind == "smooth_l1":
        return np.where(np.abs(diff) < delta, 0.5 * diff ** 2 / delta, np.abs(diff) - 0.5 * delta)
    mu = np.log1p(np.exp(pred))
    return -target * mu ** (1 - p) / (1 - p) + mu ** (2 - p) / (2 - p)


@pytest.fixture
def regression_batch():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(6, 4, generator=g, dtype=torch.float64) * 2
    target = torch.rand(6, 4, generator=g, dtype=torch.float64) * 3
    mask = torch.rand(6, 4, generator=g) > 0.4
    return pred, target, mask


@pytest.mark.parametrize("kind,delta,p", [("mse", 1.0, 1.5), ("huber", 0.7, 1.5), ("smooth_l1", 0.5, 1.5),
                                          ("tweedie", 1.0, 1.2), ("tweedie", 1.0, 1.8)])
def test_regression_matches_numpy_formula(regression_batch, kind, delta, p):
    pred, target, mask = regression_batch
    got = masked_regression_loss(pred, target, mask, kind=kind, delta=delta, tweedie_p=p)
    elems = _np_regression(pred.numpy(), target.numpy(), kind, delta, p)
    expected = elems[mask.numpy()].mean()
    assert got.item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("kind,ref", [("mse", lambda a, b, d: F.mse_loss(a, b)),
                                      ("huber", lambda a, b, d: F.huber_loss(a, b, delta=d)),
                                      ("smooth_l1", lambda a, b, d: F.smooth_l1_loss(a, b, beta=d))])
def test_regression_matches_torch_on_observed_subset(regression_batch, kind, ref):
    pred, target, mask = regression_batch
    got = masked_regression_loss(pred.float(), target.float(), mask, kind=kind, delta=0.8)
    expected = ref(pred.float()[mask], target.float()[mask], 0.8)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("kind", ["mse", "huber", "smooth_l1", "tweedie"])
def test_nan_targets_where_masked_give_finite_loss_and_subset_grads(regression_batch, kind):
    pred, target, mask = regression_batch
    target = target.masked_fill(~mask, float("nan"))
    pred_full = pred.clone().requires_grad_(True)
    loss = masked_regression_loss(pred_full, target, mask.long(), kind=kind)
    loss.backward()
    pred_sub = pred.clone().requires_grad_(True)
    ref = masked_regression_loss(pred_sub[mask], target[mask], torch.ones(int(mask.sum()), dtype=torch.bool),
                                 kind=kind)
    ref.backward()
    assert torch.isfinite(loss) and torch.isfinite(pred_full.grad).all()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(pred_full.grad, pred_sub.grad)
    assert (pred_full.grad[~mask] == 0).all()


@pytest.mark.parametrize("kind", ["mse", "huber", "smooth_l1", "tweedie"])
def test_regression_all_missing_is_zero_with_zero_grad(kind):
    pred = torch.randn(3, 2, requires_grad=True)
    target = torch.full((3, 2), float("nan"))
    loss = masked_regression_loss(pred, target, torch.zeros(3, 2, dtype=torch.bool), kind=kind)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(pred.grad, torch.zeros(3, 2))


def test_regression_broadcast_mask_and_bf16_input():
    pred, target = torch.randn(4, 3), torch.randn(4, 3)
    row_mask = torch.tensor([[1], [0], [1], [0]])
    got = masked_regression_loss(pred.bfloat16(), target, row_mask)
    assert got.dtype == torch.float32
    expected = F.mse_loss(pred.bfloat16().float()[[0, 2]], target[[0, 2]])
    torch.testing.assert_close(got, expected)


def test_regression_rejects_bad_inputs():
    pred, target, mask = torch.zeros(2, 2), torch.zeros(2, 2), torch.ones(2, 2)
    with pytest.raises(ValueError, match="kind"):
        masked_regression_loss(pred, target, mask, kind="l3")
    with pytest.raises(ValueError, match="tweedie_p"):
        masked_regression_loss(pred, target, mask, kind="tweedie", tweedie_p=2.0)
    with pytest.raises(ValueError, match="shape"):
        masked_regression_loss(pred, torch.zeros(2, 3), mask)
    with pytest.raises(ValueError, match="0/1"):
        masked_regression_loss(pred, target, mask * 0.5)
    with pytest.raises(ValueError, match="broadcast"):
        masked_regression_loss(pred, target, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="delta"):
        masked_regression_loss(pred, target, mask, kind="huber", delta=0.0)


def test_dice_bce_matches_loops():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 1, 5, 6, generator=g, dtype=torch.float64)
    target = (torch.rand(3, 1, 5, 6, generator=g) > 0.5).double()
    got = dice_bce_loss(logits, target, dice_weight=0.3, bce_weight=0.9, smooth=0.5)
    x, y = logits.numpy().reshape(3, -1), target.numpy().reshape(3, -1)
    dices, bces = [], []
    for b in range(3):
        p = 1 / (1 + np.exp(-x[b]))
        dices.append(1 - (2 * np.sum(p * y[b]) + 0.5) / (np.sum(p) + np.sum(y[b]) + 0.5))
        bces.extend(-(y[b] * np.log(p) + (1 - y[b]) * np.log(1 - p)))
    expected = 0.3 * np.mean(dices) + 0.9 * np.mean(bces)
    assert got.item() == pytest.approx(expected, rel=1e-10)
    torch.testing.assert_close(dice_bce_loss(logits[:, 0], target[:, 0], 0.3, 0.9, 0.5), got)


def test_dice_bce_rejects_multichannel():
    with pytest.raises(ValueError, match="B,1,H,W"):
        dice_bce_loss(torch.zeros(2, 2, 4, 4), torch.zeros(2, 2, 4, 4))


def _np_binary_focal(x, y, alpha, gamma, eps):
    y = y * (1 - eps) + eps / 2
    p = 1 / (1 + np.exp(-x))
    ce = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    p_t = p * y + (1 - p) * (1 - y)
    a_t = alpha * y + (1 - alpha) * (1 - y)
    return a_t * (1 - p_t) ** gamma * ce


def test_binary_focal_matches_torchvision_without_smoothing():
    g = torch.Generator().manual_seed(2)
    logits, target = torch.randn(16, generator=g), (torch.rand(16, generator=g) > 0.5).float()
    got = focal_loss(logits, target, alpha=0.3, gamma=1.5)
    expected = sigmoid_focal_loss(logits, target, alpha=0.3, gamma=1.5, reduction="mean")
    torch.testing.assert_close(got, expected)


def test_binary_focal_smoothing_and_mask_match_formula():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(10, generator=g, dtype=torch.float64)
    target = (torch.rand(10, generator=g) > 0.5).double()
    mask = torch.rand(10, generator=g) > 0.3
    target_nan = target.masked_fill(~mask, float("nan"))
    got = focal_loss(logits, target_nan, alpha=0.25, gamma=2.0, label_smoothing=0.1, mask=mask)
    elems = _np_binary_focal(logits.numpy(), target.numpy(), 0.25, 2.0, 0.1)
    assert got.item() == pytest.approx(elems[mask.numpy()].mean(), rel=1e-10)


def _np_multiclass_focal(x, q, alpha, gamma):
    out = []
    for row, qrow in zip(x, q):
        logp = row - np.log(np.sum(np.exp(row)))
        out.append(-sum(alpha[k] * qrow[k] * (1 - math.exp(logp[k])) ** gamma * logp[k] for k in range(len(row))))
    return np.array(out)


def test_multiclass_focal_matches_loop_with_per_class_alpha_and_smoothing():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(7, 4, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (7,), generator=g)
    alpha, eps = [0.1, 0.2, 0.3, 0.4], 0.2
    got = focal_loss(logits, labels, alpha=alpha, gamma=2.0, label_smoothing=eps)
    q = (1 - eps) * np.eye(4)[labels.numpy()] + eps / 4
    expected = _np_multiclass_focal(logits.numpy(), q, alpha, 2.0).mean()
    assert got.item() == pytest.approx(expected, rel=1e-10)
    soft = F.one_hot(labels, 4).double()
    torch.testing.assert_close(focal_loss(logits, soft, alpha=alpha, gamma=2.0, label_smoothing=eps), got)


def test_multiclass_focal_gamma0_equals_cross_entropy():
    g = torch.Generator().manual_seed(5)
    logits, labels = torch.randn(9, 5, generator=g), torch.randint(0, 5, (9,), generator=g)
    got = focal_loss(logits, labels, alpha=None, gamma=0.0, label_smoothing=0.15)
    torch.testing.assert_close(got, F.cross_entropy(logits, labels, label_smoothing=0.15))


def test_multiclass_focal_mask_ignores_invalid_labels():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(6, 3, generator=g, requires_grad=True)
    labels = torch.tensor([0, -1, 2, 1, -1, 0])
    mask = labels >= 0
    loss = focal_loss(logits, labels, alpha=0.5, mask=mask)
    loss.backward()
    ref = focal_loss(logits.detach()[mask], labels[mask], alpha=0.5)
    torch.testing.assert_close(loss, ref)
    assert (logits.grad[~mask] == 0).all() and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("shape,target", [((4,), torch.full((4,), float("nan"))),
                                          ((4, 3), torch.full((4,), -1))])
def test_focal_all_masked_is_zero_with_zero_grad(shape, target):
    logits = torch.randn(*shape, requires_grad=True)
    loss = focal_loss(logits, target, mask=torch.zeros(4, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros(shape))


def test_focal_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        focal_loss(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="label_smoothing"):
        focal_loss(torch.zeros(2), torch.zeros(2), label_smoothing=1.0)
    with pytest.raises(ValueError, match="per-class alpha"):
        focal_loss(torch.zeros(2, 3), torch.tensor([0, 1]), alpha=[0.5, 0.5])
    with pytest.raises(ValueError, match="mask"):
        focal_loss(torch.zeros(2), torch.zeros(2), mask=torch.ones(3, dtype=torch.bool))


def _np_view_kl(x, valid):
    per_sample = []
    for b in range(x.shape[0]):
        views = [v for v in range(x.shape[1]) if valid[b, v]]
        if not views:
            continue
        probs = [np.exp(x[b, v]) / np.exp(x[b, v]).sum() for v in views]
        mean = np.mean(probs, axis=0)
        per_sample.append(np.mean([np.sum(p * np.log(p / mean)) for p in probs]))
    return np.mean(per_sample)


def test_view_kl_matches_loop_and_kl_div():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    got = view_consistency_kl(logits)
    assert got.item() == pytest.approx(_np_view_kl(logits.numpy(), np.ones((4, 3), bool)), rel=1e-10)
    log_mean = F.softmax(logits, -1).mean(1, keepdim=True).log().expand_as(logits)
    ref = F.kl_div(log_mean, F.softmax(logits, -1), reduction="none").sum(-1).mean()
    torch.testing.assert_close(got, ref)


def test_view_kl_with_view_mask_and_nan_logits_of_invalid_views():
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    valid = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    logits_nan = logits.masked_fill(~valid[..., None], float("nan")).requires_grad_(True)
    got = view_consistency_kl(logits_nan, valid)
    got.backward()
    assert got.item() == pytest.approx(_np_view_kl(logits.numpy(), valid.numpy()), rel=1e-10)
    assert torch.isfinite(logits_nan.grad).all() and (logits_nan.grad[~valid] == 0).all()


def test_view_kl_zero_for_identical_views_and_all_invalid():
    same = torch.randn(2, 1, 4).expand(2, 3, 4)
    assert view_consistency_kl(same).item() == pytest.approx(0.0, abs=1e-6)
    logits = torch.randn(2, 3, 4, requires_grad=True)
    loss = view_consistency_kl(logits, torch.zeros(2, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros(2, 3, 4))


def test_view_kl_gradient_matches_numerical_gradient():
    """Analytic gradient vs finite differences, with a masked view."""
    logits = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda x: view_consistency_kl(x, valid), (logits,))
