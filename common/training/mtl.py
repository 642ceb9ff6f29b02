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


def _flat_grads(term: Tensor, params: list[Tensor]) -> Tensor:
    """Gradient of one term w.r.t. params as one float32 vector; unused params count as zero."""
    if not term.requires_grad:
        return torch.cat([torch.zeros(p.numel(), device=p.device) for p in params])
    grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).float() for g, p in zip(grads, params)])


def _project_away(g: Tensor, direction: Tensor) -> tuple[Tensor, Tensor]:
    """Remove from g its component along `direction` when they conflict (g . d < 0); returns (g', conflict)."""
    dot = torch.dot(g, direction)
    conflict = dot < 0
    coef = torch.where(conflict, dot / direction.pow(2).sum().clamp_min(torch.finfo(g.dtype).tiny),
                       torch.zeros_like(dot))
    return g - coef * direction, conflict


def _pcgrad_all(grads: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Yu et al. 2020: each g_i projected in random order against every ORIGINAL g_j it conflicts with."""
    total = torch.zeros_like(grads[0])
    conflicts = torch.zeros((), device=grads.device)
    k = grads.shape[0]
    for i in range(k):
        g = grads[i].clone()
        others = [j for j in range(k) if j != i]
        for idx in torch.randperm(len(others), generator=generator).tolist():
            g, conflict = _project_away(g, grads[others[idx]])
            conflicts = conflicts + conflict.float()
        total = total + g
    return total, conflicts


def _pcgrad_anchored(grads: Tensor, is_primary: list[bool], restrict: bool = False) -> tuple[Tensor, Tensor]:
    """Primary gradients kept; each auxiliary loses its component along g_P = sum of primaries if they conflict.
    restrict: the anchor an auxiliary is projected against is g_P on that auxiliary's support only (the
    coordinates where its gradient is non-zero), so the projection never moves parameters it does not train."""
    g_primary = grads[[i for i, p in enumerate(is_primary) if p]].sum(0)
    total = g_primary.clone()
    conflicts = torch.zeros((), device=grads.device)
    for i, primary in enumerate(is_primary):
        if not primary:
            anchor = g_primary * (grads[i] != 0) if restrict else g_primary
            g, conflict = _project_away(grads[i], anchor)
            total = total + g
            conflicts = conflicts + conflict.float()
    return total, conflicts


def _accumulate(flat: Tensor, params: list[Tensor]) -> None:
    offset = 0
    for p in params:
        g = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)
        offset += p.numel()
        if p.grad is None:
            p.grad = g.clone()
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

    terms: the weighted loss terms that sum to the loss. For every term, its gradient w.r.t. `params`
    (flattened to one vector; a param the term does not touch counts as zero) is computed with
    torch.autograd.grad, then:
      "all":      for each term i, for every other j in random order (`shuffle_generator`), if g_i . g_j < 0,
                  g_i -= (g_i . g_j) / |g_j|^2 g_j with the ORIGINAL g_j; the projected g_i are summed.
      "anchored": g_P = sum of the `primary` gradients (unchanged); an auxiliary g_a with g_a . g_P < 0 loses
                  its component along g_P; result g_P + sum of the (projected) auxiliaries.
      "anchored_support": as "anchored", with g_P restricted to g_a's support (coordinates where g_a != 0: the
                  parameters the auxiliary trains, rows of a shared output map included) for the test and the
                  projection of g_a (the CSIRO write-up's repository, pcgrad.py).
    Because it adds to .grad, gradient accumulation works: call once per micro-batch, step once.
    `other_params` (e.g. uncertainty-weighting log-variances, frozen-path extras) get the plain gradient of
    sum(terms), also added to .grad; params in neither list get nothing. The graph is freed afterwards.
    Under DDP the reducer's hooks do not see these gradients: all-reduce `params` grads yourself.
    Returns {"pcgrad/conflicts": number of projections made, "pcgrad/pairs": number of pairs tested}.
    """
    _check_args(terms, params, mode, primary)
    names = list(terms)
    grads = torch.stack([_flat_grads(terms[name], params) for name in names])
    if mode == "all":
        total, conflicts = _pcgrad_all(grads, shuffle_generator)
        pairs = len(names) * (len(names) - 1)
    else:
        is_primary = [name in primary for name in names]
        total, conflicts = _pcgrad_anchored(grads, is_primary, restrict=mode == "anchored_support")
        pairs = len(names) - sum(is_primary)
    _accumulate(total, params)
    loss = sum(terms.values())
    if other_params and isinstance(loss, Tensor) and loss.requires_grad:
        torch.autograd.backward(loss, inputs=list(other_params))
    return {"pcgrad/conflicts": float(conflicts), "pcgrad/pairs": float(pairs)}
