"""Backbone builder: a frozen (or not) image encoder that returns patch tokens of chosen layers.

Every backbone, whatever its family, answers `forward(images) -> BackboneOutput` with
- tokens:    list of (B, N, C) patch tokens, one per configured layer (CLS / registers removed)
- grid:      (h, w) patch grid of the last configured layer, N = h * w
- cls:       (B, C) class token of the last configured layer, or None
- registers: (B, R, C) register tokens of the last configured layer, or None
- grids:     (h, w) per configured layer (all equal for ViTs; one per stage for ConvNeXt)
so every head works unchanged on DINOv2, DINOv3 and ConvNeXt.

Families are registered specs (common/models/backbone_families.py): "timm_vit" (DINOv2), "timm_eva" (DINOv3),
"hf_dinov2", "hf_dinov3" (transformers), "timm_convnext" (ConvNeXt and ConvNeXt-V2; `layers` are stage
indices, `patch_size` is the reduction of the last configured stage). Nothing here names a family.
"""
from __future__ import annotations

import inspect
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import safetensors.torch
import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from torch import Tensor, nn

from common.models.backbone_families import FAMILIES, FamilySpec, family_for

POS_EMBED_MODES = ("bicubic", "bilinear")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class BackboneOutput:
    tokens: list[Tensor]
    grid: tuple[int, int]
    cls: Optional[Tensor] = None
    registers: Optional[Tensor] = None
    grids: Optional[list[tuple[int, int]]] = None


def tokens_to_map(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """(B, N, C) patch tokens on an (h, w) grid -> a (B, C, h, w) feature map for convolutional heads."""
    b, n, c = tokens.shape
    return tokens.transpose(1, 2).reshape(b, c, grid[0], grid[1])


class Backbone(nn.Module):
    """Wraps one encoder (`self.model`) and exposes the suite's token interface.

    Input: RGB float images in [0, 1], (B, 3, H, W), H and W multiples of `patch_size` (extra channels after RGB
    are passed unnormalised, for a first layer widened to read them).
    """

    def __init__(self, model: nn.Module, family: str, name: str, patch_size: int, embed_dim: int,
                 num_blocks: int, layers: Sequence[int], num_prefix_tokens: int, num_registers: int,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 layer_strides: Optional[Sequence[int]] = None, embed_dims: Optional[Sequence[int]] = None):
        super().__init__()
        # The pretrained normalisation travels with the model: inputs are RGB floats in [0, 1].
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.model = model
        self.family = family              # a registered FamilySpec's name (common.models.backbone_families)
        self.name = name
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_blocks = num_blocks
        self.layers = _resolve_layers(layers, num_blocks, name)
        self.num_prefix_tokens = num_prefix_tokens
        self.num_registers = num_registers
        # Per configured layer: stride w.r.t. the input and channel count (ConvNeXt stages differ).
        self.layer_strides = list(layer_strides or [patch_size] * len(self.layers))
        self.embed_dims = list(embed_dims or [embed_dim] * len(self.layers))

    def check_input_size(self, height: int, width: int) -> None:
        p = self.patch_size
        if height % p or width % p:
            def near(s):
                return f"{(s // p) * p} or {(s // p + 1) * p}"
            raise ValueError(
                f"backbone {self.name}: input {height}x{width} (HxW) is not a multiple of the patch size {p}; "
                f"use height {near(height)} and width {near(width)}")

    def forward(self, images: Tensor) -> BackboneOutput:
        height, width = images.shape[-2], images.shape[-1]
        self.check_input_size(height, width)
        rgb = (images[:, :3] - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        # channels beyond RGB (early fusion: a widened first layer reads them) pass as they are
        images = rgb if images.shape[1] == 3 else torch.cat([rgb, images[:, 3:]], dim=1)
        tokens, prefix = self.spec.tokens(self.model, images, self.layers, self.num_prefix_tokens)
        grids = [(height // s, width // s) for s in self.layer_strides]
        cls = prefix[:, 0] if prefix is not None and self.num_prefix_tokens > self.num_registers else None
        registers = prefix[:, self.num_prefix_tokens - self.num_registers:] if self.num_registers else None
        return BackboneOutput(tokens=tokens, grid=grids[-1], cls=cls, registers=registers, grids=grids)

    @property
    def spec(self) -> FamilySpec:
        return FAMILIES[self.family]

    def block_of(self, name: str) -> Optional[int]:
        """Block (ConvNeXt: stage) index of a module or parameter name inside `self.model`, or None."""
        return self.spec.block_of(name)


def _resolve_layers(layers: Sequence[int], num_blocks: int, name: str) -> list[int]:
    resolved = [int(i) if i >= 0 else num_blocks + int(i) for i in layers]
    if not resolved or any(not 0 <= i < num_blocks for i in resolved) or resolved != sorted(set(resolved)):
        raise ValueError(f"backbone {name}: layers={list(layers)} must be strictly increasing block indices "
                         f"in [-{num_blocks}, {num_blocks - 1}] (the model has {num_blocks} blocks)")
    return resolved


def _freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def create_backbone(source: str, name: str, weights: Optional[str], layers: Sequence[int],
                    freeze: bool = True, init_seed: int = 0, model_kwargs: Optional[dict] = None,
                    lr: Optional[float] = None, hub_name: Optional[str] = None,
                    pos_embed_interpolation: str = "bicubic") -> Backbone:
    """Build a backbone from config fields (see conf/backbone/*.yaml).

    weights: null = random init seeded by `init_seed` (so a checkpoint holding only the trainable
    weights rebuilds exactly the same frozen backbone); "hub" = the official weights of `name`
    (or of `hub_name`, a hub repo id, when set); otherwise a local .safetensors/.pth/.bin file or
    a local Hugging Face folder. `lr` is the backbone learning rate, read by the optimiser only.
    `pos_embed_interpolation` (timm, loaded weights): the F.interpolate mode with which timm resamples the
    checkpoint's position embeddings to the model's grid (model_kwargs.img_size // patch) when they differ
    (timm's default: bicubic, antialiased); inputs of another grid are still resampled per forward by timm.
    """
    del lr  # consumed by the optimiser when freeze=false; a named field so that typos in the config fail
    model_kwargs = dict(model_kwargs or {})
    if pos_embed_interpolation not in POS_EMBED_MODES:
        raise ValueError(f"backbone.pos_embed_interpolation={pos_embed_interpolation!r}: expected one of "
                         f"{POS_EMBED_MODES}")
    if source == "timm":
        backbone = _create_timm(name, weights, layers, init_seed, model_kwargs, hub_name, pos_embed_interpolation)
    elif pos_embed_interpolation != "bicubic":
        raise ValueError(f"backbone.pos_embed_interpolation={pos_embed_interpolation}: only timm backbones take it "
                         f"(backbone.source={source}; transformers resamples bicubic): set it to bicubic or use "
                         f"backbone.source=timm")
    elif source == "hf":
        backbone = _create_hf(name, weights, layers, init_seed, model_kwargs, hub_name)
    else:
        raise ValueError(f"backbone.source={source!r}: expected 'timm' or 'hf'")
    if freeze:
        _freeze(backbone)
    return backbone


# ---------------------------------------------------------------- timm

def _create_timm(name: str, weights: Optional[str], layers: Sequence[int], init_seed: int,
                 model_kwargs: dict, hub_name: Optional[str], pos_embed_interpolation: str) -> Backbone:
    from common.utils.timm_import import timm        # 1-2 s of imports (torchvision, torch._dynamo): only to build
    arch = timm.models.get_arch_name(name)
    if not timm.models.is_model(arch):
        raise ValueError(f"backbone {name}: timm has no architecture {arch!r} (backbone.name)")
    spec = family_for("timm", timm.models.model_entrypoint(arch).__module__, name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        try:
            model = timm.create_model(name, pretrained=False, num_classes=0, **{**spec.create_kwargs, **model_kwargs})
        except TypeError as err:
            raise TypeError(f"backbone {name}: timm.create_model refuses backbone.model_kwargs "
                            f"{sorted(model_kwargs)} ({err}); remove the key with ~backbone.model_kwargs.<key> or "
                            f"pick a backbone that takes it") from err
    if pos_embed_interpolation != "bicubic" and getattr(model, "pos_embed", None) is None:
        raise ValueError(f"backbone.pos_embed_interpolation={pos_embed_interpolation}: backbone {name} has no "
                         f"learned position embeddings to resample; set backbone.pos_embed_interpolation=bicubic")
    if weights is not None:
        path = _timm_weights_file(name, weights, hub_name or model.pretrained_cfg.get("hf_hub_id"))
        _load_checked(model, _read_timm_state_dict(path, model, pos_embed_interpolation), name, path)
    mean = model.pretrained_cfg.get("mean", IMAGENET_MEAN)
    std = model.pretrained_cfg.get("std", IMAGENET_STD)
    return _backbone_of(spec, model, name, layers, mean, std)


def _backbone_of(spec: FamilySpec, model: nn.Module, name: str, layers: Sequence[int], mean, std) -> Backbone:
    geometry = spec.geometry(model)
    strides, dims = geometry.pop("stage_strides", None), geometry.pop("stage_dims", None)
    if strides is not None:        # a pyramid (ConvNeXt): the chosen stages set the strides and widths
        layers = _resolve_layers(layers, geometry["num_blocks"], name)
        strides, dims = [strides[i] for i in layers], [dims[i] for i in layers]
        geometry.update(patch_size=strides[-1], embed_dim=dims[-1], layer_strides=strides, embed_dims=dims)
    return Backbone(model, spec.name, name, layers=layers, mean=mean, std=std, **geometry)


def _timm_weights_file(name: str, weights: str, repo: Optional[str]) -> Path:
    if weights != "hub":
        path = _local_weights(name, weights)
        if path.is_dir():
            found = [path / f for f in ("model.safetensors", "pytorch_model.bin") if (path / f).is_file()]
            if not found:
                raise FileNotFoundError(f"backbone {name}: folder {path} holds no model.safetensors "
                                        f"or pytorch_model.bin")
            path = found[0]
        return path
    if not repo:
        raise ValueError(f"backbone {name}: timm knows no hub weights for this name; set "
                         f"backbone.hub_name=<org/repo> or backbone.weights=/path/to/file")
    last = None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        try:
            return Path(hf_hub_download(repo, filename))
        except EntryNotFoundError as err:  # includes "offline and not cached": try the next file name
            last = err
        except OSError as err:  # network, HTTP, gated or unknown repository
            raise _unavailable(name, repo, "timm", err) from err
    raise _unavailable(name, repo, "timm", last) from last


def _read_timm_state_dict(path: Path, model: nn.Module, pos_embed_interpolation: str = "bicubic") -> dict:
    state = _read_state_dict(path)
    # timm's own converter maps original (Meta) checkpoints to timm names and resamples position embeddings.
    convert = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    takes_mode = convert is not None and "interpolation" in inspect.signature(convert).parameters
    if not takes_mode and pos_embed_interpolation != "bicubic":
        raise ValueError(f"backbone.pos_embed_interpolation={pos_embed_interpolation}: timm resamples no position "
                         f"embeddings of {type(model).__name__} when loading; set it to bicubic")
    if convert is None:
        return state
    return convert(state, model, interpolation=pos_embed_interpolation) if takes_mode else convert(state, model)


def _read_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        return safetensors.torch.load_file(str(path), device="cpu")
    if path.suffix in (".pth", ".pt", ".bin"):
        state = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
        return state
    raise ValueError(f"weights file {path}: expected a .safetensors, .pth, .pt or .bin state dict")


def _load_checked(model: nn.Module, state: dict, name: str, path: Path) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    _raise_if_mismatch(name, path, missing, unexpected, mismatched)
    model.load_state_dict(state, strict=True)


def _raise_if_mismatch(name: str, path, missing, unexpected, mismatched) -> None:
    if not (missing or unexpected or mismatched):
        return
    def few(keys):
        keys = sorted(keys)
        return ", ".join(keys[:5]) + (f" ... ({len(keys)} in all)" if len(keys) > 5 else "") if keys else "none"
    raise ValueError(
        f"backbone {name}: weights {path} do not fit this architecture (another model or other "
        f"model_kwargs?). missing: {few(missing)}; unexpected: {few(unexpected)}; shape mismatch: {few(mismatched)}")


def _local_weights(name: str, weights: str) -> Path:
    path = Path(os.path.expanduser(str(weights)))
    if not path.exists():
        raise FileNotFoundError(f"backbone {name}: weights={weights!r} is neither null, 'hub' nor an existing "
                                f"file (.safetensors/.pth/.bin) or Hugging Face folder")
    return path


def _unavailable(name: str, repo: str, source: str, err: Optional[BaseException]) -> OSError:
    local = "a local HF folder (config.json + model.safetensors) or a state-dict file" if source == "hf" \
        else "a local .safetensors/.pth file"
    return WeightsUnavailableError(
        f"backbone {name}: cannot get weights {repo!r} from the Hugging Face hub (no network, or "
        f"HF_HUB_OFFLINE=1 and not in the cache; {type(err).__name__}: {err}). Download them where there is "
        f"network (`hf download {repo}`) and pass {local}: backbone.weights=/path/to/file")


class WeightsUnavailableError(OSError):
    """Pretrained weights could not be had (offline, no network, gated repository...)."""


# ---------------------------------------------------------------- transformers

def _hf_family(name: str, model_type: Optional[str] = None) -> FamilySpec:
    """The family of a transformers model: its config's model_type, or else the name (a "dinov3..." name is
    model_type dinov3_vit: a kind's first word in the name)."""
    hf = [spec for spec in FAMILIES.values() if spec.source == "hf"]
    if model_type is None:
        model_type = next((kind for spec in hf for kind in spec.kinds if kind.split("_")[0] in name.lower()), None)
    if model_type is None:
        raise ValueError(f"backbone {name}: source=hf needs a name holding one of "
                         f"{sorted(k.split('_')[0] for s in hf for k in s.kinds)} or a local folder with a config")
    return family_for("hf", model_type, name)


def _create_hf(name: str, weights: Optional[str], layers: Sequence[int], init_seed: int,
               model_kwargs: dict, hub_name: Optional[str]) -> Backbone:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        if weights is None:
            config_cls, model_cls = _hf_family(name).hf_classes()
            model, (mean, std) = model_cls(config_cls(**model_kwargs)), (IMAGENET_MEAN, IMAGENET_STD)
        else:
            model, (mean, std) = _load_hf(name, weights, hub_name, model_kwargs)
    config = model.config
    for field in ("pos_embed_shift", "pos_embed_jitter", "pos_embed_rescale"):
        # DINOv3's pretraining RoPE augmentation would make train-mode tokens random (timm has none);
        # off unless model_kwargs asks for it.
        if hasattr(config, field) and field not in model_kwargs:
            setattr(config, field, None)
    return _backbone_of(_hf_family(name, config.model_type), model, name, layers, mean, std)


def _load_hf(name: str, weights: str, hub_name: Optional[str], model_kwargs: dict):
    """from_pretrained for every source, so that transformers' checkpoint key renames always apply."""
    if weights == "hub":
        repo = hub_name or name
        try:
            return _hf_from_pretrained(name, repo, model_kwargs), _hf_norm_stats(repo)
        except OSError as err:
            raise _unavailable(name, repo, "hf", err) from err
    path = _local_weights(name, weights)
    if path.is_dir():
        return _hf_from_pretrained(name, str(path), model_kwargs), _hf_norm_stats(str(path))
    # A bare state-dict file: the architecture comes from `name` and model_kwargs.
    if path.suffix not in (".safetensors", ".pth", ".pt", ".bin"):
        raise ValueError(f"weights file {path}: expected a .safetensors, .pth, .pt or .bin state dict")
    config_cls, _ = _hf_family(name).hf_classes()
    with tempfile.TemporaryDirectory() as folder:
        config_cls(**model_kwargs).save_pretrained(folder)
        target = "model.safetensors" if path.suffix == ".safetensors" else "pytorch_model.bin"
        os.symlink(path.resolve(), os.path.join(folder, target))
        return _hf_from_pretrained(name, folder, {}, shown=str(path)), (IMAGENET_MEAN, IMAGENET_STD)


def _hf_from_pretrained(name: str, src: str, model_kwargs: dict, shown: Optional[str] = None) -> nn.Module:
    from transformers import AutoConfig
    _, model_cls = _hf_family(name, AutoConfig.from_pretrained(src).model_type).hf_classes()
    model, info = model_cls.from_pretrained(src, output_loading_info=True, ignore_mismatched_sizes=True,
                                            **model_kwargs)
    mismatched = [f"{k} {tuple(a)} vs model {tuple(b)}" for k, a, b in info["mismatched_keys"]]
    _raise_if_mismatch(name, shown or src, info["missing_keys"], info["unexpected_keys"], mismatched)
    return model.float()


def _hf_norm_stats(src: str) -> tuple[Sequence[float], Sequence[float]]:
    """Mean/std of the model's image processor; both DINOv2 and DINOv3 use ImageNet's when none is given."""
    import json
    if os.path.isdir(src):
        path = os.path.join(src, "preprocessor_config.json")
        path = path if os.path.isfile(path) else None
    else:
        try:
            path = hf_hub_download(src, "preprocessor_config.json")
        except (EntryNotFoundError, OSError):  # a repository without one (or offline): processor defaults
            path = None
    if path is None:
        return IMAGENET_MEAN, IMAGENET_STD
    with open(path) as f:
        cfg = json.load(f)
    return tuple(cfg.get("image_mean", IMAGENET_MEAN)), tuple(cfg.get("image_std", IMAGENET_STD))
