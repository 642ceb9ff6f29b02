"""A tiny, randomly initialised CLIP (text and vision towers + a character-level tokenizer) saved as a
local Hugging Face folder: the stand-in the synthetic dataset ships so that the default run and the tests
exercise CLIP text grounding offline (`model.grounding.clip_path` pointing at the folder)."""
from __future__ import annotations

import string
from pathlib import Path

import torch

SPECIAL = ("<|startoftext|>", "<|endoftext|>")


def write_tiny_clip(folder: Path, seed: int, width: int = 32, projection_dim: int = 32) -> Path:
    """Write the model and tokenizer into `folder` (created). The synthetic dataset that holds it is itself
    written to a temporary folder and renamed when complete."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    chars = string.ascii_lowercase + string.digits + string.punctuation   # CLIP lower-cases its input
    tokens = list(chars) + [c + "</w>" for c in chars] + list(SPECIAL)
    vocab = {token: i for i, token in enumerate(tokens)}
    bos, eos = vocab[SPECIAL[0]], vocab[SPECIAL[1]]
    text = dict(vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos,
                pad_token_id=eos)
    vision = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1, num_attention_heads=2,
                  image_size=32, patch_size=16)
    with torch.random.fork_rng(devices=[]):      # leaves the run's global generator as it was
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)).eval()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(folder)     # no merges: one token per character
    return folder
