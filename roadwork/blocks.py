"""Gated attention ("Gated Attention for Large Language Models", Qiu et al. 2025) and its block.

The gate is elementwise and query-dependent: G = sigmoid(X W_g + b_g) from the block's normalised
input X, multiplied onto the scaled-dot-product attention output of every head (before the heads are
merged by the output projection). Attention itself is torch's scaled_dot_product_attention.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GatedAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, gate: bool = True, qkv_bias: bool = True, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.gate = nn.Linear(dim, dim) if gate else None
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: Tensor, key_mask: Optional[Tensor] = None) -> Tensor:
        """x (B, N, D) normalised input; key_mask (B, N) bool, True = may be attended to."""
        batch, tokens, dim = x.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        q, k, v = self.qkv(x).view(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        out = out.transpose(1, 2)                                    # (B, N, heads, head_dim)
        if self.gate is not None:
            out = out * torch.sigmoid(self.gate(x)).view(batch, tokens, heads, head_dim)
        return self.proj(out.reshape(batch, tokens, dim))


class Mlp(nn.Sequential):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))


NORMS = ("pre", "post", "post_attn")


class GatedBlock(nn.Module):
    """Transformer block with gated attention. norm="pre": x + GatedAttention(LN(x)), then x + MLP(LN(x)).
    norm="post": LN(x + GatedAttention(x)), then LN(x + MLP(x)). norm="post_attn" (the plan's layer, its steps
    1-6: the gate sees the original input, residual, LayerNorm; no feed-forward block): LN(x + GatedAttention(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float, gate: bool = True,
                 norm: str = "pre"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"model.block_norm={norm!r}: expected one of {NORMS}")
        self.post_norm = norm in ("post", "post_attn")
        self.norm1 = nn.LayerNorm(dim)
        self.attn = GatedAttention(dim, num_heads, gate=gate, dropout=dropout)
        self.feed_forward = norm != "post_attn"
        self.norm2 = nn.LayerNorm(dim) if self.feed_forward else None
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout) if self.feed_forward else None
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, key_mask: Optional[Tensor] = None) -> Tensor:
        if self.post_norm:
            x = self.norm1(x + self.drop(self.attn(x, key_mask)))
            return self.norm2(x + self.drop(self.mlp(x))) if self.feed_forward else x
        x = x + self.drop(self.attn(self.norm1(x), key_mask))
        return x + self.drop(self.mlp(self.norm2(x)))


class ChannelPyramid(nn.Module):
    """Three channel levels (D, D/2, D/4), each a residual MLP with LayerNorm, merged back to D."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        widths = [dim, dim // 2, dim // 4]
        self.down = nn.ModuleList([nn.Identity()] + [nn.Linear(a, b) for a, b in zip(widths, widths[1:])])
        self.mlps = nn.ModuleList([Mlp(w, 2 * w, dropout) for w in widths])
        self.norms = nn.ModuleList([nn.LayerNorm(w) for w in widths])
        self.merge = nn.Linear(sum(widths), dim)
        self.out_norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        levels, h = [], x
        for down, mlp, norm in zip(self.down, self.mlps, self.norms):
            h = down(h)
            h = norm(h + mlp(h))
            levels.append(h)
        return self.out_norm(x + self.merge(torch.cat(levels, dim=-1)))
