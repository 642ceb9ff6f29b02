"""Frozen sentence encoder for free-text metadata (model.text_encoder).

A transformers tokenizer + encoder (a hub name such as sentence-transformers/all-MiniLM-L6-v2, or a local
folder), mean-pooled over the attention mask as sentence-transformers does, optionally L2-normalised.
Frozen: no gradients, always in eval mode, and since its parameters do not require grad the optimiser,
EMA and checkpoints (common.training.checkpoint.trainable_state) leave them out; they are reloaded from
`name_or_path` whenever the model is built. Unknown texts are not its business: MetadataEncoder gives
them a learnable NULL vector. Embeddings of repeated strings are cached (LRU, `cache_size` entries).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.models.backbone import WeightsUnavailableError

CONFIG_KEYS = ("name_or_path", "max_length", "normalize", "cache_size")


def _offline() -> bool:
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _unavailable(name_or_path: str, local: bool, err: Exception) -> WeightsUnavailableError:
    if local:
        return WeightsUnavailableError(
            f"model.text_encoder.name_or_path={name_or_path!r}: the folder holds no loadable transformers model and "
            f"tokenizer (config.json, model.safetensors, tokenizer files; {type(err).__name__}: {err})")
    return WeightsUnavailableError(
        f"model.text_encoder.name_or_path={name_or_path!r} is not a local folder and cannot be had from the Hugging "
        f"Face hub (no network, or HF_HUB_OFFLINE=1 and not in the cache; {type(err).__name__}: {err}). Download "
        f"it where there is network (`hf download {name_or_path} --local-dir DIR`) and set "
        f"model.text_encoder.name_or_path=DIR")


def load_pretrained(name_or_path: str):
    """(tokenizer, model) from a local folder or the hub; one clear error when they cannot be had."""
    from transformers import AutoModel, AutoTokenizer
    path = Path(os.path.expanduser(name_or_path))
    local = path.is_dir()
    source = str(path) if local else name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local or _offline())
        model = AutoModel.from_pretrained(source, local_files_only=local or _offline())
    except (OSError, ValueError) as err:      # transformers: OSError when not found, ValueError for no tokenizer
        raise _unavailable(name_or_path, local, err) from err
    return tokenizer, model


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """(B, T, H) token states, (B, T) attention mask -> (B, H) mean over the real (unpadded) tokens."""
    weights = mask.to(hidden.dtype)[..., None]
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


class SentenceEncoder(nn.Module):
    def __init__(self, name_or_path: str, max_length: int, normalize: bool, cache_size: int):
        super().__init__()
        if max_length < 1 or cache_size < 0:
            raise ValueError(f"model.text_encoder: max_length={max_length} must be >= 1 and "
                             f"cache_size={cache_size} >= 0")
        self.tokenizer, self.model = load_pretrained(name_or_path)
        self.model.requires_grad_(False)
        self.model.eval()
        self.hidden_size = int(self.model.config.hidden_size)
        self.max_length, self.normalize, self.cache_size = max_length, normalize, cache_size
        self.cache: OrderedDict[str, Tensor] = OrderedDict()   # text -> (hidden,) float32, least recent first

    def train(self, mode: bool = True) -> "SentenceEncoder":
        super().train(mode)
        self.model.eval()           # frozen: no dropout, whatever the surrounding model's mode
        return self

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> Tensor:
        """(B, hidden) float32 sentence embeddings, no cache."""
        device = next(self.model.parameters()).device
        ids = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(device)
        pooled = mean_pool(self.model(**ids).last_hidden_state.float(), ids["attention_mask"])
        return F.normalize(pooled, dim=-1) if self.normalize else pooled

    @torch.compiler.disable     # tokenizer and cache are plain Python
    def forward(self, texts: Sequence[str]) -> Tensor:
        fresh = [t for t in dict.fromkeys(texts) if t not in self.cache]
        computed = dict(zip(fresh, self.embed(fresh))) if fresh else {}
        device = next(self.model.parameters()).device
        rows = [(computed[t] if t in computed else self.cache[t]).to(device) for t in texts]  # cache may predate .to()
        for text in dict.fromkeys(texts):
            self._remember(text, computed.get(text))
        return torch.stack(rows)

    def _remember(self, text: str, embedding: Optional[Tensor]) -> None:
        if self.cache_size == 0:
            return
        if embedding is None:
            self.cache.move_to_end(text)
        else:
            self.cache[text] = embedding
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)


def build_sentence_encoder(cfg: Optional[Mapping]) -> Optional[SentenceEncoder]:
    """model.text_encoder (null, or a mapping with exactly CONFIG_KEYS) -> the frozen encoder or None."""
    if cfg is None:
        return None
    keys = set(cfg.keys())
    if keys != set(CONFIG_KEYS):
        raise ValueError(f"model.text_encoder: expected the keys {list(CONFIG_KEYS)} (or null), got {sorted(keys)}")
    return SentenceEncoder(name_or_path=str(cfg["name_or_path"]), max_length=int(cfg["max_length"]),
                           normalize=bool(cfg["normalize"]), cache_size=int(cfg["cache_size"]))
