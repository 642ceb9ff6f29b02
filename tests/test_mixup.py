"""Mixup plans, token / mask / target mixing and CutMix."""
import numpy as np
import pytest
import torch
from scipy import stats

from common.training.mixup import (MixPlan, cutmix, mix_masks, mix_soft_labels, mix_targets, mix_tokens, paste_box,
                                   sample_box, sample_mixup)


def test_pairing_is_always_a_derangement():
    g = torch.Generator().manual_seed(0)
    seen = set()
    for draw in range(2000):
        batch = 2 + draw % 8
        plan = sample_mixup(batch, alpha=0.4, prob=1.0, generator=g)
        perm = plan.perm
        assert perm.dtype == torch.long
        assert sorted(perm.tolist()) == list(range(batch))
        assert (perm != torch.arange(batch)).all()
        if batch == 5:
            seen.add(tuple(perm.tolist()))
    assert len(seen) > 10  # the pairing is random, not one fixed cyclic shift


@pytest.mark.parametrize("alpha", [0.4, 2.0])
def test_lambda_follows_beta_distribution(alpha):
    g = torch.Generator().manual_seed(1)
    lams = np.array([sample_mixup(4, alpha, 1.0, g).lam for _ in range(3000)])
    assert lams.mean() == pytest.approx(0.5, abs=0.03)
    assert lams.var() == pytest.approx(1.0 / (4.0 * (2.0 * alpha + 1.0)), rel=0.1)
    assert stats.kstest(lams, stats.beta(alpha, alpha).cdf).pvalue > 1e-3


def test_probability_and_small_batches():
    g = torch.Generator().manual_seed(2)
    assert all(sample_mixup(8, 1.0, 0.0, g) is None for _ in range(200))
    assert all(sample_mixup(1, 1.0, 1.0, g) is None for _ in range(20))
    applied = sum(sample_mixup(8, 1.0, 0.3, g) is not None for _ in range(2000))
    assert applied / 2000 == pytest.approx(0.3, abs=0.04)


def test_plan_is_reproducible_from_the_generator():
    a = sample_mixup(6, 0.5, 1.0, torch.Generator().manual_seed(7))
    b = sample_mixup(6, 0.5, 1.0, torch.Generator().manual_seed(7))
    assert a.lam == b.lam and torch.equal(a.perm, b.perm)


def test_sample_mixup_rejects_bad_arguments():
    with pytest.raises(ValueError, match="alpha"):
        sample_mixup(4, 0.0, 1.0)
    with pytest.raises(ValueError, match="prob"):
        sample_mixup(4, 1.0, 1.5)


PLAN = MixPlan(lam=0.3, perm=torch.tensor([2, 0, 1]))


def test_mix_tokens_formula_for_tensor_and_list():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 5, generator=g)
    expected = torch.stack([0.3 * x[0] + 0.7 * x[2], 0.3 * x[1] + 0.7 * x[0], 0.3 * x[2] + 0.7 * x[1]])
    torch.testing.assert_close(mix_tokens(x, PLAN), expected)
    mixed = mix_tokens([x, 2 * x], PLAN)
    assert isinstance(mixed, list) and len(mixed) == 2
    torch.testing.assert_close(mixed[1], 2 * expected)


def test_mix_masks_is_and():
    mask = torch.tensor([[True, True], [True, False], [False, True]])
    assert torch.equal(mix_masks(mask, PLAN), torch.tensor([[False, True], [True, False], [False, False]]))
    assert torch.equal(mix_masks(mask.float(), PLAN), mix_masks(mask, PLAN).float())


def test_mix_targets_linear_and_hook():
    y = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    expected = torch.tensor([[0.3 * 1 + 0.7 * 5, 0.3 * 2 + 0.7 * 6],
                             [0.3 * 3 + 0.7 * 1, 0.3 * 4 + 0.7 * 2],
                             [0.3 * 5 + 0.7 * 3, 0.3 * 6 + 0.7 * 4]])
    torch.testing.assert_close(mix_targets(y, PLAN), expected)
    calls = []

    def hook(a, b, lam):
        calls.append(lam)
        return torch.maximum(a, b)

    assert torch.equal(mix_targets(y, PLAN, hook), torch.maximum(y, y[[2, 0, 1]]))
    assert calls == [0.3]


def test_mix_soft_labels():
    labels = torch.tensor([0, 2, 1])
    expected = torch.tensor([[0.3, 0.7, 0.0], [0.7, 0.0, 0.3], [0.0, 0.3, 0.7]])
    torch.testing.assert_close(mix_soft_labels(labels, 3, PLAN), expected)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        mix_soft_labels(torch.tensor([0, 3, 1]), 3, PLAN)


def test_mixing_rejects_wrong_batch_and_integer_tokens():
    with pytest.raises(ValueError, match="plan size"):
        mix_tokens(torch.zeros(4, 2, 2), PLAN)
    with pytest.raises(ValueError, match="floating"):
        mix_tokens(torch.zeros(3, 2, dtype=torch.long), PLAN)


def test_cutmix_corrected_lambda_equals_pasted_fraction():
    g = torch.Generator().manual_seed(4)
    images = torch.arange(1, 5, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 40, 56).clone()
    near_nominal = 0
    for _ in range(200):
        plan = sample_mixup(4, 1.0, 1.0, g)
        mixed, lam = cutmix(images, plan, g)
        partner_value = images[plan.perm][:, 0, 0, 0]
        pasted = (mixed[:, 0] == partner_value[:, None, None]).float().mean((1, 2))
        torch.testing.assert_close(pasted, torch.full((4,), 1.0 - lam))
        assert torch.equal(mixed, mixed[:, :1].expand_as(mixed))  # one box through all channels
        assert lam >= plan.lam - 1e-12  # clipping and flooring can only shrink the pasted box
        near_nominal += abs(lam - plan.lam) < 0.05
    assert near_nominal > 20  # unclipped boxes have area ratio close to 1 - lam


def test_sample_box_and_paste_box_apply_one_box_to_masks():
    g = torch.Generator().manual_seed(5)
    y1, y2, x1, x2 = sample_box(30, 30, 0.0, g)
    assert (y2 - y1) * (x2 - x1) > 0
    masks = torch.stack([torch.zeros(30, 30), torch.ones(30, 30)])
    plan = MixPlan(lam=0.5, perm=torch.tensor([1, 0]))
    box = (5, 15, 10, 20)
    out = paste_box(masks, plan, box)
    assert out[0].sum() == 100 and out[0, 5:15, 10:20].all()
    assert out[1].sum() == 900 - 100
    with pytest.raises(ValueError, match="B, C, H, W"):
        cutmix(torch.zeros(2, 5, 5), plan, g)
