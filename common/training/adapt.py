"""Adaptation of a trained model (config section `adapt`): start from a checkpoint, freeze the head, and
train LoRA / DoRA adapters on chosen head modules (plus the backbone adapters of `peft`, if any).

The same structure is rebuilt at inference from the checkpoint's `adapt` section, and the head weights that
the adaptation froze are saved in every checkpoint (`keep_frozen`): they came from the starting checkpoint,
not from the config, so they cannot be rebuilt.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch import nn

from common.training.checkpoint import load_checkpoint, trainable_state

log = logging.getLogger(__name__)


def enabled(cfg: DictConfig) -> bool:
    return bool(OmegaConf.select(cfg, "adapt.modules")) or OmegaConf.select(cfg, "adapt.init_ckpt") is not None


def check_split(cfg: DictConfig) -> None:
    """The adaptation split is named by the user and is never the split that results are reported on."""
    a = cfg.adapt
    if a.init_ckpt is None:
        return
    if a.split is None:
        raise ValueError("adapt.init_ckpt is set but adapt.split is not: name the labelled adaptation split "
                         "(a folder or manifest under data.root) to adapt on")
    for key in ("eval", "predict"):
        if str(a.split) == str(OmegaConf.select(cfg, f"data.{key}")):
            raise ValueError(f"adapt.split={a.split} is also data.{key}, the split results are reported on: adapt "
                             f"on another labelled split, never on the one used for reporting")
    if str(OmegaConf.select(cfg, "data.train")) != str(a.split):
        raise ValueError(f"adapt.split={a.split} but data.train={OmegaConf.select(cfg, 'data.train')}: "
                         f"set data.train=${{adapt.split}} (experiment presets do)")


def load_init_weights(model: nn.Module, path, task_name: str) -> None:
    """The starting checkpoint's trained weights (EMA weights when it has them) into the fresh model.
    Adapter weights the starting model did not have (new `lora_` parameters) stay at their initialisation."""
    ckpt = load_checkpoint(path, task_name)
    state = dict(ckpt["model"])
    if ckpt.get("ema"):
        state.update(ckpt["ema"]["shadow"])
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    missing = sorted(k for k in set(trainable_state(model)) - set(state) if "lora_" not in k)
    if unexpected or missing:
        raise ValueError(f"adapt.init_ckpt={path} does not match the model built from the config: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]} (use the model / backbone config it was "
                         f"trained with; only new adapters may be added)")
    frozen_backbone = [k for k in state if k.startswith("backbone.") and "lora_" not in k
                       and k in dict(model.named_parameters())]
    if frozen_backbone:
        raise ValueError(f"adapt.init_ckpt={path} holds fully fine-tuned backbone weights ({frozen_backbone[0]}, "
                         f"...): adaptation starts from frozen-backbone checkpoints (with or without adapters)")
    model.load_state_dict(state, strict=False)
    log.info(f"[adapt] started from {path} ({len(state)} tensors)")


def head_linears(model: nn.Module, modules, layers) -> list[str]:
    """Full names of the nn.Linear modules under the `modules` prefixes (leaf name in `layers`, if given)."""
    names = []
    for prefix in modules:
        try:
            root = model.get_submodule(str(prefix))
        except AttributeError as err:
            raise ValueError(f"adapt.modules: the model has no submodule {prefix!r}; top-level modules: "
                             f"{[n for n, _ in model.named_children()]}") from err
        found = [f"{prefix}.{n}" for n, m in root.named_modules() if isinstance(m, nn.Linear)
                 and (layers is None or n.rsplit(".", 1)[-1] in set(layers))]
        if not found:
            raise ValueError(f"adapt.modules: {prefix!r} holds no linear layer named {list(layers or [])}")
        names += found
    return names


def apply_head_adapters(model: nn.Module, a: DictConfig) -> None:
    """Freeze the head (except `train_modules`), inject adapters into the linears of `modules`."""
    if not a.modules:
        return
    if a.method not in ("lora", "dora"):
        raise ValueError(f"adapt.method={a.method!r}: expected lora or dora")
    from peft import LoraConfig, inject_adapter_in_model  # peft (and transformers) only when adapting
    targets = head_linears(model, a.modules, a.layers)
    backbone_grad = {n: p.requires_grad for n, p in model.named_parameters() if n.startswith("backbone.")}
    # A regex is matched against full names; a list would also match the backbone's "...blocks.0.attn.qkv".
    config = LoraConfig(r=int(a.r), lora_alpha=float(a.alpha), lora_dropout=float(a.dropout),
                        target_modules="|".join(re.escape(t) for t in targets), use_dora=a.method == "dora",
                        bias="none")
    inject_adapter_in_model(config, model)
    train_prefixes = tuple(f"{m}." for m in a.train_modules)
    model.keep_frozen = set()
    for name, param in model.named_parameters():
        if name.startswith("backbone."):
            param.requires_grad_(backbone_grad[name])     # the backbone keeps what `backbone` / `peft` set
            continue
        param.requires_grad_("lora_" in name or name.startswith(train_prefixes))
        if not param.requires_grad:
            model.keep_frozen.add(name)
    log.info(f"[adapt] {a.method} adapters (r={a.r}) on {len(targets)} head linears under {list(a.modules)}; "
             f"trained in full: {list(a.train_modules)}")


def build_for_training(model: nn.Module, cfg: DictConfig, task_name: str) -> nn.Module:
    if cfg.adapt.init_ckpt is not None:
        check_split(cfg)
        load_init_weights(model, Path(str(cfg.adapt.init_ckpt)), task_name)
    apply_head_adapters(model, cfg.adapt)
    return model
