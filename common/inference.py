"""Checkpoints -> a predictor: the one place where eval and predict assemble their model.

A `ckpt_path` entry is one checkpoint file, a mode=cv run directory (its fold_*/checkpoints/<cv.checkpoint>.pt)
or a list of these. Each checkpoint is read once; its config sections rebuild the network (config precedence:
`config_from_checkpoint`), its trainable (or EMA) weights are restored, adapters are merged when
trainer.merge_adapters, several checkpoints become the task's ensemble (`ensemble.weighting` mean | metric) or a
stacked meta-model over cv runs (stack), and the task wraps the result for inference (test-time augmentation,
calibration: Task.for_inference).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch import nn

from common import adapt
from common.checkpoint import load_checkpoint, restore_for_inference
from common.checkpoint_config import check_checkpoint_config
from common.cv import fold_checkpoint
from common.ensemble import metric_weights, normalise_weights, top_k_indices
from common.parts import load_task, task_class
from common.task import Task

log = logging.getLogger(__name__)

# eval / predict rebuild the network from these checkpoint sections (the data section too, with the
# command line's data.* overrides on top), so a checkpoint alone (plus backbone weights) predicts.
CHECKPOINT_SECTIONS = ("backbone", "peft", "model", "task", "adapt")
WEIGHTINGS = ("mean", "metric", "stack")
_DELETED = object()


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


def config_from_checkpoint(cfg: DictConfig, ckpt: dict, source: str = "checkpoint") -> DictConfig:
    """This run's config with the checkpoint's sections, once they are checked (common.checkpoint_config):
    - backbone, peft, model, task, adapt: the checkpoint's (the network it trained), except the task section's
      inference settings (Task.INFERENCE_KEYS, e.g. roadwork's tta, sclera's submission): this run's;
    - data: the checkpoint's, with this run's data.root, and each data.* value given on the command line
      replacing the checkpoint's whole;
    - everything else (trainer, paths, ensemble, logger...): this run's."""
    merged = OmegaConf.to_container(cfg, resolve=True)
    check_checkpoint_config(ckpt["config"], merged, CHECKPOINT_SECTIONS + ("data",), source)
    run_keys = task_class(cfg).INFERENCE_KEYS
    run_task = {key: merged["task"][key] for key in run_keys if merged["task"].get(key) is not None}
    for section in CHECKPOINT_SECTIONS:
        if section in ckpt["config"]:
            merged[section] = ckpt["config"][section]
    merged["task"].update(run_task)
    data = OmegaConf.create(ckpt["config"]["data"])
    data.root = cfg.data.root
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
        from common.adapters import merge_adapters
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
    import pandas as pd
    path = run_dir / "oof.csv"
    if not run_dir.is_dir() or not path.is_file():
        raise FileNotFoundError(f"ensemble.weighting=stack: {path} not found; ckpt_path must list mode=cv run "
                                f"directories (each with oof.csv), e.g. ckpt_path=[<cv run>,<cv run>]")
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} could not be read as a CSV ({err}); expected the oof.csv of a mode=cv run") from err


# ---- combinations ------------------------------------------------------------------------------
def _stacked(cfg: DictConfig, ckpt_path) -> Predictor:
    """ensemble.weighting=stack: one member per cv run directory (the mean of its folds), combined by the task's
    meta-model fit on the directories' oof.csv."""
    members, frames, first, paths = [], {}, None, []
    for run_dir in _ckpt_entries(ckpt_path):
        if str(run_dir / "oof.csv") in frames:
            raise ValueError(f"ensemble.weighting=stack: ckpt_path lists {run_dir} twice")
        frames[str(run_dir / "oof.csv")] = _read_oof(run_dir)
        folds = _fold_checkpoints(run_dir, str(cfg.cv.checkpoint))
        loaded = [load_for_inference(cfg, path) for path in folds]
        first, paths = first or loaded[0], paths + folds
        members.append(loaded[0].task.ensemble([one.model for one in loaded]))
    stacked = first.task.stack(members, frames, cfg.ensemble)
    return Predictor(first.task, stacked, first.stats, first.config, paths,
                     {"weighting": "stack", "oof": list(frames), **stacked.summary()})


def _averaged(cfg: DictConfig, ckpts: list[tuple[Path, dict]]) -> Predictor:
    """mean / metric: the task's ensemble of every checkpoint, with validation-metric weights for `metric`."""
    loaded = [load_for_inference(cfg, path, ckpt) for path, ckpt in ckpts]
    if len(loaded) == 1:
        return Predictor(**{**vars(loaded[0]), "ensemble": {"weighting": "single", "weights": [1.0]}})
    weights = None
    if cfg.ensemble.weighting == "metric":
        weights = metric_weights([(str(path), ckpt) for path, ckpt in ckpts])
    first = loaded[0]
    model = first.task.ensemble([one.model for one in loaded], weights)
    weights = normalise_weights(weights, len(loaded))
    paths = [path for path, _ in ckpts]
    log.info(f"[predict] {cfg.ensemble.weighting} ensemble of {len(loaded)} checkpoints: "
             + ", ".join(f"{p} (weight {w:.4f})" for p, w in zip(paths, weights)))
    return Predictor(first.task, model, first.stats, first.config, paths,
                     {"weighting": str(cfg.ensemble.weighting), "weights": weights})


def _top_k(cfg: DictConfig, ckpts: list[tuple[Path, dict]]) -> list[tuple[Path, dict]]:
    """ensemble.top_k: the k checkpoints with the best validation monitor (mean / metric weighting)."""
    keep = top_k_indices([(str(path), ckpt) for path, ckpt in ckpts], int(cfg.ensemble.top_k))
    log.info(f"[predict] ensemble.top_k={cfg.ensemble.top_k}: " + ", ".join(str(ckpts[i][0]) for i in keep))
    return [ckpts[i] for i in keep]


def load_predictor(cfg: DictConfig, ckpt_path) -> Predictor:
    """The predictor of one ckpt_path entry (a file, a cv run, or a list: an ensemble), wrapped by the task for
    inference."""
    if cfg.ensemble.weighting not in WEIGHTINGS:
        raise ValueError(f"ensemble.weighting={cfg.ensemble.weighting!r}: expected one of {', '.join(WEIGHTINGS)}")
    if ckpt_path is None:
        raise ValueError(f"mode={cfg.mode} needs ckpt_path=<file>, [<file>,<file>,...] or a mode=cv run directory")
    if cfg.ensemble.weighting == "stack":
        if cfg.ensemble.top_k is not None:
            raise ValueError("ensemble.top_k with ensemble.weighting=stack: the meta-model needs every cv run; "
                             "use weighting mean or metric")
        predictor = _stacked(cfg, ckpt_path)
    else:
        ckpts = [(path, load_checkpoint(path, str(cfg.task.name)))
                 for path in checkpoint_paths(ckpt_path, str(cfg.cv.checkpoint))]
        if cfg.ensemble.top_k is not None:
            ckpts = _top_k(cfg, ckpts)
        predictor = _averaged(cfg, ckpts)
    predictor.model = predictor.task.for_inference(predictor.model)
    return predictor
