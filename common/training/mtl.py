"""Multi-task balancing: uncertainty weighting and PCGrad on the exact weighted terms that sum to the loss."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

PCGRAD_MODES = ("all", "anchored", "anchored_support")


class UncertaintyWeighting(nn.Module):
    """Learned homoscedastic-uncertainty weights (Kendall, Gal & Cipolla 2018, regression form).

    One learnable log-variance s_i per named term, stored in the vector parameter `log_var` (order of
    `names`). forward(losses) returns {name: 0.5 * exp(-s_i) * L_i + 0.5 * s_i} for the names it weights,
    each divided by the number of weighted terms when `divide` (the mean over tasks, as the CSIRO
    write-up's uw.py); other terms pass through unchanged, so the returned values sum to the total loss.
    d/ds_i of a weighted term = 0.5 - 0.5 * exp(-s_i) * L_i (minimum at s_i = log L_i, with or without divide).
    """

    def __init__(self, names: list[str], init_log_var: float = 0.0, divide: bool = False):
        super().__init__()
        if len(names) == 0 or len(set(names)) != len(names):
            raise ValueError(f"names must be a non-empty list of distinct term names, got {names}")
        self.names = list(names)
        self.scale = 1.0 / len(names) if divide else 1.0
        self.log_var = nn.Parameter(torch.full((len(names),), float(init_log_var)))

    def forward(self, losses: dict[str, Tensor]) -> dict[str, Tensor]:
        missing = [name for name in self.names if name not in losses]
        if missing:
            raise ValueError(f"UncertaintyWeighting: loss terms {missing} missing; got {sorted(losses)}")
        out = dict(losses)
        for i, name in enumerate(self.names):
            s = self.log_var[i]
            out[name] = (0.5 * torch.exp(-s) * losses[name] + 0.5 * s) * self.scale
        return out

    def log_vars(self) -> dict[str, float]:
        """Current log-variances by name (for logging)."""
        return {name: float(v) for name, v in zip(self.names, self.log_var.detach().cpu())}

    def epoch_log(self) -> dict[str, float]:
        """uw/log_var/<term> and uw/weight/<term> = exp(-s) (the learned weight), logged once per epoch."""
        values = self.log_vars()
        return {**{f"uw/log_var/{k}": v for k, v in values.items()},
                **{f"uw/weight/{k}": math.exp(-v) for k, v in values.items()}}


def _term_grads(term: Tensor, params: list[Tensor]) -> list[Tensor | None]:
    """Gradient of one term w.r.t. params (only the graph between them runs); None where the term does not reach."""
    if not term.requires_grad:
        return [None] * len(params)
    return list(torch.autograd.grad(term, params, retain_graph=True, allow_unused=True))


def _compute_dtype(p: Tensor) -> torch.dtype:
    return torch.promote_types(p.dtype, torch.float32)


def _stacked(grads: list[Tensor | None], p: Tensor) -> Tensor:
    """One parameter's gradients of several terms as rows of a (terms, numel) matrix; None counts as zero."""
    dtype = _compute_dtype(p)
    return torch.stack([torch.zeros(p.numel(), dtype=dtype, device=p.device) if g is None
                        else g.reshape(-1).to(dtype) for g in grads])


def _minus(total: Tensor | None, parts: list[Tensor | None], p: Tensor) -> Tensor:
    """total - sum(parts) for one parameter (None = zero): the gradient of the terms not taken separately."""
    out = torch.zeros_like(p, dtype=_compute_dtype(p)) if total is None else total.to(_compute_dtype(p))
    for part in parts:
        if part is not None:
            out = out - part.to(out.dtype)
    return out


def _gram(per_param: list[list[Tensor | None]], params: list[Tensor]) -> Tensor:
    """G[i, j] = g_i . g_j over all params, built one parameter at a time (float64 accumulation)."""
    gram = None
    for grads, p in zip(per_param, params):
        rows = _stacked(grads, p)
        part = (rows @ rows.T).double()
        gram = part if gram is None else gram + part
    return gram


def _conflict_coef(dot: Tensor, norm: Tensor) -> tuple[Tensor, Tensor]:
    """The coefficient that removes a conflicting component (dot < 0): dot / |d|^2, else 0; and the conflict."""
    conflict = dot < 0
    return torch.where(conflict, dot / norm.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(dot)), conflict


def _all_weights(gram: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Yu et al. 2020 on the Gram matrix: each g_i, projected in random order against every ORIGINAL g_j it
    conflicts with, stays a combination sum_j c_j g_j; returns the summed coefficients and the conflicts."""
    k = gram.shape[0]
    eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
    weights = torch.zeros(k, dtype=gram.dtype, device=gram.device)
    conflicts = torch.zeros((), device=gram.device)
    for i in range(k):
        coefs = eye[i]
        others = [j for j in range(k) if j != i]
        for idx in torch.randperm(len(others), generator=generator).tolist():
            j = others[idx]
            coef, conflict = _conflict_coef(coefs @ gram[:, j], gram[j, j])
            coefs = coefs - coef * eye[j]
            conflicts = conflicts + conflict.float()
        weights = weights + coefs
    return weights, conflicts


def _pcgrad_all(per_param: list[list[Tensor | None]], params: list[Tensor], full: list[Tensor | None],
                generator: torch.Generator | None) -> tuple[list[Tensor], Tensor]:
    """per_param: every term's gradient but the last's, by parameter; the last is the full gradient less them."""
    per_param = [grads + [_minus(full[i], grads, p)] for i, (grads, p) in enumerate(zip(per_param, params))]
    weights, conflicts = _all_weights(_gram(per_param, params), generator)
    extra = weights - 1.0                          # total = sum_j w_j g_j = full + sum_j (w_j - 1) g_j
    return [_with(full[i], extra, _stacked(grads, p), p) for i, (grads, p) in enumerate(zip(per_param, params))], \
        conflicts


def _with(full: Tensor | None, coefs: Tensor, rows: Tensor, p: Tensor) -> Tensor:
    """full + sum_j coefs_j rows_j for one parameter, shaped like it."""
    out = (coefs.to(rows.dtype) @ rows).view_as(p)
    return out if full is None else out + full.to(out.dtype)


def _pcgrad_anchored(per_param: list[list[Tensor | None]], params: list[Tensor], full: list[Tensor | None],
                     restrict: bool) -> tuple[list[Tensor], Tensor]:
    """per_param: each auxiliary's gradient, by parameter; g_P = full - sum of the auxiliaries. An auxiliary g_a
    with g_a . g_P < 0 loses its component along g_P (restrict: along g_P on g_a's support)."""
    anchor = [_minus(full[i], grads, p) for i, (grads, p) in enumerate(zip(per_param, params))]
    if not per_param[0]:
        return anchor, torch.zeros((), device=params[0].device)
    gram = _gram([grads + [g_p] for grads, g_p in zip(per_param, anchor)], params)
    dots = gram[:-1, -1]
    norms = _support_norms(per_param, anchor, params) if restrict else gram[-1, -1].expand(len(dots))
    coefs, conflict = _conflict_coef(dots, norms)
    totals = []
    for i, (grads, g_p, p) in enumerate(zip(per_param, anchor, params)):
        if restrict:                               # sum_a coef_a * mask_a, coordinate by coordinate
            scale = (coefs.to(g_p.dtype) @ (_stacked(grads, p) != 0).to(g_p.dtype)).view_as(p)
        else:
            scale = coefs.sum().to(g_p.dtype)
        totals.append(_minus(full[i], [], p) - scale * g_p)   # g_P + sum_a (g_a - coef_a g_P)
    return totals, conflict.float().sum()


def _support_norms(per_param: list[list[Tensor | None]], anchor: list[Tensor], params: list[Tensor]) -> Tensor:
    """|g_P restricted to supp(g_a)|^2 for every auxiliary a."""
    norms = None
    for grads, g_p, p in zip(per_param, anchor, params):
        part = ((_stacked(grads, p) != 0).to(g_p.dtype) @ g_p.reshape(-1).pow(2)).double()
        norms = part if norms is None else norms + part
    return norms


def _accumulate(totals: list[Tensor], params: list[Tensor]) -> None:
    for g, p in zip(totals, params):
        g = g.to(p.dtype)
        if p.grad is None:
            p.grad = g
        else:
            p.grad.add_(g)


def _check_args(terms: dict[str, Tensor], params: list[Tensor], mode: str, primary: list[str] | None) -> None:
    if mode not in PCGRAD_MODES:
        raise ValueError(f"pcgrad mode must be one of {PCGRAD_MODES}, got {mode!r}")
    if not terms:
        raise ValueError("pcgrad_backward needs at least one loss term")
    if not params or any(not p.requires_grad for p in params):
        raise ValueError("pcgrad_backward needs a non-empty list of params that require grad")
    if mode.startswith("anchored"):
        unknown = [name for name in (primary or []) if name not in terms]
        if not primary or unknown:
            raise ValueError(f"anchored PCGrad needs primary term names among {sorted(terms)}, got {primary}")


def pcgrad_backward(terms: dict[str, Tensor], params: list[Tensor], mode: str = "all",
                    primary: list[str] | None = None, shuffle_generator: torch.Generator | None = None,
                    other_params: list[Tensor] | None = None) -> dict[str, float]:
    """Backward pass with PCGrad (Yu et al. 2020) on `params`; ADDS the result to `param.grad`.

    terms: the weighted loss terms that sum to the loss; g_i their gradients w.r.t. `params` (a param a term does
    not touch counts as zero):
      "all":      for each term i, for every other j in random order (`shuffle_generator`), if g_i . g_j < 0,
                  g_i -= (g_i . g_j) / |g_j|^2 g_j with the ORIGINAL g_j; the projected g_i are summed.
      "anchored": g_P = sum of the `primary` gradients (unchanged); an auxiliary g_a with g_a . g_P < 0 loses
                  its component along g_P; result g_P + sum of the (projected) auxiliaries.
      "anchored_support": as "anchored", with g_P restricted to g_a's support (coordinates where g_a != 0: the
                  parameters the auxiliary trains, rows of a shared output map included) for the test and the
                  projection of g_a (the CSIRO write-up's repository, pcgrad.py).
    Cost: one gradient of sum(terms) w.r.t. params and other_params, plus one gradient w.r.t. `params` only
    (just the graph between the term and them) per auxiliary term ("anchored*") or per term but the last ("all");
    the remaining gradient (g_P, or the last term's) is the full one less those. The projections run on the
    Gram matrix of the gradients, built one parameter tensor at a time (no flattened copies of all gradients).
    Because it adds to .grad, gradient accumulation works: call once per micro-batch, step once.
    `other_params` (e.g. uncertainty-weighting log-variances, frozen-path extras) get the plain gradient of
    sum(terms), also added to .grad; params in neither list get nothing. The graph is freed afterwards.
    Under DDP the reducer's hooks do not see these gradients: all-reduce `params` grads yourself.
    Returns {"pcgrad/conflicts": number of projections made (a tensor on the device: reading it waits for the
    device), "pcgrad/pairs": number of pairs tested}.
    """
    _check_args(terms, params, mode, primary)
    names = list(terms)
    separate = names[:-1] if mode == "all" else [name for name in names if name not in primary]
    separate_grads = [_term_grads(terms[name], params) for name in separate]     # before the graph is freed
    full = _full_grads(sum(terms.values()), params, list(other_params or []))
    per_param = [[g[i] for g in separate_grads] for i in range(len(params))]
    if mode == "all":
        totals, conflicts = _pcgrad_all(per_param, params, full, shuffle_generator)
        pairs = len(names) * (len(names) - 1)
    else:
        totals, conflicts = _pcgrad_anchored(per_param, params, full, restrict=mode == "anchored_support")
        pairs = len(separate)
    _accumulate(totals, params)
    return {"pcgrad/conflicts": conflicts, "pcgrad/pairs": float(pairs)}


def _full_grads(loss: Tensor, params: list[Tensor], others: list[Tensor]) -> list[Tensor | None]:
    """Gradient of the loss w.r.t. params (returned) and others (added to their .grad), freeing the graph."""
    if not loss.requires_grad:
        return [None] * len(params)
    grads = torch.autograd.grad(loss, params + others, allow_unused=True)
    for g, p in zip(grads[len(params):], others):
        if g is not None:
            p.grad = g if p.grad is None else p.grad.add_(g)
    return list(grads[:len(params)])
