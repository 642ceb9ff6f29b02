"""Pooling heads (same interface as biomass.heads): gated attention-MIL and multi-layer softmax fusion."""
from __future__ import annotations

from typing import Callable, Sequence

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
    component space: image = sum_l softmax(logits)_l * head_l(layer l).

    fused_z: outputs (e.g. [height, state]) read by ONE linear map from the fused bottleneck
    z = sum_l softmax(logits)_l z_l instead of each layer's own rows (the CSIRO repository's auxiliary heads;
    the head needs a bottleneck: `z(out)`). Each layer's row holds that shared map applied to its own z_l, so the
    weighted sum the model takes is the map of the fused z (the weights sum to 1). The model names the output
    columns through set_columns."""

    def __init__(self, embed_dim: int, num_layers: int, out_dim: int, head: Callable[..., nn.Module],
                 fused_z: Sequence[str] = ()):
        super().__init__()
        self.heads = nn.ModuleList(head(embed_dim=embed_dim, num_layers=1, out_dim=out_dim)
                                   for _ in range(num_layers))
        self.logits = nn.Parameter(torch.zeros(num_layers))
        self.fused_z = list(fused_z)
        self.shared = None
        if self.fused_z:
            if not hasattr(self.heads[0], "z"):
                raise ValueError(f"head.fused_z={self.fused_z} needs a head with a bottleneck z "
                                 f"(e.g. biomass.heads_vitdet.ViTDetScalarHead), not {type(self.heads[0]).__name__}")
            self.shared = nn.Linear(self.heads[0].out.in_features, out_dim)
        self.register_buffer("shared_mask", torch.zeros(out_dim, dtype=torch.bool), persistent=False)

    def set_columns(self, columns: dict[str, tuple[int, int]]) -> None:
        """columns: output name -> [start, stop) in the raw outputs; the fused_z names present become shared."""
        for name in self.fused_z:
            if name in columns:
                self.shared_mask[columns[name][0]:columns[name][1]] = True

    def _layer(self, i: int, out: BackboneOutput) -> tuple[Tensor, Tensor]:
        head = self.heads[i]
        one = BackboneOutput(tokens=[out.tokens[i]], grid=out.grid, cls=out.cls, registers=out.registers)
        if self.shared is None:
            return head(one)
        z = head.z(one)
        raw = torch.where(self.shared_mask, self.shared(z), head.out(z)).unsqueeze(1)
        return raw, raw.new_ones(raw.shape[:2])

    def forward(self, out: BackboneOutput) -> tuple[Tensor, Tensor]:
        mix = torch.softmax(self.logits, dim=0)
        raws, weights = [], []
        for i in range(len(self.heads)):
            raw, w = self._layer(i, out)
            raws.append(raw)
            weights.append(w * mix[i].to(w.dtype))
        return torch.cat(raws, dim=1), torch.cat(weights, dim=1)
