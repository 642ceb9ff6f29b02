"""Typed schemas of the config sections every task shares, checked right after composition (run.py).

Each section of the composed config is merged into its dataclass: a key the schema does not know, a key it
requires that the config lacks, or a value of the wrong type fails before anything runs, with the key named.
A new backbone or adapter option (a YAML file in its group) needs every required field below, a new logger option
`_target_` and `_partial_`; task-specific groups (data, model, loss, metric) are checked by the task's own
constructors. The logger section is open: a key its schema does not list is an argument of its `_target_`
tracker class, which common.tracking.tracker.make_tracker checks against the class's constructor (a key the class does
not take fails there, named).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


@dataclass
class BackboneSchema:
    source: str = MISSING                 # timm | hf
    name: str = MISSING                   # timm model name or Hugging Face repo id
    weights: Optional[str] = MISSING      # null (random), hub, or a local file / folder
    layers: List[int] = MISSING
    freeze: bool = True
    init_seed: int = 0
    lr: float = MISSING
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    hub_name: Optional[str] = None
    pos_embed_interpolation: str = "bicubic"   # bicubic | bilinear (timm, position embeddings resampled at load)


@dataclass
class PeftSchema:
    name: str = MISSING                   # none | lora | dora
    r: Optional[int] = MISSING
    alpha: Optional[float] = MISSING
    dropout: Optional[float] = MISSING
    targets: Optional[List[str]] = MISSING
    last_n_blocks: Optional[int] = MISSING
    lr: Optional[float] = MISSING
    layer_decay: Optional[float] = MISSING


@dataclass
class LoggerSchema:
    _target_: str = MISSING               # the tracker class: common.tracking.tracker.Tracker (none) | ...WandbTracker (wandb)
    _partial_: bool = MISSING             # true: make_tracker calls it with the run-time values it names
    group: Optional[str] = None           # group, tags, default_tags describe the run (common/tracking/run_info.py)
    tags: List[str] = field(default_factory=list)
    default_tags: List[str] = field(default_factory=list)
    # the wandb option's arguments (WandbTracker), typed here when present
    project: Optional[str] = None
    entity: Optional[str] = None
    mode: Optional[str] = None
    job_type: Optional[str] = None
    artifacts: bool = False
    verbose: bool = False
    console: Optional[str] = None


@dataclass
class PathsSchema:
    root_dir: str = MISSING
    log_dir: str = MISSING
    cache_dir: str = MISSING
    synth_dir: str = MISSING
    output_dir: str = MISSING


@dataclass
class CvSchema:
    folds: int = MISSING
    checkpoint: str = MISSING


@dataclass
class AdaptSchema:
    init_ckpt: Optional[str] = MISSING
    split: Optional[str] = MISSING
    modules: List[str] = MISSING
    layers: Optional[List[str]] = MISSING
    train_modules: List[str] = MISSING
    method: str = MISSING
    r: int = MISSING
    alpha: float = MISSING
    dropout: float = MISSING


@dataclass
class ImageCheckSchema:
    workers: int = MISSING
    cache: bool = MISSING


SECTION_SCHEMAS = {"backbone": BackboneSchema, "peft": PeftSchema, "logger": LoggerSchema, "paths": PathsSchema,
                   "cv": CvSchema, "adapt": AdaptSchema, "image_check": ImageCheckSchema}
OPEN_SECTIONS = ("logger",)   # keys beyond the schema's allowed (checked where the section is used)


class SchemaError(ValueError):
    """A shared config section that does not match its schema (the message names the key)."""


def _check(section: str, schema: type, node: DictConfig) -> None:
    if not isinstance(node, DictConfig):
        raise SchemaError(f"{section}: expected a mapping of {schema.__name__} fields, got {node!r}")
    try:
        base = OmegaConf.structured(schema)
        if section in OPEN_SECTIONS:
            OmegaConf.set_struct(base, False)
        checked = OmegaConf.merge(base, OmegaConf.to_container(node, resolve=True))
        missing = sorted(OmegaConf.missing_keys(checked))
    except OmegaConfBaseException as err:
        key = f"{section}.{err.full_key}" if getattr(err, "full_key", None) else section
        raise SchemaError(f"{key}: {str(err).splitlines()[0]} (schema {schema.__name__} in "
                          f"common/runs/config_schema.py)") from err
    if missing:
        raise SchemaError(f"{section}: missing {', '.join(f'{section}.{key}' for key in missing)} "
                          f"(schema {schema.__name__} in common/runs/config_schema.py)")


def check_schema(cfg: DictConfig) -> None:
    """Raise SchemaError when a shared section of the composed `cfg` does not match its schema."""
    for section, schema in SECTION_SCHEMAS.items():
        _check(section, schema, cfg[section])
