"""Checkpoints -> a predictor: the one place where eval and predict assemble their model.

A `ckpt_path` entry is one checkpoint file, a mode=cv run directory (its fold_*/checkpoints/<cv.checkpoint>.pt)
or a list of these. Each checkpoint is read once; its config sections rebuild the network (config precedence:
`config_from_checkpoint`), its trainable (or EMA) weights are restored and adapters are merged when
trainer.merge_adapters. This run's `inference` section (conf/inference/<task>.yaml, never a checkpoint's) says how
they become one predictor; its components are built with hydra.utils.instantiate and called here with their
runtime arguments:
- several checkpoints: `inference.ensemble(members=, weights=)`, the weights by `inference.weighting` (mean |
  metric), after `inference.top_k`; for cv run directories with weighting=stack, `inference.stack(members=,
  oof_frames=)` over one ensemble per run (a module whose `summary()` goes to metrics.json; null: no stacking);
- `inference.tta(model)` wraps the result (test-time augmentation; null: none).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from common.inference.checkpoint_config import check_checkpoint_config
from common.inference.ensemble import metric_weights, normalise_weights, top_k_indices
from common.inference.moved_modules import with_moved_targets
from common.task import Task
from common.training import adapt
from common.training.checkpoint import load_checkpoint, restore_for_inference
from common.training.cv import fold_checkpoint
from common.training.parts import load_task, task_class
from common.utils.csv_files import read_csv
from common.utils.plain_data import UntrustedData

log = logging.getLogger(__name__)

# eval / predict rebuild the network from these checkpoint sections (the data section too, with the
# command line's data.* overrides on top), so a checkpoint alone (plus backbone weights) predicts.
CHECKPOINT_SECTIONS = ("backbone", "peft", "model", "task", "adapt")
FROM_CHECKPOINT = CHECKPOINT_SECTIONS + ("data",)     # every section eval / predict read from a checkpoint
WEIGHTINGS = ("mean", "metric", "stack")
# Keys that checkpoints of earlier versions carry and this version moved elsewhere -> where they live now: left out
# of the checkpoint's config (never read, nor refused as unknown keys), since this run's value applies.
RETIRED_KEYS = {"task.tta": "inference.tta", "data.tta": "inference.tta", "data.ensemble": "inference.ensemble",
                "task.max_epochs": "trainer.max_epochs"}
_DELETED = object()
# data keys that name folders of this machine: always this run's, whatever the checkpoint's data section holds
RUN_DATA_KEYS = ("root", "image_cache")


@dataclass
class Predictor:
    """What eval and predict run: the task (configured from the checkpoint), its model ready for inference, the
    training statistics, the merged config, the checkpoints used and how they were combined."""
    task: Task
    model: nn.Module
    stats: dict
    config: DictConfig
    paths: list[Path] = field(default_factory=list)
    ensemble: dict = field(default_factory=dict)


# ---- config precedence -----------------------------------------------------------------------
def _command_line_data_keys() -> list[str]:
    """The data.* keys this run's command line set or deleted (Hydra's record of its overrides)."""
    from hydra.core.hydra_config import HydraConfig
    if not HydraConfig.initialized():
        return []
    keys = [item.lstrip("+~").partition("=")[0] for item in HydraConfig.get().overrides.task]
    return [key[len("data."):] for key in keys if key.startswith("data.")]


def _without_retired_keys(config: dict, source: str) -> dict:
    """The checkpoint's config without RETIRED_KEYS (a shallow copy; the checkpoint is left as it is)."""
    config = dict(config)
    for path in RETIRED_KEYS:
        section, key = path.split(".")
        if isinstance(config.get(section), dict) and key in config[section]:
            config[section] = {k: v for k, v in config[section].items() if k != key}
            log.info(f"[inference] {source}: its {path} (an earlier version's key) is ignored; this run's "
                     f"{RETIRED_KEYS[path]} applies")
    return config


def _with_list_augmentation(config: dict, run_data: dict, source: str) -> dict:
    """The checkpoint's config with this run's data.augment where it holds the training augmentation in an earlier
    version's shape (biomass's data.aug, sclera's mapping data.augment; now a list of transforms): training-only
    settings that eval and predict never build, so they are neither refused as unknown keys nor read."""
    data = config.get("data")
    if not isinstance(data, dict) or ("aug" not in data and not isinstance(data.get("augment"), dict)):
        return config
    data = {k: v for k, v in data.items() if k != "aug"}
    data["augment"] = run_data.get("augment")
    log.info(f"[inference] {source}: its training augmentation (an earlier version's data.aug or data.augment "
             f"mapping) is ignored; this run's data.augment stands in")
    return {**config, "data": data}


def config_from_checkpoint(cfg: DictConfig, ckpt: dict, source: str = "checkpoint") -> DictConfig:
    """This run's config with the checkpoint's sections, once they are checked (common.inference.checkpoint_config):
    - backbone, peft, model, task, adapt: the checkpoint's (the network it trained), except the task section's
      Task.INFERENCE_KEYS (e.g. sclera's submission): this run's;
    - data: the checkpoint's, with this run's data.root and data.image_cache (RUN_DATA_KEYS), and each data.* value given on the command line
      replacing the checkpoint's whole;
    - everything else: this run's (trainer, paths, logger...), the `inference` section always: how checkpoints
      become a predictor (weighting, top_k, ensemble, stack, tta) is never taken from a checkpoint, which stores
      the inference section of the run that trained it."""
    merged = OmegaConf.to_container(cfg, resolve=True)
    if not isinstance(ckpt["config"], dict) or not isinstance(ckpt["config"].get("data"), dict):
        raise UntrustedData(f"checkpoint {source}: its config has no data section (expected a suite checkpoint)")
    config = with_moved_targets(_without_retired_keys(ckpt["config"], source))
    config = _with_list_augmentation(config, merged["data"], source)
    config = check_checkpoint_config(config, merged, FROM_CHECKPOINT, source)
    run_keys = task_class(cfg).INFERENCE_KEYS
    run_task = {key: merged["task"][key] for key in run_keys if merged["task"].get(key) is not None}
    for section in CHECKPOINT_SECTIONS:
        if section in config:
            merged[section] = config[section]
    merged["task"].update(run_task)
    data = OmegaConf.create(config["data"])
    for key in RUN_DATA_KEYS:               # where this machine reads and writes: never a checkpoint's choice
        if key in cfg.data:
            data[key] = cfg.data[key]
        elif key in data:
            del data[key]
    for key in _command_line_data_keys():           # the value Hydra composed from the command line, whole
        value = OmegaConf.select(cfg.data, key, default=_DELETED)
        if value is _DELETED:                          # ~data.<key>
            parent, _, leaf = key.rpartition(".")
            container = OmegaConf.select(data, parent) if parent else data
            if isinstance(container, DictConfig) and leaf in container:
                del container[leaf]
        else:
            plain = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
            OmegaConf.update(data, key, plain, merge=False, force_add=True)
    merged["data"] = OmegaConf.to_container(data)
    return OmegaConf.create(merged)


# ---- one checkpoint ----------------------------------------------------------------------------
def merge_for_inference(model: nn.Module, enabled: bool, source: str) -> nn.Module:
    """trainer.merge_adapters: fold the backbone (peft) and head (adapt) adapters into their base weights once,
    instead of adding them (and, for DoRA, renormalising the weight) in every forward pass. The merged model
    cannot load or write adapter checkpoints: it only predicts (mode=cv predicts with its trained model)."""
    if not isinstance(enabled, bool):
        raise ValueError(f"trainer.merge_adapters={enabled!r}: expected true or false")
    if enabled:
        from common.models.adapters import merge_adapters
        merged = merge_adapters(model)
        if merged:
            log.info(f"[inference] {source}: merged the adapters of {merged} layers into their base weights")
    return model


def load_for_inference(cfg: DictConfig, ckpt_path, ckpt: dict | None = None) -> Predictor:
    """One checkpoint's model, weights restored (`ckpt`: the checkpoint already read from `ckpt_path`)."""
    if ckpt_path is None:
        raise ValueError(f"mode={cfg.mode} needs ckpt_path=<run dir>/checkpoints/best.pt")
    ckpt = ckpt if ckpt is not None else load_checkpoint(ckpt_path, str(cfg.task.name))
    ckpt_cfg = config_from_checkpoint(cfg, ckpt, str(ckpt_path))
    task = load_task(ckpt_cfg)
    model = task.build_model(ckpt["stats"])
    adapt.apply_head_adapters(model, ckpt_cfg.adapt)
    model = restore_for_inference(model, ckpt, str(ckpt_path))
    stat = Path(str(ckpt_path)).stat()
    model.checkpoint_id = f"{Path(str(ckpt_path)).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"  # prediction caches
    merge_for_inference(model, cfg.trainer.merge_adapters, str(ckpt_path))
    return Predictor(task, model, ckpt["stats"], ckpt_cfg, [Path(str(ckpt_path))])


# ---- ckpt_path entries -------------------------------------------------------------------------
def _fold_checkpoints(run_dir: Path, which: str) -> list[Path]:
    """The fold models of a mode=cv run directory: fold_*/checkpoints/<cv.checkpoint>.pt."""
    folds = sorted(path for path in (fold_checkpoint(d, which) for d in run_dir.glob("fold_*")) if path.is_file())
    if not folds:
        raise FileNotFoundError(f"ckpt_path entry {run_dir} is a directory without fold_*/checkpoints/{which}.pt "
                                f"(expected a mode=cv run directory; cv.checkpoint={which})")
    return folds


def _ckpt_entries(ckpt_path) -> list[Path]:
    if ckpt_path is None:
        raise ValueError("mode=predict needs ckpt_path=<file>, [<file>,<file>,...] or a mode=cv run directory")
    entries = [ckpt_path] if isinstance(ckpt_path, (str, Path)) else list(ckpt_path)
    return [Path(str(entry)) for entry in entries]


def checkpoint_paths(ckpt_path, which: str = "best") -> list[Path]:
    """ckpt_path: one file, a mode=cv run directory (its fold_*/checkpoints/<which>.pt), or a list of these."""
    paths: list[Path] = []
    for entry in _ckpt_entries(ckpt_path):
        paths += _fold_checkpoints(entry, which) if entry.is_dir() else [entry]
    return paths


def _read_oof(run_dir: Path):
    path = run_dir / "oof.csv"
    if not run_dir.is_dir() or not path.is_file():
        raise FileNotFoundError(f"inference.weighting=stack: {path} not found; ckpt_path must list mode=cv run "
                                f"directories (each with oof.csv), e.g. ckpt_path=[<cv run>,<cv run>]")
    return read_csv(path, "the oof.csv of a mode=cv run")


# ---- combinations ------------------------------------------------------------------------------
def _stacked(cfg: DictConfig, ckpt_path) -> Predictor:
    """inference.weighting=stack: one member per cv run directory (inference.ensemble of its folds), combined by
    inference.stack, a meta-model fit on the directories' oof.csv."""
    stack = instantiate(cfg.inference.stack)
    if stack is None:
        raise ValueError(f"task {cfg.task.name} has no stacking (inference.stack is null); use "
                         f"inference.weighting=mean or metric")
    ensemble = instantiate(cfg.inference.ensemble)
    members, frames, first, paths = [], {}, None, []
    for run_dir in _ckpt_entries(ckpt_path):
        if str(run_dir / "oof.csv") in frames:
            raise ValueError(f"inference.weighting=stack: ckpt_path lists {run_dir} twice")
        frames[str(run_dir / "oof.csv")] = _read_oof(run_dir)
        folds = _fold_checkpoints(run_dir, str(cfg.cv.checkpoint))
        loaded = [load_for_inference(cfg, path) for path in folds]
        first, paths = first or loaded[0], paths + folds
        members.append(ensemble(members=[one.model for one in loaded], weights=None))
    stacked = stack(members=members, oof_frames=frames)
    return Predictor(first.task, stacked, first.stats, first.config, paths,
                     {"weighting": "stack", "oof": list(frames), **stacked.summary()})


def _averaged(cfg: DictConfig, ckpts: list[tuple[Path, dict]]) -> Predictor:
    """mean / metric: inference.ensemble of every checkpoint, with validation-metric weights for `metric`."""
    loaded = [load_for_inference(cfg, path, ckpt) for path, ckpt in ckpts]
    if len(loaded) == 1:
        return Predictor(**{**vars(loaded[0]), "ensemble": {"weighting": "single", "weights": [1.0]}})
    weights = None
    if cfg.inference.weighting == "metric":
        weights = metric_weights([(str(path), ckpt) for path, ckpt in ckpts])
    first = loaded[0]
    model = instantiate(cfg.inference.ensemble)(members=[one.model for one in loaded], weights=weights)
    weights = normalise_weights(weights, len(loaded))
    paths = [path for path, _ in ckpts]
    log.info(f"[predict] {cfg.inference.weighting} ensemble of {len(loaded)} checkpoints: "
             + ", ".join(f"{p} (weight {w:.4f})" for p, w in zip(paths, weights)))
    return Predictor(first.task, model, first.stats, first.config, paths,
                     {"weighting": str(cfg.inference.weighting), "weights": weights})


def _top_k(cfg: DictConfig, ckpts: list[tuple[Path, dict]]) -> list[tuple[Path, dict]]:
    """inference.top_k: the k checkpoints with the best validation monitor (mean / metric weighting)."""
    keep = top_k_indices([(str(path), ckpt) for path, ckpt in ckpts], int(cfg.inference.top_k))
    log.info(f"[predict] inference.top_k={cfg.inference.top_k}: " + ", ".join(str(ckpts[i][0]) for i in keep))
    return [ckpts[i] for i in keep]


def load_predictor(cfg: DictConfig, ckpt_path) -> Predictor:
    """The predictor of one ckpt_path entry (a file, a cv run, or a list: an ensemble), wrapped by inference.tta."""
    weighting, top_k = cfg.inference.weighting, cfg.inference.top_k
    if weighting not in WEIGHTINGS:
        raise ValueError(f"inference.weighting={weighting!r}: expected one of {', '.join(WEIGHTINGS)}")
    if ckpt_path is None:
        raise ValueError(f"mode={cfg.mode} needs ckpt_path=<file>, [<file>,<file>,...] or a mode=cv run directory")
    if weighting == "stack":
        if top_k is not None:
            raise ValueError("inference.top_k with inference.weighting=stack: the meta-model needs every cv run; "
                             "use weighting mean or metric")
        predictor = _stacked(cfg, ckpt_path)
    else:
        ckpts = [(path, load_checkpoint(path, str(cfg.task.name)))
                 for path in checkpoint_paths(ckpt_path, str(cfg.cv.checkpoint))]
        if top_k is not None:
            ckpts = _top_k(cfg, ckpts)
        predictor = _averaged(cfg, ckpts)
    tta = instantiate(cfg.inference.tta)
    if tta is not None:
        predictor.model = tta(predictor.model)
    return predictor
