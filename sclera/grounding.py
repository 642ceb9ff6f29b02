"""Text grounding of patch tokens (CGDSeg): a frozen CLIP text embedding of a few prompts, computed
once and kept as a buffer, projected to the token width and attended to by the patch tokens."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.no_grad()
def clip_text_embedding(model_path: str, prompts: Sequence[str]) -> Tensor:
    """(len(prompts), D) pooled CLIPTextModel outputs; `model_path` is a local folder or a hub name."""
    from transformers import CLIPTextModel, CLIPTokenizer
    if not prompts:
        raise ValueError("model.grounding.prompts is empty: give at least one prompt")
    tokenizer = CLIPTokenizer.from_pretrained(model_path)
    encoder = CLIPTextModel.from_pretrained(model_path).eval()
    ids = tokenizer(list(prompts), padding=True, return_tensors="pt")
    return encoder(**ids).pooler_output.float()


def file_text_embedding(path: str) -> Tensor:
    """A saved tensor (D,) or (T, D) of text embeddings (torch.save)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"model.grounding.file={path}: no such text-embedding file (a torch.save'd (T, D) tensor)")
    emb = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(emb, Tensor) or emb.ndim not in (1, 2) or not emb.is_floating_point():
        raise ValueError(f"{path}: expected a float tensor of shape (D,) or (T, D), got "
                         f"{type(emb).__name__} {getattr(emb, 'shape', '')}")
    return emb.float().reshape(-1, emb.shape[-1])


def prompt_embedding(kind: str, prompts: Sequence[str], clip_path: Optional[str], file: Optional[str],
                     average: bool) -> Tensor:
    """(T, D) L2-normalised text embeddings; averaged (then T = 1) when `average`."""
    if kind == "clip":
        emb = clip_text_embedding(clip_path, prompts)
    elif kind == "file":
        emb = file_text_embedding(file)
    else:
        raise ValueError(f"model.grounding.kind={kind!r}: expected 'clip', 'file' or 'none'")
    emb = F.normalize(emb, dim=-1)
    return emb.mean(0, keepdim=True) if average else emb


class TextGrounding(nn.Module):
    """tokens <- LayerNorm(tokens + CrossAttention(q = tokens, k = v = proj(text)))."""

    def __init__(self, dim: int, text: Tensor, heads: int, dropout: float):
        super().__init__()
        self.register_buffer("text", text.detach().clone(), persistent=False)
        self.proj = nn.Linear(text.shape[-1], dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: Tensor) -> Tensor:
        text = self.proj(self.text.to(tokens.dtype)).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        attended, _ = self.attn(tokens, text, text, need_weights=False)
        return self.norm(tokens + attended)


def build_grounding(cfg: Optional[Mapping], dim: int) -> Optional[TextGrounding]:
    """None for `grounding: none` (or null, or kind none); otherwise the stage of `cfg`."""
    if cfg is None or cfg == "none" or cfg["kind"] == "none":
        return None
    text = prompt_embedding(cfg["kind"], list(cfg["prompts"]), cfg["clip_path"], cfg["file"], bool(cfg["average"]))
    return TextGrounding(dim, text, heads=int(cfg["heads"]), dropout=float(cfg["dropout"]))
