"""LoRA / DoRA adapters (through peft) on the projections of the last N blocks of a Backbone.

Targets are named the same for every family (qkv, proj, fc1, fc2; mlp = fc1 + fc2); each registered family
(common.models.backbone_families) maps them to its module names and says where its blocks are, e.g.
  qkv  -> timm attn.qkv (fused) | attn.q_proj/k_proj/v_proj | transformers attention.q_proj/k_proj/v_proj
  fc1  -> mlp.fc1 | SwiGLU mlp.fc1_g/fc1_x | transformers mlp.up_proj/gate_proj
Adapter parameter names contain "lora_" (common.training.optim tags them "adapter") and keep their block's name, so the
family's block pattern (Backbone.block_of) gives their depth for layer-wise learning-rate decay.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from common.models.backbone import Backbone, BackboneOutput
from common.models.backbone_families import FAMILIES

TARGETS = ("qkv", "proj", "fc1", "fc2")
TARGET_GROUPS = {"mlp": ("fc1", "fc2")}


def inject_adapters(backbone: Backbone, method: str, r: int, alpha: float, dropout: float,
                    targets: Union[str, Sequence[str]], last_n_blocks: Optional[int]) -> list[str]:
    """Wrap the target linears of the last `last_n_blocks` blocks (None = all) with LoRA or DoRA.

    `backbone.model` stays the same module (adapted in place). Afterwards only adapter parameters
    are trainable. Returns the adapted module names.
    """
    if method not in ("lora", "dora"):
        raise ValueError(f"peft.name={method!r}: expected 'lora' or 'dora' (or 'none' to skip adapters)")
    if int(r) < 1:
        raise ValueError(f"peft.r={r}: expected a rank >= 1")
    names = adapter_target_modules(backbone, targets, last_n_blocks)
    _route_fused_qkv_bias(backbone, names)
    config = LoraConfig(r=int(r), lora_alpha=alpha, lora_dropout=float(dropout), target_modules=names,
                        use_dora=method == "dora", bias="none")
    inject_adapter_in_model(config, backbone.model)
    wrapped = sorted(_adapter_layers(backbone))
    if wrapped != sorted(names):
        raise RuntimeError(f"backbone {backbone.name}: peft wrapped {wrapped[:5]} but {sorted(names)[:5]} "
                           f"were targeted")
    for pname, p in backbone.named_parameters():
        p.requires_grad_("lora_" in pname)
    return names


def adapter_target_modules(backbone: Backbone, targets: Union[str, Sequence[str]],
                           last_n_blocks: Optional[int]) -> list[str]:
    """Full names (inside backbone.model) of the linears that `targets` select in the last N blocks."""
    spec = backbone.spec
    if not spec.adapter_targets:
        raise ValueError(f"backbone {backbone.name}: family {backbone.family!r} names no adapter targets "
                         f"(common/models/backbone_families.py); adapters fit the ViT families "
                         f"{sorted(n for n, f in FAMILIES.items() if f.adapter_targets)}")
    first = _first_adapted_block(backbone, last_n_blocks)
    linears = {}  # name inside block -> full names, for blocks >= first
    for full, module in backbone.model.named_modules():
        match = spec.block_pattern.fullmatch(full)
        if match and isinstance(module, nn.Linear) and int(match.group(1)) >= first:
            linears.setdefault(match.group(2), []).append(full)
    selected = []
    for target in _expand_targets(targets):
        hits = [full for alias in spec.adapter_targets.get(target, ()) for full in linears.get(alias, [])]
        if not hits:
            raise ValueError(f"peft.targets: {target!r} matches no linear module of backbone {backbone.name} "
                             f"({backbone.family}); its blocks hold {sorted(linears)}")
        selected += hits
    return sorted(set(selected))


def _expand_targets(targets: Union[str, Sequence[str]]) -> list[str]:
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets:
        raise ValueError("peft.targets is empty: expected some of qkv, proj, fc1, fc2, mlp")
    expanded = []
    for t in targets:
        if t in TARGET_GROUPS:
            expanded += TARGET_GROUPS[t]
        elif t in TARGETS:
            expanded.append(t)
        else:
            raise ValueError(f"peft.targets: unknown target {t!r}; expected some of "
                             f"{sorted(TARGETS) + sorted(TARGET_GROUPS)}")
    return expanded


def _first_adapted_block(backbone: Backbone, last_n_blocks: Optional[int]) -> int:
    if last_n_blocks is None:
        return 0
    n = int(last_n_blocks)
    if not 1 <= n <= backbone.num_blocks:
        raise ValueError(f"peft.last_n_blocks={last_n_blocks}: expected 1..{backbone.num_blocks} "
                         f"(backbone {backbone.name} has {backbone.num_blocks} blocks) or null for all")
    return backbone.num_blocks - n


def _route_fused_qkv_bias(backbone: Backbone, names: Sequence[str]) -> None:
    """timm Eva attention with q/k/v biases (DINOv3 *_qkvb) calls F.linear(x, qkv.weight, bias) and so
    bypasses a wrapped qkv; qkv_bias_separate=True makes it call qkv(x) + bias (same numbers)."""
    for full in names:
        if not full.endswith("attn.qkv"):
            continue
        attn = backbone.model.get_submodule(full.rsplit(".", 1)[0])
        if getattr(attn, "q_bias", None) is None:
            continue
        if not hasattr(attn, "qkv_bias_separate"):
            raise ValueError(f"backbone {backbone.name}: {full} has a separate q/k/v bias that bypasses "
                             f"an adapter on qkv; use targets proj/fc1/fc2 for this architecture")
        attn.qkv_bias_separate = True


def _adapter_layers(backbone: Backbone) -> dict[str, nn.Module]:
    return {n: m for n, m in backbone.model.named_modules() if isinstance(m, LoraLayer)}


def adapter_state_dict(backbone: Backbone) -> dict[str, Tensor]:
    """Adapter weights only, as peft saves them (`get_peft_model_state_dict`: keys without the adapter name)."""
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(backbone.model).items()}


def load_adapter_state_dict(backbone: Backbone, state: dict[str, Tensor]) -> None:
    """peft's `set_peft_model_state_dict`, after checking that every key and shape fits this backbone's adapters."""
    expected = adapter_state_dict(backbone)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ValueError(f"adapter state for backbone {backbone.name} does not fit (other peft.r / targets / "
                         f"last_n_blocks?): missing {missing[:5]}, unexpected {unexpected[:5]}, shapes {shapes[:5]}")
    set_peft_model_state_dict(backbone.model, state)


PEFT_MODEL_PREFIX = "base_model.model."     # where PeftModel keeps the wrapped model: its saved keys start so


def save_peft_adapter(backbone: Backbone, folder: Path) -> Path:
    """The backbone's adapters in the layout of `PeftModel.save_pretrained` (adapter_config.json +
    adapter_model.safetensors, keys under `base_model.model.`), so that peft users load them with
    `PeftModel.from_pretrained(<the same base model>, folder)`. Written into a temporary folder renamed into place:
    a reader never sees half an adapter."""
    folder = Path(folder)
    tmp = folder.parent / f".{folder.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    backbone.model.peft_config["default"].save_pretrained(str(tmp))
    save_file({PEFT_MODEL_PREFIX + k: v.contiguous() for k, v in adapter_state_dict(backbone).items()},
              str(tmp / "adapter_model.safetensors"))
    old = folder.parent / f".{folder.name}.{os.getpid()}.old"
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def load_peft_adapter(backbone: Backbone, folder: Path) -> None:
    """Weights from a folder written by save_peft_adapter or by peft's save_pretrained (keys with or without the
    PeftModel prefix) into injected adapters."""
    path = Path(folder) / "adapter_model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected a peft adapter folder (adapter_config.json + "
                                f"adapter_model.safetensors)")
    state = {k.removeprefix(PEFT_MODEL_PREFIX): v for k, v in load_file(str(path)).items()}
    load_adapter_state_dict(backbone, state)


def merge_adapters(module: nn.Module) -> int:
    """Fold every LoRA / DoRA adapter under `module` (a Backbone, or a whole model with head adapters of
    common.training.adapt) into its base weight and remove the peft wrappers; returns the number of merged layers.

    For DoRA this computes m * (W + BA) / ||W + BA|| once instead of in every forward pass. The merged
    module has the base architecture's parameter names, so it no longer loads or writes adapter checkpoints.
    """
    layers = {n: m for n, m in module.named_modules() if isinstance(m, LoraLayer)}
    for full, layer in layers.items():
        layer.merge(safe_merge=True)
        parent_name, _, child = full.rpartition(".")
        setattr(module.get_submodule(parent_name), child, layer.get_base_layer())
    for sub in module.modules():
        sub.__dict__.pop("peft_config", None)       # left by peft's inject_adapter_in_model on its root
        sub.__dict__.pop("keep_frozen", None)       # common.training.adapt's pre-merge names no longer exist
    return len(layers)


def check_adapters_active(backbone: Backbone, input_size: Union[int, Sequence[int]]) -> float:
    """Prove that the adapters take part in the forward pass; returns the output change.

    Every adapted module must be called, and perturbing the adapter weights must change the
    output. Raises RuntimeError otherwise. Weights are restored afterwards.
    """
    layers = _adapter_layers(backbone)
    if not layers:
        raise RuntimeError(f"backbone {backbone.name}: no adapters injected (peft.name=none?)")
    height, width = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    gen = torch.Generator().manual_seed(0)
    param = next(p for n, p in backbone.named_parameters() if "lora_" in n)
    x = torch.rand(1, 3, height, width, generator=gen).to(param.device)
    called: set[str] = set()
    hooks = [m.register_forward_hook(lambda *_, n=n: called.add(n)) for n, m in layers.items()]
    was_training = backbone.training
    backbone.eval()
    try:
        # fp32 on purpose: under bf16 autocast a small adapter effect could round away.
        with torch.autocast(device_type=x.device.type, enabled=False):
            change = _output_change_when_perturbed(backbone, x, gen)
    finally:
        for h in hooks:
            h.remove()
        backbone.train(was_training)
    bypassed = sorted(set(layers) - called)
    if bypassed:
        raise RuntimeError(f"backbone {backbone.name}: adapted modules never called in forward: {bypassed[:5]} "
                           f"(an attention that reads the wrapped layer's weight directly bypasses the adapter)")
    # Same input, same process: without an adapter effect the outputs are bit-identical, so any change
    # counts (random-init DINO blocks scale their residual branches by 1e-5).
    if not change > 0:
        raise RuntimeError(f"backbone {backbone.name}: perturbing the adapters does not change the output "
                           f"(change {change:.3g}); are all adapted blocks after the last used layer "
                           f"{backbone.layers[-1]}?")
    return change


@torch.no_grad()
def _output_change_when_perturbed(backbone: Backbone, x: Tensor, gen: torch.Generator) -> float:
    params = [p for n, p in backbone.named_parameters() if "lora_" in n]
    saved = [p.detach().clone() for p in params]
    before = _flat(backbone(x))
    try:
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen).to(p))
        after = _flat(backbone(x))
    finally:
        for p, s in zip(params, saved):
            p.copy_(s)
    return float((after - before).abs().max() / (before.abs().max() + 1e-12))


def _flat(out: BackboneOutput) -> Tensor:
    return torch.cat([t.float().flatten() for t in out.tokens])
