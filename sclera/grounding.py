"""Text grounding of patch tokens (CGDSeg): CLIP's projected text embedding (`text_embeds`, what
`get_text_features` / `encode_text` return) of a few prompts, L2-normalised and averaged, computed once
and kept as a buffer, projected to the token width and attended to by the patch tokens."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def missing_clip_error(model_path: str, reason: BaseException) -> OSError:
    return OSError(
        f"model.grounding.kind=clip: could not load the CLIP model {model_path!r} (model.grounding.clip_path): "
        f"{type(reason).__name__}: {str(reason).splitlines()[0] if str(reason) else ''}. Without the hub, either "
        f"save it once where the hub is reachable (CLIPModel.from_pretrained({model_path!r}).save_pretrained(<folder>) "
        f"and the same for CLIPTokenizer) and pass model.grounding.clip_path=<folder>, or save the prompts' text "
        f"embeddings (torch.save of a (T, D) tensor of CLIP text_embeds) and pass model.grounding.kind=file "
        f"model.grounding.file=<file>; model.grounding=none removes the stage (prompts: model.grounding.prompts)")


@torch.no_grad()
def clip_text_embedding(model_path: str, prompts: Sequence[str]) -> Tensor:
    """(len(prompts), D) CLIP text_embeds (text projection of the pooled output); `model_path` is a local
    folder or a hub id of a CLIPModel with its tokenizer."""
    from transformers import CLIPModel, CLIPTokenizer
    if not prompts:
        raise ValueError("model.grounding.prompts is empty: give at least one prompt")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(model_path)
        model = CLIPModel.from_pretrained(model_path).eval()
    except OSError as err:
        raise missing_clip_error(model_path, err) from err
    ids = tokenizer(list(prompts), padding=True, return_tensors="pt")
    pooled = model.text_model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).pooler_output
    return model.text_projection(pooled).float()


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


def resolve_sources(cfg: Optional[Mapping], root: Callable[[], Path]) -> Optional[Mapping]:
    """The grounding config with its source read from the dataset root (`root()`, asked only when needed) when
    relative: kind clip, a `clip_path` naming a folder under the root; kind file, a relative `file`. Anything
    else (a hub id, an absolute path) is kept."""
    if cfg is None or cfg == "none" or cfg["kind"] == "none":
        return cfg
    out = dict(cfg)
    if cfg["kind"] == "clip" and cfg["clip_path"] and not Path(cfg["clip_path"]).is_absolute():
        folder = root() / cfg["clip_path"]
        out["clip_path"] = str(folder) if folder.is_dir() else cfg["clip_path"]
    if cfg["kind"] == "file" and cfg["file"] and not Path(cfg["file"]).is_absolute():
        out["file"] = str(root() / cfg["file"])
    return out


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
