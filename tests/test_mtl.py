"""Uncertainty weighting and PCGrad against hand computations."""
import itertools
import math

import pytest
import torch
from torch import nn

from common.training.mtl import UncertaintyWeighting, pcgrad_backward


def test_uncertainty_weighting_values_and_passthrough():
    uw = UncertaintyWeighting(["a", "b"], init_log_var=0.3)
    losses = {"a": torch.tensor(2.0), "b": torch.tensor(3.0), "c": torch.tensor(5.0)}
    out = uw(losses)
    assert out["a"].item() == pytest.approx(0.5 * math.exp(-0.3) * 2.0 + 0.15, rel=1e-6)
    assert out["b"].item() == pytest.approx(0.5 * math.exp(-0.3) * 3.0 + 0.15, rel=1e-6)
    assert out["c"] is losses["c"]
    assert sum(out.values()).item() == pytest.approx(math.exp(-0.3) * 2.5 + 0.3 + 5.0, rel=1e-6)
    assert [name for name, _ in uw.named_parameters()] == ["log_var"]
    assert uw.log_vars() == pytest.approx({"a": 0.3, "b": 0.3})


def test_uncertainty_weighting_gradient_formula():
    uw = UncertaintyWeighting(["x", "y"])
    with torch.no_grad():
        uw.log_var.copy_(torch.tensor([-0.4, 1.1]))
    values = torch.tensor([1.7, 0.2])
    sum(uw({"x": values[0], "y": values[1]}).values()).backward()
    expected = 0.5 - 0.5 * torch.exp(-uw.log_var.detach()) * values
    torch.testing.assert_close(uw.log_var.grad, expected)


def test_uncertainty_weighting_rejects_missing_and_duplicate_names():
    with pytest.raises(ValueError, match="distinct"):
        UncertaintyWeighting(["a", "a"])
    with pytest.raises(ValueError, match=r"\['b'\] missing"):
        UncertaintyWeighting(["a", "b"])({"a": torch.tensor(1.0)})


def _linear_terms(w, vectors):
    """Terms w . v_i whose gradients w.r.t. w are exactly v_i."""
    return {f"t{i}": torch.dot(w, torch.tensor(v, dtype=w.dtype)) for i, v in enumerate(vectors)}


def test_pcgrad_all_two_conflicting_vectors():
    w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    stats = pcgrad_backward(_linear_terms(w, [(1.0, 0.0), (-1.0, 1.0)]), [w])
    # g1' = g1 - (-1/2) g2 = (0.5, 0.5); g2' = g2 - (-1/1) g1 = (0, 1)
    torch.testing.assert_close(w.grad, torch.tensor([0.5, 1.5], dtype=torch.float64))
    assert stats == {"pcgrad/conflicts": 2.0, "pcgrad/pairs": 2.0}


def _project_sequence(g, others):
    g = g.clone()
    for o in others:
        dot = g @ o
        if dot < 0:
            g = g - dot / (o @ o) * o
    return g


def test_pcgrad_all_three_terms_matches_one_of_the_orderings_and_order_is_random():
    vecs = [torch.tensor(v, dtype=torch.float64) for v in [(1.0, 0.2), (-0.8, 1.0), (-0.3, -1.0)]]
    options = []
    for i, g in enumerate(vecs):
        others = [o for j, o in enumerate(vecs) if j != i]
        options.append([_project_sequence(g, list(order)) for order in itertools.permutations(others)])
    combos = [sum(choice) for choice in itertools.product(*options)]
    hit = set()
    for seed in range(12):
        w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
        pcgrad_backward(_linear_terms(w, [v.tolist() for v in vecs]), [w],
                        shuffle_generator=torch.Generator().manual_seed(seed))
        matches = [k for k, c in enumerate(combos) if torch.allclose(w.grad, c)]
        assert matches, f"seed {seed}: {w.grad} is no valid PCGrad ordering"
        hit.add(matches[0])
    assert len(hit) > 1


def test_pcgrad_no_conflict_equals_plain_sum():
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    vectors = [(1.0, 2.0, 0.0), (0.5, 0.0, 1.0), (0.0, 1.0, 1.0)]
    stats = pcgrad_backward(_linear_terms(w, vectors), [w])
    torch.testing.assert_close(w.grad, torch.tensor(vectors, dtype=torch.float64).sum(0))
    assert stats["pcgrad/conflicts"] == 0.0


def test_pcgrad_anchored_projects_only_auxiliaries():
    w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    # primaries t0=(1,0), t2=(0,1) -> g_P=(1,1); aux t1=(-2,0) conflicts: -> (-2,0) - (-2/2)(1,1) = (-1,1);
    # aux t3=(1,-0.5) does not conflict (dot 0.5) and is kept.
    terms = _linear_terms(w, [(1.0, 0.0), (-2.0, 0.0), (0.0, 1.0), (1.0, -0.5)])
    stats = pcgrad_backward(terms, [w], mode="anchored", primary=["t0", "t2"])
    torch.testing.assert_close(w.grad, torch.tensor([1.0, 1.0]).double() + torch.tensor([-1.0, 1.0]).double()
                               + torch.tensor([1.0, -0.5]).double())
    assert stats == {"pcgrad/conflicts": 1.0, "pcgrad/pairs": 2.0}


def test_pcgrad_anchored_support_restricts_the_anchor_to_each_auxiliarys_parameters():
    a = torch.zeros(2, dtype=torch.float64, requires_grad=True)     # trained by the primary only
    b = torch.zeros(2, dtype=torch.float64, requires_grad=True)     # shared by the primary and the auxiliary
    terms = {"p": (torch.tensor([3.0, 0.0]).double() * a).sum() + (torch.tensor([1.0, 1.0]).double() * b).sum(),
             "x": (torch.tensor([-2.0, 0.0]).double() * b).sum()}
    pcgrad_backward(terms, [a, b], mode="anchored_support", primary=["p"])
    # anchor on x's support: (0, 0 | 1, 0) (b[1] has x-gradient 0); x . anchor = -2 -> x - (-2 / 1) anchor = 0
    torch.testing.assert_close(a.grad, torch.tensor([3.0, 0.0]).double())
    torch.testing.assert_close(b.grad, torch.tensor([1.0, 1.0]).double())
    for p in (a, b):
        p.grad = None
    terms = {"p": (torch.tensor([3.0, 0.0]).double() * a).sum() + (torch.tensor([1.0, 1.0]).double() * b).sum(),
             "x": (torch.tensor([-2.0, 0.0]).double() * b).sum()}
    pcgrad_backward(terms, [a, b], mode="anchored", primary=["p"])
    # the full anchor (3, 0, 1, 1): x . g_P = -2, |g_P|^2 = 11 -> x + (2 / 11) g_P, which moves a
    g_p = torch.tensor([3.0, 0.0, 1.0, 1.0]).double()
    expected = g_p + torch.tensor([0.0, 0.0, -2.0, 0.0]).double() + 2.0 / 11.0 * g_p
    torch.testing.assert_close(torch.cat([a.grad, b.grad]), expected)


def test_pcgrad_accumulates_over_micro_batches():
    w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    pcgrad_backward(_linear_terms(w, [(1.0, 0.0), (-1.0, 1.0)]), [w])
    pcgrad_backward(_linear_terms(w, [(0.0, 2.0), (1.0, 1.0)]), [w])
    # first: (0.5, 1.5) as above; second: no conflict -> (1, 3)
    torch.testing.assert_close(w.grad, torch.tensor([1.5, 4.5], dtype=torch.float64))


def test_pcgrad_unused_param_counts_as_zero():
    a = torch.ones(2, requires_grad=True)
    b = torch.ones(2, requires_grad=True)
    terms = {"x": (a * torch.tensor([1.0, 0.0])).sum(), "y": (a * torch.tensor([-1.0, 1.0])).sum() + 3 * b.sum()}
    pcgrad_backward(terms, [a, b])
    # g_x=(1,0,0,0), g_y=(-1,1,3,3): dot -1 -> g_x' = g_x + g_y/20, g_y' = g_y + g_x
    g_x = torch.tensor([1.0, 0, 0, 0]) + torch.tensor([-1.0, 1, 3, 3]) / 20
    g_y = torch.tensor([0.0, 1, 3, 3])
    torch.testing.assert_close(torch.cat([a.grad, b.grad]), g_x + g_y)


def test_pcgrad_with_linear_model_and_other_params():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    uw = UncertaintyWeighting(["first", "second"], init_log_var=0.2)
    frozen_extra = nn.Parameter(torch.ones(1))
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    out = model(x)
    terms = uw({"first": ((out[:, 0] - y[:, 0]) ** 2).mean(),
                "second": (-(out[:, 0] * 2 - y[:, 1]) ** 2).mean() + 0 * frozen_extra.sum()})
    params = list(model.parameters())
    per_term = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(t, params, retain_graph=True)])
                for t in terms.values()]
    uw_grad = torch.autograd.grad(sum(terms.values()), [uw.log_var], retain_graph=True)[0]
    g1, g2 = per_term
    dot = g1 @ g2
    assert dot < 0, "the second term is built to conflict with the first"
    expected = g1 - dot / (g2 @ g2) * g2 + g2 - dot / (g1 @ g1) * g1
    stats = pcgrad_backward(terms, params, other_params=[uw.log_var])
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in params]), expected)
    torch.testing.assert_close(uw.log_var.grad, uw_grad)
    assert frozen_extra.grad is None
    assert stats["pcgrad/conflicts"] == 2.0


def test_pcgrad_rejects_bad_arguments():
    w = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="mode"):
        pcgrad_backward(_linear_terms(w, [(1.0, 0.0)]), [w], mode="some")
    with pytest.raises(ValueError, match="primary"):
        pcgrad_backward(_linear_terms(w, [(1.0, 0.0)]), [w], mode="anchored", primary=["nope"])
    with pytest.raises(ValueError, match="require grad"):
        pcgrad_backward(_linear_terms(w, [(1.0, 0.0)]), [torch.zeros(2)])
