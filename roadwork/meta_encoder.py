"""Metadata encoder: GPS sinusoidal encoding, category embeddings and text fields, each with a NULL entry.

Index 0 of every category is NULL (unknown). During training each field of each sample is replaced by
NULL with probability `dropout`, so the model also works when all metadata is unknown (the benchmark).
A text field is a presence-flag embedding (batch[<field>] 0/1), or, with `text_encoder` configured
(roadwork.text_encoder), Linear(sentence embedding of batch[<field>_text]) where the text is known and a
learnable NULL vector where it is unknown or dropped.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from roadwork.text_encoder import build_sentence_encoder

GPS_ENCODINGS = ("octaves", "logspace")
TEXT_NULLS = ("learned", "zeros")


def gps_features(gps: Tensor, num_frequencies: int, kind: str = "octaves",
                 frequency_range: Sequence[float] = (1.0, 1.0e4)) -> Tensor:
    """(B, 2) degrees -> (B, 4 F) sin / cos features.

    octaves: sin and cos of 2^f * lat and 2^f * lon in radians, f = 0..F-1;
    logspace (the plan): F frequencies log-spaced over `frequency_range` (1 to 10,000), sin and cos of
    lat * f * pi / 90 and lon * f * pi / 180 (F = 32 gives the plan's 128-d vector)."""
    if kind == "octaves":
        scales = 2.0 ** torch.arange(num_frequencies, device=gps.device, dtype=torch.float32)
        angles = (gps.float() * (math.pi / 180.0))[:, :, None] * scales
    elif kind == "logspace":
        low, high = (math.log10(float(f)) for f in frequency_range)
        freqs = torch.logspace(low, high, num_frequencies, device=gps.device, dtype=torch.float64)
        unit = torch.tensor([math.pi / 90.0, math.pi / 180.0], device=gps.device, dtype=torch.float64)
        angles = ((gps.double() * unit)[:, :, None] * freqs).float()
    else:
        raise ValueError(f"model.gps_encoding={kind!r}: expected one of {GPS_ENCODINGS}")
    angles = angles.flatten(1)                                      # (B, 2F)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class MetadataEncoder(nn.Module):
    def __init__(self, vocab_sizes: dict[str, int], text_fields: Sequence[str], use_gps: bool, dim: int,
                 out_dim: Optional[int], gps_frequencies: int, dropout: float, text_encoder: Optional[Mapping] = None,
                 gps_encoding: str = "octaves", gps_frequency_range: Sequence[float] = (1.0, 1.0e4),
                 gps_project: bool = True, text_dim: Optional[int] = None, text_null: str = "learned"):
        """dim: width of each category embedding (and of GPS / text unless set otherwise); out_dim: the
        Linear + GELU + LayerNorm output over the concatenated fields, or None for the concatenation itself
        (the plan's 704 = GPS 128 + 3 x 64 + text 384); gps_project: Linear(4F -> dim) on the sinusoidal GPS
        features, or False for the 4F features themselves (the plan); text_dim: the text projection's width
        (None = dim); text_null: an unknown text's vector with the sentence encoder, "learned" or "zeros" (the
        plan). The sentence encoder is loaded only when data.metadata holds a text field."""
        super().__init__()
        if gps_encoding not in GPS_ENCODINGS:
            raise ValueError(f"model.gps_encoding={gps_encoding!r}: expected one of {GPS_ENCODINGS}")
        self.categories = nn.ModuleDict({f: nn.Embedding(n + 1, dim) for f, n in vocab_sizes.items()})
        self.text_fields = list(text_fields)
        self.text_encoder = build_sentence_encoder(text_encoder) if self.text_fields else None
        text_dim = dim if text_dim is None else int(text_dim)
        if self.text_encoder is None:
            self.texts = nn.ModuleDict({f: nn.Embedding(2, text_dim) for f in text_fields})  # 0 absent, 1 present
        else:
            hidden = self.text_encoder.hidden_size
            self.text_proj = nn.ModuleDict({f: nn.Linear(hidden, text_dim) for f in text_fields})
            if text_null not in TEXT_NULLS:
                raise ValueError(f"model.text_null={text_null!r}: expected one of {TEXT_NULLS}")
            self.text_null = nn.ParameterDict({f: nn.Parameter(torch.zeros(text_dim),
                                                               requires_grad=text_null == "learned")
                                               for f in text_fields})
        gps_dim = dim if gps_project else 4 * gps_frequencies
        self.gps = (nn.Linear(4 * gps_frequencies, dim) if gps_project else nn.Identity()) if use_gps else None
        self.gps_null = nn.Parameter(torch.zeros(gps_dim)) if use_gps else None
        self.gps_frequencies = gps_frequencies
        self.gps_encoding, self.gps_frequency_range = gps_encoding, tuple(gps_frequency_range)
        concat = len(self.categories) * dim + len(self.text_fields) * text_dim + int(use_gps) * gps_dim
        self.out = nn.Identity() if out_dim is None else nn.Sequential(nn.Linear(concat, out_dim), nn.GELU(),
                                                                       nn.LayerNorm(out_dim))
        self.out_dim = concat if out_dim is None else int(out_dim)
        self.dropout = dropout

    def _drop(self, known: Tensor) -> Tensor:
        if not self.training or self.dropout <= 0:
            return known
        return known & (torch.rand(known.shape, device=known.device) >= self.dropout)

    def _text(self, name: str, batch: dict) -> Tensor:
        known = self._drop(batch[name].long() > 0)
        if self.text_encoder is None:
            return self.texts[name](known.long())
        null = self.text_null[name].expand(known.shape[0], -1)
        if not bool(known.any()):
            return null
        if f"{name}_text" not in batch:
            raise KeyError(f"model.text_encoder embeds {name!r}, but the batch has no {name}_text (raw text); "
                           f"batches come from roadwork.data.RoadworkDataset")
        texts = batch[f"{name}_text"]
        rows = known.nonzero().flatten()
        projected = self.text_proj[name](self.text_encoder([texts[i] for i in rows.tolist()]).to(null.device))
        full = projected.new_zeros(known.shape[0], projected.shape[1]).index_copy(0, rows, projected)
        return torch.where(known[:, None], full, null)

    def forward(self, batch: dict) -> Tensor:
        parts = []
        for name, table in self.categories.items():
            index = batch[name].long()
            parts.append(table(torch.where(self._drop(index > 0), index, torch.zeros_like(index))))
        parts += [self._text(name, batch) for name in self.text_fields]
        if self.gps is not None:
            known = self._drop(batch["gps_known"] > 0.5)
            encoded = self.gps(gps_features(batch["gps"], self.gps_frequencies, self.gps_encoding,
                                                    self.gps_frequency_range))
            parts.append(torch.where(known[:, None], encoded, self.gps_null.expand_as(encoded)))
        return self.out(torch.cat(parts, dim=1))
