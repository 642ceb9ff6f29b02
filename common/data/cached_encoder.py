"""The encoder behind a FeatureCache (common.data.feature_cache): a frozen backbone that runs on misses only.

The encoder (`encoder_for`) builds no backbone while the cache serves: the backbone's description (patch size,
widths, layers...) that heads read at construction is stored as `backbone.json` beside the tokens by the first
run that builds it; later runs build the backbone only at their first miss. The backbone is not a registered
submodule, so checkpoints hold the same (trainable) weights whether or not it was ever built.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from common.data.feature_cache import SPEC_FIELDS, FeatureCache, backbone_spec, split_output, stack_outputs
from common.models.backbone import Backbone, BackboneOutput
from common.models.encoder import build_encoder


def check_cacheable(backbone: nn.Module) -> None:
    trainable = [n for n, p in backbone.named_parameters() if p.requires_grad]
    adapters = [n for n, m in backbone.named_modules() if type(m).__module__.startswith("peft.")]
    if trainable or adapters:
        found = (trainable or adapters)[:3]
        raise ValueError(f"feature cache needs a frozen backbone without adapters (found {found}); "
                         f"set data.cache_features=false, or backbone.freeze=true with peft=none")


class CachedEncoder(nn.Module):
    """A frozen backbone behind a FeatureCache: forward(images, keys) runs the backbone on misses only.

    `backbone`: a built Backbone, or a function that builds it. With a function, the backbone is built on the
    first miss when the cache holds its description (backbone.json), else at once (and the description written).
    The backbone is kept outside the module tree: `state_dict`, `parameters` and `.to` never see it; it runs on
    the device of the images it is given."""

    def __init__(self, backbone: Backbone | Callable[[], Backbone], cache: FeatureCache):
        super().__init__()
        self.cache = cache
        self.hits = 0
        self.misses = 0
        self.backbone_calls = 0
        self.__dict__["_built"] = None
        self.__dict__["_build"] = backbone if callable(backbone) and not isinstance(backbone, nn.Module) else None
        if self._build is None:
            self._set_built(backbone)
            self.spec = backbone_spec(backbone)
        else:
            self.spec = cache.read_spec()
            if self.spec is None:             # a first run: the backbone is needed for its misses anyway
                self.spec = backbone_spec(self.backbone)
        strides = self.spec["layer_strides"]
        if len(set(strides)) > 1:
            raise ValueError(f"feature cache: backbone {self.spec['name']} returns layers on different grids "
                             f"(strides {strides}); the cache stores one grid per item: "
                             f"set data.cache_features=false or pick layers of one stage")

    def _set_built(self, backbone: Backbone) -> None:
        check_cacheable(backbone)
        self.__dict__["_built"] = backbone
        if not self.cache.spec_path.exists():
            self.cache.write_spec(backbone)

    @property
    def built(self) -> bool:
        return self._built is not None

    @property
    def backbone(self) -> Backbone:
        """The backbone, built now if it was not yet."""
        if self._built is None:
            self._set_built(self._build())
        return self._built

    def __getattr__(self, name: str) -> Any:
        # Heads read patch_size, embed_dim, layers... from `model.backbone` whether or not it is cached: the
        # description's fields; anything else of the backbone through `.backbone` (which builds it).
        try:
            return super().__getattr__(name)
        except AttributeError:
            spec = self.__dict__.get("spec")
            if spec is not None and name in spec:
                return spec[name]
            raise AttributeError(f"CachedEncoder has no attribute {name!r} (its backbone's description has "
                                 f"{list(SPEC_FIELDS)}; the backbone itself is `.backbone`)") from None

    def check_input_size(self, height: int, width: int) -> None:
        p = self.spec["patch_size"]
        if height % p or width % p:
            raise ValueError(f"backbone {self.spec['name']}: input {height}x{width} (HxW) is not a multiple of the "
                             f"patch size {p}; use height {(height // p) * p} or {(height // p + 1) * p} and width "
                             f"{(width // p) * p} or {(width // p + 1) * p}")

    def forward(self, images: Tensor, keys: Sequence[str]) -> BackboneOutput:
        if len(keys) != images.shape[0]:
            raise ValueError(f"CachedEncoder: {len(keys)} cache keys for a batch of {images.shape[0]} images")
        self.check_input_size(images.shape[-2], images.shape[-1])
        items: list[Optional[BackboneOutput]] = [self.cache.get(k) for k in keys]
        missing = [i for i, item in enumerate(items) if item is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            for i, item in zip(missing, split_output(self._run_backbone(images[missing]))):
                # the stored (rounded) values, so every epoch sees the same tokens
                items[i] = self.cache.put(keys[i], item)
        return stack_outputs(items, images.device)

    def _run_backbone(self, images: Tensor) -> BackboneOutput:
        backbone = self.backbone.to(images.device)
        check_cacheable(backbone)  # adapters could be injected after construction
        self.backbone_calls += 1
        was_training = backbone.training
        backbone.eval()
        try:
            with torch.no_grad():
                return backbone(images)
        finally:
            backbone.train(was_training)


def encode(encoder: nn.Module, images: Tensor | BackboneOutput,
           keys: Optional[Sequence[str]] = None) -> BackboneOutput:
    """What a task model calls with the batch's pixels: cached features (CachedFeatures, read by the dataset) as
    they are, the cached path when the encoder is cached, the plain backbone otherwise."""
    if isinstance(images, BackboneOutput):
        if not isinstance(encoder, CachedEncoder) or images.source != str(encoder.cache.dir):
            where = str(encoder.cache.dir) if isinstance(encoder, CachedEncoder) else "not cached"
            raise ValueError(f"the batch carries cached backbone features of {images.source}, but the model's "
                             f"backbone is {where}: build the model and its datasets from one config")
        encoder.hits += images.tokens[0].shape[0]
        return images
    if isinstance(encoder, CachedEncoder):
        if keys is None:
            raise ValueError("the encoder is cached (data.cache_features=true) but the batch has no 'cache_key'; "
                             "the dataset must add cache_key = common.data.feature_cache.image_key(image_path, view)")
        return encoder(images, keys)
    return encoder(images)


def build_cached_encoder(backbone: Backbone | Callable[[], Backbone], backbone_cfg: dict, input_size: Sequence[int],
                         root: str | os.PathLike, dtype: str = "float16",
                         preprocess: Optional[dict] = None) -> CachedEncoder:
    return CachedEncoder(backbone, FeatureCache.for_backbone(root, backbone_cfg, input_size, dtype, preprocess))


def feature_cache_of(cfg, input_size: Sequence[int], preprocess: Optional[dict] = None) -> Optional[FeatureCache]:
    """The run's feature cache (`<paths.cache_dir>/features`, `data.cache_dtype`, keyed by `backbone`, the input
    size and `preprocess`), or None without `data.cache_features`. The datasets read it, the encoder writes it."""
    if not cfg.data.cache_features:
        return None
    from omegaconf import OmegaConf
    return FeatureCache.for_backbone(Path(cfg.paths.cache_dir) / "features",
                                     OmegaConf.to_container(cfg.backbone, resolve=True), input_size,
                                     dtype=str(cfg.data.cache_dtype), preprocess=preprocess)


def encoder_for(cfg, input_size: Sequence[int], preprocess: Optional[dict] = None) -> nn.Module:
    """The task's encoder: the backbone of `cfg` with its adapters (common.models.encoder.build_encoder), or, with
    `data.cache_features`, a CachedEncoder that builds it only when the cache cannot serve (module docstring)."""
    cache = feature_cache_of(cfg, input_size, preprocess)
    if cache is None:
        return build_encoder(cfg)
    if cfg.peft.name != "none" or not cfg.backbone.freeze:
        raise ValueError(f"feature cache needs a frozen backbone without adapters (peft={cfg.peft.name}, "
                         f"backbone.freeze={cfg.backbone.freeze}); set data.cache_features=false, or "
                         f"backbone.freeze=true with peft=none")
    return CachedEncoder(functools.partial(build_encoder, cfg), cache)
