"""Combining views: learned view pruning and gated view fusion."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from roadwork.blocks import GatedBlock


class GatedViewFusion(nn.Module):
    """Per-view sigmoid gates, cross-view gated attention, an optional refinement attention, and pooling
    weighted by the gates normalised by their sum over the (valid) views."""

    def __init__(self, dim: int, num_heads: int, cross_layers: int, refine: bool, mlp_ratio: float,
                 dropout: float, eps: float = 1e-6):
        super().__init__()
        self.gate = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, max(dim // 4, 1)), nn.GELU(),
                                  nn.Linear(max(dim // 4, 1), 1))
        self.cross = nn.ModuleList([GatedBlock(dim, num_heads, mlp_ratio, dropout) for _ in range(cross_layers)])
        self.refine = GatedBlock(dim, num_heads, mlp_ratio, dropout) if refine else None
        self.norm = nn.LayerNorm(dim)
        self.eps = eps

    def forward(self, views: Tensor, view_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """views (B, V, D), view_mask (B, V) bool -> pooled (B, D), per-view features, gates (B, V)."""
        gates = torch.sigmoid(self.gate(views)).squeeze(-1) * view_mask
        for block in self.cross:
            views = block(views, view_mask)
        if self.refine is not None:
            views = self.refine(views, view_mask)
        views = self.norm(views)
        pooled = (gates[..., None] * views).sum(1) / gates.sum(1, keepdim=True).clamp_min(self.eps)
        return pooled, views, gates


class ViewScorer(nn.Module):
    """Importance of each view and the top-k selection.

    The kept views are multiplied by sigmoid(score), so gradients reach the scorer although the top-k
    choice itself is discrete.
    """

    def __init__(self, dim: int, num_outputs: int | None):
        super().__init__()
        # num_outputs None: one score per view from that view's features (after the backbone);
        # an int: all scores at once from one (global) feature vector (before the backbone).
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 1 if num_outputs is None else num_outputs))

    def scores(self, features: Tensor) -> Tensor:
        out = self.head(features)
        return out.squeeze(-1) if out.shape[-1] == 1 and features.dim() == 3 else out

    @staticmethod
    def top_k(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """(indices (B, k) sorted by position, gate values sigmoid(score) at those indices)."""
        index = scores.topk(k, dim=1).indices.sort(dim=1).values
        return index, torch.sigmoid(scores.gather(1, index))


def gather_views(x: Tensor, index: Tensor) -> Tensor:
    """x (B, V, ...) -> (B, k, ...) at index (B, k)."""
    shape = index.shape + (1,) * (x.dim() - 2)
    return x.gather(1, index.view(shape).expand(*index.shape, *x.shape[2:]))
