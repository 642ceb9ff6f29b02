"""Metadata encoder and its fusion into the backbone tokens, for datasets whose test table carries metadata
(the CSIRO test table does not).

MetadataEncoder: State / Species embeddings (vocabularies of the training split, index 0 = unknown)
and standardised NDVI / height with a missing indicator -> one vector (B, dim).
MetadataFusion: "film" scales and shifts every layer's tokens, tokens * (1 + gamma) + beta; "xattn"
lets a metadata query attend to the patch tokens and adds the projected answer to every token.
Both start as the identity (zero-initialised output projections). "xattn_pool" (the failure diagnosis, 5.2):
the answer REPLACES the tokens: per layer one token, softmax(q K^T / sqrt(d)) V with the metadata query q and the
layer's (normalised) tokens as keys and values, on a 1 x 1 grid, so a head's global pooling reads the
metadata-weighted sum of the visual tokens instead of their mean (use it with pooling heads: pooled, density,
mil, fusion).
field_dropout: in training, each field of each image is hidden (unknown category / missing number) with this
probability, so the model also predicts without metadata (e.g. a test table that lacks it, as CSIRO's).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from common.models.backbone import BackboneOutput

# column in the tables -> (batch key, kind)
FIELDS = {"State": ("state", "cat"), "Species": ("species", "cat"),
          "Pre_GSHH_NDVI": ("ndvi", "num"), "Height_Ave_cm": ("height", "num")}
VOCAB_KEYS = {"state": "states", "species": "species"}
MODES = ("none", "film", "xattn", "xattn_pool")


def check_fields(fields: Sequence[str]) -> list[str]:
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown or not fields:
        raise ValueError(f"model.metadata.fields {list(fields)}: expected a non-empty subset of {sorted(FIELDS)}")
    return list(fields)


class MetadataEncoder(nn.Module):
    def __init__(self, stats: dict, fields: Sequence[str], dim: int, field_dropout: float):
        super().__init__()
        if not 0.0 <= field_dropout < 1.0:
            raise ValueError(f"model.metadata.field_dropout={field_dropout}: expected a probability in [0, 1)")
        self.fields = check_fields(fields)
        self.field_dropout = float(field_dropout)
        self.stats = {k: stats[k] for k in ("states", "species", "ndvi_mean", "ndvi_std", "height_mean", "height_std")}
        self.embed = nn.ModuleDict()
        n_num = 0
        for field in self.fields:
            key, kind = FIELDS[field]
            if kind == "cat":
                self.embed[key] = nn.Embedding(len(stats[VOCAB_KEYS[key]]) + 1, dim)
            else:
                n_num += 1
        self.numeric = nn.Linear(2 * n_num, dim) if n_num else None
        self.out = nn.Sequential(nn.GELU(), nn.Linear(dim, dim))

    def _kept(self, batch_size: int, device) -> Tensor:
        """Per image, 1 where the field is shown, 0 where training-time field dropout hides it."""
        if not self.training or self.field_dropout == 0:
            return torch.ones(batch_size, device=device)
        return (torch.rand(batch_size, device=device) >= self.field_dropout).float()

    def forward(self, batch: dict) -> Tensor:
        parts, numeric = [], []
        device = self.out[1].weight.device
        for field in self.fields:
            key, kind = FIELDS[field]
            if kind == "cat":
                index = {s: i + 1 for i, s in enumerate(self.stats[VOCAB_KEYS[key]])}
                ids = torch.tensor([index.get(s, 0) for s in batch[key]], device=device)
                parts.append(self.embed[key](ids * self._kept(len(ids), device).long()))
            else:
                mask = batch[f"{key}_mask"].float() * self._kept(batch[f"{key}_mask"].shape[0], device)
                value = (torch.nan_to_num(batch[key].float()) - self.stats[f"{key}_mean"]) / self.stats[f"{key}_std"]
                numeric += [value * mask, mask]
        if numeric:
            parts.append(self.numeric(torch.stack(numeric, dim=-1)))
        return self.out(torch.stack(parts, dim=0).sum(dim=0))


class MetadataFusion(nn.Module):
    def __init__(self, stats: dict, mode: str, fields: Sequence[str], dim: int, heads: int,
                 embed_dim: int, num_layers: int, field_dropout: float):
        super().__init__()
        if mode not in MODES[1:]:
            raise ValueError(f"model.metadata.mode={mode!r}: expected one of {MODES}")
        self.mode = mode
        self.encoder = MetadataEncoder(stats, fields, dim, field_dropout)
        width = 2 * embed_dim if mode == "film" else embed_dim
        self.project = nn.ModuleList(nn.Linear(dim if mode == "film" else embed_dim, width)
                                     for _ in range(num_layers if mode != "xattn_pool" else 0))
        for p in self.project:
            nn.init.zeros_(p.weight)
            nn.init.zeros_(p.bias)
        if mode.startswith("xattn"):
            self.query = nn.Linear(dim, embed_dim)
            self.attn = nn.MultiheadAttention(embed_dim, heads, batch_first=True)
            self.norm = nn.LayerNorm(embed_dim)

    def forward(self, feats: BackboneOutput, batch: dict) -> BackboneOutput:
        meta = self.encoder(batch)
        if self.mode == "xattn_pool":
            return self.pool(feats, meta)
        tokens = []
        for proj, t in zip(self.project, feats.tokens):
            if self.mode == "film":
                gamma, beta = proj(meta).unsqueeze(1).chunk(2, dim=-1)
                tokens.append(t * (1 + gamma) + beta)
            else:
                kv = self.norm(t)
                answer = self.attn(self.query(meta).unsqueeze(1), kv, kv, need_weights=False)[0]
                tokens.append(t + proj(answer))
        return BackboneOutput(tokens=tokens, grid=feats.grid, cls=feats.cls, registers=feats.registers)

    def pool(self, feats: BackboneOutput, meta: Tensor) -> BackboneOutput:
        """Per layer the metadata query's attention answer over the layer's tokens, as its only token."""
        query = self.query(meta).unsqueeze(1)
        tokens = [self.attn(query, self.norm(t), self.norm(t), need_weights=False)[0] for t in feats.tokens]
        return BackboneOutput(tokens=tokens, grid=(1, 1), cls=None, registers=feats.registers,
                              grids=[(1, 1)] * len(tokens))
