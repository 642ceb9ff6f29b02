"""Backbone families as registered specs, in the spirit of timm's model registry.

Everything the suite knows about one family of encoders lives in its FamilySpec: which architectures belong to
it, the Backbone geometry it has (patch size, blocks, prefix tokens), how to read its patch tokens, where its
blocks are (for adapters and layer-wise learning-rate decay) and what its adapter targets are called. Adding a
family is one `register_family(FamilySpec(...))` in this file; backbone.py, adapters.py and optim.py read the
registry and name no family.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from torch import Tensor, nn

# tokens(model, images, layers, num_prefix_tokens) -> (patch tokens (B, N, C) per layer, prefix tokens or None)
TokenReader = Callable[[nn.Module, Tensor, Sequence[int], int], "tuple[list[Tensor], Optional[Tensor]]"]


@dataclass(frozen=True)
class FamilySpec:
    name: str
    source: str                 # "timm" | "hf": the builder in common.models.backbone that makes it
    # what identifies an architecture: timm's model module (timm.models.model_entrypoint(arch).__module__),
    # or the transformers config's model_type
    kinds: tuple[str, ...]
    geometry: Callable[[nn.Module], dict]      # Backbone keyword arguments read off the built model
    tokens: TokenReader
    # full module or parameter name inside the model -> (block index, rest); ConvNeXt's "blocks" are its stages
    block_pattern: re.Pattern
    # suite target name (qkv, proj, fc1, fc2) -> module names inside a block; empty: no adapters on this family
    adapter_targets: dict[str, tuple[str, ...]] = field(default_factory=dict)
    create_kwargs: dict = field(default_factory=dict)   # defaults for timm.create_model (config keys win)
    # transformers only: () -> (config class, model class), imported when used
    hf_classes: Optional[Callable[[], tuple[type, type]]] = None

    def block_of(self, name: str) -> Optional[int]:
        """Block index of a module or parameter name inside the model, or None outside the blocks."""
        match = self.block_pattern.match(name)
        return int(match.group(1)) if match else None


FAMILIES: dict[str, FamilySpec] = {}


def register_family(spec: FamilySpec) -> FamilySpec:
    if spec.name in FAMILIES:
        raise ValueError(f"backbone family {spec.name!r} is registered twice")
    FAMILIES[spec.name] = spec
    return spec


def family_for(source: str, kind: str, name: str) -> FamilySpec:
    """The registered family of a `source` architecture of the given kind (see FamilySpec.kinds)."""
    for spec in FAMILIES.values():
        if spec.source == source and kind in spec.kinds:
            return spec
    known = {s.name: s.kinds for s in FAMILIES.values() if s.source == source}
    raise ValueError(f"backbone {name}: {source} architecture kind {kind!r} belongs to no registered family "
                     f"({known}); expected a DINOv2 ViT, a DINOv3 ViT or a ConvNeXt")


# ---- timm ------------------------------------------------------------------------------------------
def _timm_vit_geometry(model: nn.Module) -> dict:
    num_prefix = int(getattr(model, "num_prefix_tokens", 1))
    return {"patch_size": model.patch_embed.patch_size[0], "embed_dim": model.embed_dim,
            "num_blocks": len(model.blocks), "num_prefix_tokens": num_prefix,
            "num_registers": num_prefix - (1 if getattr(model, "cls_token", None) is not None else 0)}


def _timm_vit_tokens(model, images, layers, num_prefix_tokens):
    outs = model.forward_intermediates(images, indices=list(layers), return_prefix_tokens=True, norm=True,
                                       output_fmt="NLC", intermediates_only=True)
    return [t for t, _ in outs], outs[-1][1]


def _timm_convnext_geometry(model: nn.Module) -> dict:
    """Per stage: `layers` index stages; Backbone keeps the strides and widths of the chosen ones."""
    info = model.feature_info
    return {"num_blocks": len(info), "num_prefix_tokens": 0, "num_registers": 0,
            "stage_strides": [int(s["reduction"]) for s in info], "stage_dims": [int(s["num_chs"]) for s in info]}


def _timm_convnext_tokens(model, images, layers, num_prefix_tokens):
    maps = model.forward_intermediates(images, indices=list(layers), norm=True, output_fmt="NCHW",
                                       intermediates_only=True)
    return [m.flatten(2).transpose(1, 2) for m in maps], None


TIMM_BLOCKS = re.compile(r"blocks\.(\d+)\.(.+)")
VIT_KWARGS = {"dynamic_img_size": True}        # interpolated position embeddings: any multiple of the patch
register_family(FamilySpec(
    name="timm_vit", source="timm", kinds=("timm.models.vision_transformer",), geometry=_timm_vit_geometry,
    tokens=_timm_vit_tokens, block_pattern=TIMM_BLOCKS, create_kwargs=VIT_KWARGS,
    adapter_targets={"qkv": ("attn.qkv",), "proj": ("attn.proj",), "fc1": ("mlp.fc1",), "fc2": ("mlp.fc2",)}))
register_family(FamilySpec(    # DINOv3 in timm: fused or separate q/k/v, SwiGLU MLPs in the large models
    name="timm_eva", source="timm", kinds=("timm.models.eva",), geometry=_timm_vit_geometry,
    tokens=_timm_vit_tokens, block_pattern=TIMM_BLOCKS, create_kwargs=VIT_KWARGS,
    adapter_targets={"qkv": ("attn.qkv", "attn.q_proj", "attn.k_proj", "attn.v_proj"), "proj": ("attn.proj",),
                     "fc1": ("mlp.fc1", "mlp.fc1_g", "mlp.fc1_x"), "fc2": ("mlp.fc2",)}))
register_family(FamilySpec(    # ConvNeXt and ConvNeXt-V2
    name="timm_convnext", source="timm", kinds=("timm.models.convnext",), geometry=_timm_convnext_geometry,
    tokens=_timm_convnext_tokens, block_pattern=re.compile(r"stages\.(\d+)\.(.+)")))


# ---- transformers --------------------------------------------------------------------------------
def _hf_geometry(model: nn.Module) -> dict:
    config = model.config
    num_reg = int(getattr(config, "num_register_tokens", 0) or 0)
    return {"patch_size": int(config.patch_size), "embed_dim": int(config.hidden_size),
            "num_blocks": int(config.num_hidden_layers), "num_prefix_tokens": 1 + num_reg, "num_registers": num_reg}


def _hf_token_reader(norm_attribute: str) -> TokenReader:
    def tokens(model, images, layers, num_prefix_tokens):
        out = model(pixel_values=images, output_hidden_states=True)
        norm = getattr(model, norm_attribute)
        # hidden_states[0] is the embedding output; block i's output is hidden_states[i + 1].
        seqs = [norm(out.hidden_states[i + 1]) for i in layers]
        return [s[:, num_prefix_tokens:] for s in seqs], seqs[-1][:, :num_prefix_tokens]
    return tokens


def _dinov2_classes():
    from transformers import Dinov2Config, Dinov2Model
    return Dinov2Config, Dinov2Model


def _dinov3_classes():
    from transformers import DINOv3ViTConfig, DINOv3ViTModel
    return DINOv3ViTConfig, DINOv3ViTModel


HF_QKV = ("attention.q_proj", "attention.k_proj", "attention.v_proj")
register_family(FamilySpec(    # transformers 5 names, and transformers 4's attention.attention.* / output.dense
    name="hf_dinov2", source="hf", kinds=("dinov2",), geometry=_hf_geometry, tokens=_hf_token_reader("layernorm"),
    block_pattern=re.compile(r"encoder\.layer\.(\d+)\.(.+)"), hf_classes=_dinov2_classes,
    adapter_targets={"qkv": HF_QKV + ("attention.attention.query", "attention.attention.key",
                                      "attention.attention.value"),
                     "proj": ("attention.o_proj", "attention.output.dense"),
                     "fc1": ("mlp.fc1", "mlp.up_proj", "mlp.gate_proj"), "fc2": ("mlp.fc2", "mlp.down_proj")}))
register_family(FamilySpec(
    name="hf_dinov3", source="hf", kinds=("dinov3_vit",), geometry=_hf_geometry, tokens=_hf_token_reader("norm"),
    block_pattern=re.compile(r"model\.layer\.(\d+)\.(.+)"), hf_classes=_dinov3_classes,
    adapter_targets={"qkv": HF_QKV, "proj": ("attention.o_proj",), "fc1": ("mlp.up_proj", "mlp.gate_proj"),
                     "fc2": ("mlp.down_proj",)}))
