"""On-disk cache of a frozen backbone's patch tokens, so head-only runs and sweeps skip the backbone.

Layout: `<root>/<identity>/<dtype>/<key[:2]>/<key>.safetensors`, one file per (image, view) (tensors
`tokens.<i>`, `grid`, `cls`, `registers`; safetensors: read in a sixth of torch.load's time, no pickle), plus
`identity.json`
(the fields that made the identity, for people). The identity (`backbone_identity`) hashes the backbone
config (source, name, model_kwargs, layers, weights identity, init_seed for random weights, every other
field except `lr` and `freeze`, so a new field misses by default), the input size (H, W), optional task
preprocessing fields and the timm version; the storage dtype is a subdirectory. The key (`item_key`) hashes
the image file's content digest and the view id, so any change of backbone, weights, layers, input size,
view or pixels misses.

Rules for a task that caches (`data.cache_features: true`):
- the view id must name the whole deterministic preprocessing of the view (crop, tile, flip...);
  no random pixel augmentation may run, since the cache would freeze one draw of it;
- each item carries `cache_key = image_key(image_path, view)` (a list of keys for an item of several views);
- the dataset puts `pixels_or_features(cache, keys, pixels)` where its pixels go: on a hit of every key the
  stored tokens (`CachedItem`), read in the DataLoader worker, and no image is decoded; on a miss the pixels.
  `collate_pixels` (common.data.datasets.default_collate calls it) stacks a batch of hits into one
  `CachedFeatures`; a batch that mixes hits and misses gets the pixels of all its items;
- the model calls `encode(self.backbone, batch[<pixels>], batch.get("cache_key"))`: cached features pass
  through, pixels go through the cache (read, or the backbone on a miss, then written).

The encoder that fills and serves this cache (`encoder_for`, CachedEncoder, `encode`) is
common.data.cached_encoder.

Storage dtype: float16 (default, half the disk), bfloat16, or float32. With float32 the cached tokens are
bitwise the backbone's, so metrics equal an uncached run exactly; float16 rounds the tokens (~1e-3 relative).
Misses are computed in eval mode without gradients, and the returned tokens are always the stored values
(cast back to float32), so the first epoch sees exactly what later epochs read from disk.

Writes are atomic (temp file in the same directory, then os.replace): concurrent writers of one key both
succeed and readers never see a partial file. A file that cannot be read back (truncated by a copy, tampered,
wrong structure) is treated as a miss with a warning naming it, counted in `FeatureCache.corrupt`, and
rewritten by the next `put`.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import warnings
from pathlib import Path
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from common.models.backbone import Backbone, BackboneOutput
from common.utils.atomic import atomic_path

FORMAT_VERSION = 2         # 2: safetensors files (1: torch.save pickles); part of the identity
STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Backbone config fields that never change the features of a frozen backbone.
_NON_IDENTITY_FIELDS = ("lr", "freeze")
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")
_LOAD_ERRORS = (RuntimeError, EOFError, ValueError, KeyError, TypeError, AttributeError, IndexError,
                SafetensorError)
_digest_memo: dict[tuple[str, int, int], str] = {}
# What heads read from a backbone when they are built (Backbone attributes); stored as backbone.json.
SPEC_FIELDS = ("name", "family", "patch_size", "embed_dim", "embed_dims", "num_blocks", "layers", "layer_strides",
               "num_prefix_tokens", "num_registers")


def _hash_text(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=20).hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """blake2b digest of the file's bytes; memoised per process by (path, size, mtime)."""
    path = os.path.abspath(path)
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"file_digest: no file at {path}") from None
    memo_key = (path, stat.st_size, stat.st_mtime_ns)
    if memo_key not in _digest_memo:
        digest = hashlib.blake2b(digest_size=20)
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        _digest_memo[memo_key] = digest.hexdigest()
    return _digest_memo[memo_key]


def weights_identity(weights: Optional[str], init_seed: Any) -> dict:
    """null -> random weights of `init_seed`; a local file or folder -> content digests; else a hub id.

    A hub id ("hub", with `name` / `hub_name` in the other fields) does not see a new upload under the
    same repo name: clear the cache directory if the hub weights change."""
    if weights is None:
        return {"kind": "random", "init_seed": init_seed}
    weights = str(weights)
    if os.path.isfile(weights):
        return {"kind": "file", "digest": file_digest(weights)}
    if os.path.isdir(weights):  # a Hugging Face folder: weights and config.json both shape the tokens
        files = sorted(p for p in Path(weights).rglob("*") if p.is_file() and not p.name.startswith("."))
        return {"kind": "folder", "digests": {str(p.relative_to(weights)): file_digest(p) for p in files}}
    if weights.endswith(_WEIGHT_SUFFIXES):
        raise FileNotFoundError(f"backbone.weights={weights!r} looks like a weights file but does not exist")
    return {"kind": "hub", "id": weights}


def _plain(value: Any) -> Any:
    """OmegaConf containers, tuples and dicts -> JSON-stable plain values."""
    if hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return [_plain(v) for v in value]
    return value


def identity_fields(backbone_cfg: dict, input_size: Sequence[int], preprocess: Optional[dict] = None) -> dict:
    """The plain dict that `backbone_identity` hashes (also written to identity.json)."""
    cfg = _plain(backbone_cfg)
    for required in ("source", "name", "layers"):
        if required not in cfg:
            raise ValueError(f"backbone config has no field {required!r} (got fields {sorted(cfg)})")
    if len(input_size) != 2:
        raise ValueError(f"input_size must be (H, W), got {tuple(input_size)}")
    fields = {k: v for k, v in cfg.items() if k not in _NON_IDENTITY_FIELDS + ("weights", "init_seed")}
    fields["weights"] = weights_identity(cfg.get("weights"), cfg.get("init_seed", 0))
    fields.setdefault("model_kwargs", None)
    fields["input_size"] = [int(s) for s in input_size]
    fields["preprocess"] = _plain(preprocess) if preprocess else None
    fields["timm"] = importlib.metadata.version("timm")     # the installed timm, without importing it
    fields["format"] = FORMAT_VERSION
    return fields


def backbone_identity(backbone_cfg: dict, input_size: Sequence[int], preprocess: Optional[dict] = None) -> str:
    """Stable hash of everything that decides the cached tokens except the image and the view."""
    return _hash_text(json.dumps(identity_fields(backbone_cfg, input_size, preprocess), sort_keys=True))


def item_key(image_digest: str, view: Any = "full") -> str:
    return _hash_text(f"{image_digest}|{view}")


def image_key(image_path: str | os.PathLike, view: Any = "full") -> str:
    """The `cache_key` a dataset item carries: content digest of the image file + view id."""
    return item_key(file_digest(image_path), view)


def _atomic_write(path: Path, write) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        write(handle)


class FeatureCache:
    """One directory of per-item token files for one backbone identity."""

    def __init__(self, root: str | os.PathLike, identity: str, dtype: str = "float16",
                 fields: Optional[dict] = None):
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"cache dtype {dtype!r}: expected one of {sorted(STORAGE_DTYPES)}")
        self.dir = Path(root) / identity / dtype  # one dtype never reads another's rounded values
        self.identity = identity
        self.dtype = dtype
        self.corrupt = 0
        # (H, W) of the images the tokens were computed from (CachedFeatures.image_size); None when not given
        self.input_size = tuple(fields["input_size"]) if fields and "input_size" in fields else None
        self.dir.mkdir(parents=True, exist_ok=True)
        if fields is not None and not (self.dir / "identity.json").exists():
            text = json.dumps(fields, sort_keys=True, indent=1).encode("utf-8")
            _atomic_write(self.dir / "identity.json", lambda handle: handle.write(text))

    @classmethod
    def for_backbone(cls, root: str | os.PathLike, backbone_cfg: dict, input_size: Sequence[int],
                     dtype: str = "float16", preprocess: Optional[dict] = None) -> "FeatureCache":
        fields = identity_fields(backbone_cfg, input_size, preprocess)
        return cls(root, backbone_identity(backbone_cfg, input_size, preprocess), dtype, fields)

    def key(self, image_digest: str, view: Any = "full") -> str:
        return item_key(image_digest, view)

    def path(self, key: str) -> Path:
        if not key or "/" in key or os.sep in key or key.startswith("."):
            raise ValueError(f"feature cache key {key!r}: expected a file-name-safe id such as image_key(...)")
        return self.dir / key[:2] / f"{key}.safetensors"

    def contains(self, key: str) -> bool:
        return self.path(key).is_file()

    def get(self, key: str) -> Optional[BackboneOutput]:
        """The item's output (unbatched, float32, CPU), or None on a miss or an unreadable file."""
        path = self.path(key)
        try:
            with open(path, "rb") as handle:
                return _entry_to_output(_nested(load_safetensors(handle.read())))
        except FileNotFoundError:
            return None
        except _LOAD_ERRORS as err:
            self.corrupt += 1
            warnings.warn(f"feature cache: unreadable file {path} ({type(err).__name__}: {err}); "
                          f"treating it as a miss, it will be rewritten", stacklevel=2)
            return None

    def read_features(self, keys: str | Sequence[str]) -> Optional[BackboneOutput]:
        """The stored output of one key (tokens (N, C)), or of a list of keys stacked on a first dimension
        (tokens (V, N, C)); None unless every key is stored and readable."""
        items = [self.get(key) for key in ([keys] if isinstance(keys, str) else keys)]
        if any(item is None for item in items):
            return None
        return items[0] if isinstance(keys, str) else stack_outputs(items)

    @property
    def spec_path(self) -> Path:
        return self.dir / "backbone.json"

    def read_spec(self) -> Optional[dict]:
        """The description of this identity's backbone (`backbone_spec`), or None before a run has built it."""
        try:
            spec = json.loads(self.spec_path.read_text())
        except FileNotFoundError:
            return None
        except ValueError as err:
            warnings.warn(f"feature cache: unreadable {self.spec_path} ({err}); the backbone will be built",
                          stacklevel=2)
            return None
        if not isinstance(spec, dict) or set(spec) != set(SPEC_FIELDS):
            warnings.warn(f"feature cache: {self.spec_path} does not hold the fields {SPEC_FIELDS}; the backbone "
                          f"will be built", stacklevel=2)
            return None
        return spec

    def write_spec(self, backbone: Backbone) -> None:
        text = json.dumps(backbone_spec(backbone), sort_keys=True, indent=1).encode("utf-8")
        _atomic_write(self.spec_path, lambda handle: handle.write(text))

    def put(self, key: str, item: BackboneOutput) -> BackboneOutput:
        """Store one item's output (tokens (N, C) per layer, cls (C,), registers (R, C)).

        Returns what a later `get` of this key gives (the stored values, float32)."""
        entry = _output_to_entry(item, STORAGE_DTYPES[self.dtype], self.path(key))
        _atomic_write(self.path(key), lambda handle: handle.write(save_safetensors(_flat(entry))))
        return _entry_to_output(entry)


def _store(tensor: Optional[Tensor], dtype: torch.dtype, path: Path) -> Optional[Tensor]:
    if tensor is None:
        return None
    # clone: a view of a batch tensor would save the whole batch storage
    stored = tensor.detach().to("cpu", dtype).clone()
    if not torch.isfinite(stored).all() and torch.isfinite(tensor).all():
        raise ValueError(f"feature cache: tokens overflow {dtype} when writing {path}; "
                         f"set the cache dtype to bfloat16 or float32")
    return stored


def _output_to_entry(item: BackboneOutput, dtype: torch.dtype, path: Path) -> dict:
    if not item.tokens or any(t.dim() != 2 for t in item.tokens):
        raise ValueError(f"feature cache put {path}: expected one item's tokens as a list of (N, C) tensors, "
                         f"got shapes {[tuple(t.shape) for t in item.tokens]}")
    return {"tokens": [_store(t, dtype, path) for t in item.tokens],
            "grid": [int(item.grid[0]), int(item.grid[1])],
            "cls": _store(item.cls, dtype, path),
            "registers": _store(item.registers, dtype, path)}


def _flat(entry: dict) -> dict[str, Tensor]:
    """An entry as the named tensors of its file (None fields left out)."""
    flat = {f"tokens.{i}": t for i, t in enumerate(entry["tokens"])}
    flat["grid"] = torch.tensor(entry["grid"], dtype=torch.int64)
    flat.update({name: entry[name] for name in ("cls", "registers") if entry[name] is not None})
    return flat


def _nested(flat: dict[str, Tensor]) -> dict:
    count = sum(name.startswith("tokens.") for name in flat)
    grid = flat["grid"]
    if grid.shape != (2,) or grid.is_floating_point():
        raise ValueError(f"grid {grid.tolist()} is not two integers")
    return {"tokens": [flat[f"tokens.{i}"] for i in range(count)], "grid": grid.tolist(),
            "cls": flat.get("cls"), "registers": flat.get("registers")}


def _floats(value: Any, dims: int) -> bool:
    return isinstance(value, Tensor) and value.is_floating_point() and value.dim() == dims


def _entry_to_output(entry: dict) -> BackboneOutput:
    tokens, (h, w) = entry["tokens"], entry["grid"]
    if not tokens or any(not _floats(t, 2) or t.shape[0] != h * w or t.shape[1] != tokens[0].shape[1]
                         for t in tokens):
        raise ValueError(f"token shapes {[tuple(getattr(t, 'shape', ())) for t in tokens]} are not floating (N, C) "
                         f"tensors matching grid {(h, w)}")
    cls, registers = entry["cls"], entry["registers"]
    width = tokens[0].shape[1]
    if not (cls is None or _floats(cls, 1) and cls.shape[0] == width) or \
            not (registers is None or _floats(registers, 2) and registers.shape[1] == width):
        raise ValueError(f"cls / registers are not floating tensors of width {width}")
    return BackboneOutput(tokens=[t.float() for t in tokens], grid=(int(h), int(w)),
                          cls=None if cls is None else cls.float(),
                          registers=None if registers is None else registers.float())


def split_output(out: BackboneOutput) -> list[BackboneOutput]:
    """Batched output -> one unbatched output per item."""
    def pick(t, i):
        return None if t is None else t[i]
    return [BackboneOutput(tokens=[t[i] for t in out.tokens], grid=tuple(out.grid),
                           cls=pick(out.cls, i), registers=pick(out.registers, i))
            for i in range(out.tokens[0].shape[0])]


def stack_outputs(items: list[BackboneOutput], device: torch.device | str = "cpu") -> BackboneOutput:
    grids = {tuple(item.grid) for item in items}
    if len(grids) != 1:
        raise ValueError(f"cannot batch cached items with different patch grids {sorted(grids)}")

    def stack(tensors):
        return None if tensors[0] is None else torch.stack(tensors).to(device)
    return BackboneOutput(tokens=[stack([it.tokens[j] for it in items]) for j in range(len(items[0].tokens))],
                          grid=grids.pop(), cls=stack([it.cls for it in items]),
                          registers=stack([it.registers for it in items]))


@dataclass
class CachedFeatures(BackboneOutput):
    """A batch of cached backbone outputs standing where the batch's pixels would be; `image_size` (H, W) is the
    size of the images they were computed from (what a model that upsamples to its input reads)."""
    image_size: tuple[int, int] = (0, 0)
    source: str = ""             # the cache directory they were read from (FeatureCache.dir): encode checks it

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "CachedFeatures":
        def move(t):
            return None if t is None else t.to(device, non_blocking=non_blocking)
        return replace(self, tokens=[move(t) for t in self.tokens], cls=move(self.cls), registers=move(self.registers))


@dataclass
class CachedItem:
    """One dataset item's stored tokens in place of its pixels (every key of the item hit the cache).
    `pixels` decodes them after all, for a batch that mixes hits and misses (collate_pixels)."""
    features: BackboneOutput
    image_size: tuple[int, int]
    source: str
    pixels: Callable[[], Tensor]


def pixels_or_features(cache: Optional[FeatureCache], keys: str | Sequence[str],
                       pixels: Callable[[], Tensor]) -> Tensor | CachedItem:
    """What a dataset item carries as its pixels: the cached tokens of `keys` when every key is stored (nothing
    decoded), else `pixels()`. `cache` None (features not cached): always the pixels."""
    features = None if cache is None else cache.read_features(keys)
    if features is None:
        return pixels()
    return CachedItem(features, cache.input_size, str(cache.dir), pixels)


def collate_pixels(values: list) -> Tensor | CachedFeatures:
    """The batch's pixels: one CachedFeatures when every item is a CachedItem, else the stacked pixels (a hit's
    decoded now, so that the encoder sees one kind of input; it reads those items from the cache again)."""
    if all(isinstance(v, CachedItem) for v in values):
        out = stack_outputs([v.features for v in values])
        sources = {v.source for v in values}
        if len(sources) != 1:
            raise ValueError(f"one batch of cached features from several caches {sorted(sources)}")
        return CachedFeatures(tokens=out.tokens, grid=out.grid, cls=out.cls, registers=out.registers,
                              image_size=tuple(values[0].image_size), source=sources.pop())
    return torch.stack([v.pixels() if isinstance(v, CachedItem) else v for v in values])


def input_hw(inputs: Tensor | CachedFeatures) -> tuple[int, int]:
    """(H, W) of a batch's images, whether they came as pixels or as cached features."""
    if isinstance(inputs, CachedFeatures):
        return tuple(inputs.image_size)
    return int(inputs.shape[-2]), int(inputs.shape[-1])


def leading_shape(inputs: Tensor | BackboneOutput, dims: int) -> tuple[int, ...]:
    """The first `dims` sizes (items, views...) of a batch's pixels or of their cached features."""
    first = inputs.tokens[0] if isinstance(inputs, BackboneOutput) else inputs
    return tuple(first.shape[:dims])


def map_inputs(inputs: Tensor | BackboneOutput, fn: Callable[[Tensor], Tensor]) -> Tensor | BackboneOutput:
    """`fn` (an indexing along the leading item dimensions: select views, flatten) applied to pixels, or to every
    tensor of cached features, so that a model picks the same items from either."""
    if not isinstance(inputs, BackboneOutput):
        return fn(inputs)
    def apply(t):
        return None if t is None else fn(t)
    return replace(inputs, tokens=[apply(t) for t in inputs.tokens], cls=apply(inputs.cls),
                   registers=apply(inputs.registers))


def backbone_spec(backbone: Backbone) -> dict:
    """The attributes heads read from a backbone at construction (SPEC_FIELDS), as plain values."""
    return {name: _plain(getattr(backbone, name)) for name in SPEC_FIELDS}
