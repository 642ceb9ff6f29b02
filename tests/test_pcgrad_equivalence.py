"""PCGrad (common.training.mtl) against the previous implementation (flattened per-term gradients, kept here only
as the reference) and against a hand projection, on random gradients, to 1e-6 relative."""
import pytest
import torch
from torch import nn

from common.training.mtl import pcgrad_backward

# ---- the previous implementation, verbatim in its algorithm (reference only) ------------------------------------


def _ref_flat_grads(term, params):
    if not term.requires_grad:
        return torch.cat([torch.zeros(p.numel(), device=p.device) for p in params])
    grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).float() for g, p in zip(grads, params)])


def _ref_project_away(g, direction):
    dot = torch.dot(g, direction)
    conflict = dot < 0
    coef = torch.where(conflict, dot / direction.pow(2).sum().clamp_min(torch.finfo(g.dtype).tiny),
                       torch.zeros_like(dot))
    return g - coef * direction, conflict


def _ref_all(grads, generator):
    total, conflicts, k = torch.zeros_like(grads[0]), torch.zeros(()), grads.shape[0]
    for i in range(k):
        g = grads[i].clone()
        others = [j for j in range(k) if j != i]
        for idx in torch.randperm(len(others), generator=generator).tolist():
            g, conflict = _ref_project_away(g, grads[others[idx]])
            conflicts = conflicts + conflict.float()
        total = total + g
    return total, conflicts


def _ref_anchored(grads, is_primary, restrict):
    g_primary = grads[[i for i, p in enumerate(is_primary) if p]].sum(0)
    total, conflicts = g_primary.clone(), torch.zeros(())
    for i, primary in enumerate(is_primary):
        if not primary:
            anchor = g_primary * (grads[i] != 0) if restrict else g_primary
            g, conflict = _ref_project_away(grads[i], anchor)
            total, conflicts = total + g, conflicts + conflict.float()
    return total, conflicts


def reference_update(terms, params, mode, primary=None, generator=None):
    grads = torch.stack([_ref_flat_grads(t, params) for t in terms.values()])
    if mode == "all":
        return _ref_all(grads, generator)
    return _ref_anchored(grads, [n in primary for n in terms], restrict=mode == "anchored_support")


# ---- fixtures ------------------------------------------------------------------------------------------------------


class SharedTrunk(nn.Module):
    """A shared trunk and one private output per term, the auxiliaries reaching only part of the trunk."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(7, 16), nn.Tanh(), nn.Linear(16, 12))
        self.outs = nn.ModuleList([nn.Linear(12, 1) for _ in range(5)])
        self.extra = nn.Parameter(torch.randn(3))        # only the last term uses it

    def terms(self, x, y):
        z = self.trunk(x)
        out = {}
        for k, layer in enumerate(self.outs):
            zk = z if k < 3 else z * (torch.arange(12) % 2 == k % 2)   # auxiliaries see half the features
            out[f"t{k}"] = ((layer(zk).squeeze(-1) - y[:, k]) ** 2).mean() * (0.5 + k)
        out["t4"] = out["t4"] + (self.extra * x[:, :3]).sum(1).mean() ** 2
        return out


def _flat(params):
    return torch.cat([p.grad.reshape(-1) for p in params])


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("mode", ["all", "anchored", "anchored_support"])
@pytest.mark.parametrize("seed", range(4))
def test_new_update_equals_the_previous_implementation(mode, seed):
    torch.manual_seed(seed)
    model = SharedTrunk()
    params = list(model.parameters())
    x, y = torch.randn(32, 7), torch.randn(32, 5)
    primary = ["t0", "t1", "t2"] if mode != "all" else None
    expected, expected_conflicts = reference_update(model.terms(x, y), params, mode, primary,
                                                    torch.Generator().manual_seed(seed))
    stats = pcgrad_backward(model.terms(x, y), params, mode=mode, primary=primary,
                            shuffle_generator=torch.Generator().manual_seed(seed))
    assert _rel(_flat(params), expected) < 1e-6
    assert float(stats["pcgrad/conflicts"]) == float(expected_conflicts)


def _hand_project(g, d):
    dot = float(g @ d)
    return g - dot / float(d @ d) * d if dot < 0 else g


@pytest.mark.parametrize("mode", ["all", "anchored", "anchored_support"])
def test_new_update_equals_a_hand_projection_on_random_gradients(mode):
    """Linear terms sum_p <R_k[p], p> have gradient R_k exactly; sparse R_k give the auxiliaries partial support."""
    torch.manual_seed(11)
    params = [torch.zeros(shape, requires_grad=True) for shape in [(4, 3), (5,), (2, 2, 2)]]
    n = sum(p.numel() for p in params)
    vectors = [torch.randn(n) * (torch.rand(n) < (1.0 if k < 2 else 0.6)) for k in range(5)]
    for _ in range(3):                                     # conflicts guaranteed: aux opposite to the primaries
        vectors.append(-(vectors[0] + vectors[1]) * (torch.rand(n) < 0.5) + 0.1 * torch.randn(n))
    terms = {}
    for k, v in enumerate(vectors):
        chunks = torch.split(v, [p.numel() for p in params])
        terms[f"t{k}"] = sum((c.view_as(p) * p).sum() for c, p in zip(chunks, params))
    g = [v.double() for v in vectors]
    if mode == "all":
        order = torch.Generator().manual_seed(3)
        total = torch.zeros(n, dtype=torch.float64)
        for i in range(len(g)):
            h, others = g[i].clone(), [j for j in range(len(g)) if j != i]
            for idx in torch.randperm(len(others), generator=order).tolist():
                h = _hand_project(h, g[others[idx]])
            total += h
        pcgrad_backward(terms, params, shuffle_generator=torch.Generator().manual_seed(3))
    else:
        g_p = g[0] + g[1]
        total = g_p.clone()
        for h in g[2:]:
            total += _hand_project(h, g_p * (h != 0) if mode == "anchored_support" else g_p)
        pcgrad_backward(terms, params, mode=mode, primary=["t0", "t1"])
    assert _rel(_flat(params), total) < 1e-6


def test_other_params_get_the_plain_gradient_and_grads_accumulate():
    torch.manual_seed(5)
    model = SharedTrunk()
    head = list(model.outs.parameters())
    others = list(model.trunk.parameters()) + [model.extra]
    x, y = torch.randn(16, 7), torch.randn(16, 5)
    plain = torch.autograd.grad(sum(model.terms(x, y).values()), others)
    expected, _ = reference_update(model.terms(x, y), head, "anchored_support", ["t0"])
    for _ in range(2):
        pcgrad_backward(model.terms(x, y), head, mode="anchored_support", primary=["t0"], other_params=others)
    for g, p in zip(plain, others):
        torch.testing.assert_close(p.grad, 2 * g)
    assert _rel(_flat(head), 2 * expected) < 1e-6
