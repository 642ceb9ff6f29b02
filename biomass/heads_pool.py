"""Pooling heads (same interface as biomass.heads): gated attention-MIL and multi-layer softmax fusion."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from biomass.heads import mlp
from common.models.backbone import BackboneOutput, tokens_to_map


class GatedAttentionMIL(nn.Module):
    """Gated attention-MIL pooling (Ilse et al. 2018) over patch tokens or tiles of them.

    Instances: the tokens of one layer, average-pooled over `tile` x `tile` patches when tile > 1.
    a_i = softmax_i(w^T (tanh(V h_i) * sigmoid(U h_i))); the bag embedding sum_i a_i h_i goes through
    an MLP to the raw outputs. The attention weights are kept in `last_attention` for inspection.
    """

    def __init__(self, embed_dim: int, num_layers: int, out_dim: int, attn_dim: int, hidden: int,
                 dropout: float, tile: int = 1, layer: int = -1):
        super().__init__()
        self.tile, self.layer = int(tile), layer
        self.norm = nn.LayerNorm(embed_dim)
        self.attn_v = nn.Linear(embed_dim, attn_dim)
        self.attn_u = nn.Linear(embed_dim, attn_dim)
        self.attn_w = nn.Linear(attn_dim, 1)
        self.net = mlp(embed_dim, hidden, out_dim, dropout)
        self.last_attention: Tensor | None = None

    def instances(self, out: BackboneOutput) -> Tensor:
        tokens = out.tokens[self.layer]
        if self.tile <= 1:
            return tokens
        pooled = F.avg_pool2d(tokens_to_map(tokens, out.grid), self.tile, ceil_mode=True)
        return pooled.flatten(2).transpose(1, 2)

    def forward(self, out: BackboneOutput) -> tuple[Tensor, Tensor]:
        h = self.norm(self.instances(out))
        scores = self.attn_w(torch.tanh(self.attn_v(h)) * torch.sigmoid(self.attn_u(h))).squeeze(-1)
        attention = torch.softmax(scores.float(), dim=1).to(h.dtype)
        self.last_attention = attention.detach()
        bag = (attention.unsqueeze(-1) * h).sum(dim=1)
        raw = self.net(bag).unsqueeze(1)
        return raw, raw.new_ones(raw.shape[:2])


class LayerFusion(nn.Module):
    """One copy of `head` per backbone layer (each sees only its layer), fused with learned softmax
    weights. The fusion acts on instance weights, so the model averages in the parameterisation's
    component space: image = sum_l softmax(logits)_l * head_l(layer l)."""

    def __init__(self, embed_dim: int, num_layers: int, out_dim: int, head: Callable[..., nn.Module]):
        super().__init__()
        self.heads = nn.ModuleList(head(embed_dim=embed_dim, num_layers=1, out_dim=out_dim)
                                   for _ in range(num_layers))
        self.logits = nn.Parameter(torch.zeros(num_layers))

    def forward(self, out: BackboneOutput) -> tuple[Tensor, Tensor]:
        mix = torch.softmax(self.logits, dim=0)
        raws, weights = [], []
        for i, (head, tokens) in enumerate(zip(self.heads, out.tokens)):
            raw, w = head(BackboneOutput(tokens=[tokens], grid=out.grid, cls=out.cls, registers=out.registers))
            raws.append(raw)
            weights.append(w * mix[i].to(w.dtype))
        return torch.cat(raws, dim=1), torch.cat(weights, dim=1)
