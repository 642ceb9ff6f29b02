"""Resolve the config, pick the task, dispatch on `mode`: train | eval | predict | cv | synth."""
from __future__ import annotations

import logging
import hashlib
import json
import shutil
from contextlib import nullcontext
from pathlib import Path

import yaml
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from torch import nn

from common import adapt, distributed, image_check, preemption
from common.atomic import file_lock
from common.checkpoint import load_checkpoint, load_trainable_state, written_checkpoints
from common.checkpoint_config import check_checkpoint_config
from common.choices import MODES
from common.console import inference_commands, summary_block
from common.reports import finish_run
from common.run_dir import check_run_folders, run_directory_lock
from common.seed import seed_everything
from common.task import Task
from common.tracking import RunFiles, Tracker, make_tracker
from common.trainer import Trainer, raise_if_diverged

log = logging.getLogger(__name__)

# eval / predict rebuild the network from these checkpoint sections (the data section too, with the
# command line's data.* overrides on top), so a checkpoint alone (plus backbone weights) predicts.
CHECKPOINT_SECTIONS = ("backbone", "peft", "model", "task", "adapt")
# inference settings inside the task section: this run's, not the checkpoint's
RUN_TASK_KEYS = ("tta", "submission")


def load_task(cfg: DictConfig) -> Task:
    cls = get_class(cfg.task._target_)
    if not issubclass(cls, Task):
        raise TypeError(f"task._target_={cfg.task._target_} is not a common.task.Task subclass")
    return cls(cfg)


def synthetic_root(cfg: DictConfig) -> Path:
    """The folder of the synthetic dataset that `cfg` trains on when data.root is unset (keyed by its settings)."""
    seed = int(OmegaConf.select(cfg, "data.synth_seed", default=0))
    synth_cfg = OmegaConf.to_container(cfg.data.synth, resolve=True) if "synth" in cfg.data else {}
    digest = hashlib.sha1(json.dumps([seed, synth_cfg], sort_keys=True).encode()).hexdigest()[:8]
    return Path(cfg.paths.synth_dir) / f"{cfg.task.name}-{digest}"


def ensure_synthetic(task: Task, root: Path, seed: int) -> Path:
    """Generate the task's synthetic dataset once; concurrent processes wait on a file lock."""
    if (root / ".complete").is_file():
        return root
    with file_lock(root.parent / f".{root.name}.lock"):
        if not (root / ".complete").is_file():
            tmp = root.parent / f".{root.name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            log.info(f"[data] generating the synthetic {task.name} dataset into {root}")
            task.synthesize(tmp, seed)
            (tmp / ".complete").write_text("ok\n")
            shutil.rmtree(root, ignore_errors=True)
            tmp.rename(root)
    return root


def data_root(cfg: DictConfig, task: Task) -> Path:
    if cfg.data.root is None:
        seed = int(OmegaConf.select(cfg, "data.synth_seed", default=0))
        return ensure_synthetic(task, synthetic_root(cfg), seed)
    root = Path(str(cfg.data.root)).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data.root={root} does not exist: expected the {task.name} dataset as laid out "
                                f"in docs/FORMATS.md, or leave data.root unset to use synthetic data")
    return root


def count_parameters(model: nn.Module) -> dict[str, int]:
    from common.optim import tag_of
    counts = {"total": 0, "trainable": 0}
    for name, param in model.named_parameters():
        counts["total"] += param.numel()
        if param.requires_grad:
            counts["trainable"] += param.numel()
            tag = tag_of(f"model.{name}")
            counts[tag] = counts.get(tag, 0) + param.numel()
    return counts


def build_parts(task: Task, stats: dict):
    """Model (adapted from adapt.init_ckpt when set), criterion and metric for training. Seeded here, so the
    initial weights do not depend on what ran before (generating the synthetic data, an earlier fold)."""
    seed_everything(int(task.cfg.seed))
    model = adapt.build_for_training(task.build_model(stats), task.cfg, task.name)
    criterion, metric = task.build_criterion(stats), task.build_metric(stats)
    counts = count_parameters(model)
    log.info("[model] parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    return model, criterion, metric


def restore_for_inference(model: nn.Module, ckpt: dict, source: str) -> nn.Module:
    """Trainable weights of the checkpoint, with its EMA weights swapped in when it has them."""
    load_trainable_state(model, ckpt["model"], source)
    if ckpt.get("ema"):
        params = dict(model.named_parameters())
        for name, value in ckpt["ema"]["shadow"].items():
            params[name].data.copy_(value)
    return model


def _command_line_data_overrides() -> list[tuple[str, object]]:
    from hydra.core.hydra_config import HydraConfig
    if not HydraConfig.initialized():
        return []
    pairs = []
    for item in HydraConfig.get().overrides.task:
        key, _, value = item.lstrip("+~").partition("=")
        if key.startswith("data."):
            pairs.append((key[len("data."):], yaml.safe_load(value)))
    return pairs


def config_from_checkpoint(cfg: DictConfig, ckpt: dict, source: str = "checkpoint") -> DictConfig:
    """This run's config with the checkpoint's sections, once they are checked (common.checkpoint_config)."""
    merged = OmegaConf.to_container(cfg, resolve=True)
    check_checkpoint_config(ckpt["config"], merged, CHECKPOINT_SECTIONS + ("data",), source)
    run_task = {key: merged["task"][key] for key in RUN_TASK_KEYS if merged["task"].get(key) is not None}
    for section in CHECKPOINT_SECTIONS:
        if section in ckpt["config"]:
            merged[section] = ckpt["config"][section]
    merged["task"].update(run_task)
    data = OmegaConf.create(ckpt["config"]["data"])
    data.root = cfg.data.root
    for key, value in _command_line_data_overrides():      # a value given whole replaces the checkpoint's
        OmegaConf.update(data, key, value, merge=False, force_add=True)
    merged["data"] = OmegaConf.to_container(data)
    return OmegaConf.create(merged)


def load_for_inference(cfg: DictConfig, ckpt_path) -> tuple[Task, nn.Module, dict, DictConfig]:
    if ckpt_path is None:
        raise ValueError(f"mode={cfg.mode} needs ckpt_path=<run dir>/checkpoints/best.pt")
    ckpt = load_checkpoint(ckpt_path, str(cfg.task.name))
    ckpt_cfg = config_from_checkpoint(cfg, ckpt, str(ckpt_path))
    task = load_task(ckpt_cfg)
    model = task.build_model(ckpt["stats"])
    adapt.apply_head_adapters(model, ckpt_cfg.adapt)
    model = restore_for_inference(model, ckpt, str(ckpt_path))
    stat = Path(str(ckpt_path)).stat()
    model.checkpoint_id = f"{Path(str(ckpt_path)).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"  # prediction caches
    merge_for_inference(model, cfg.trainer.merge_adapters, str(ckpt_path))
    return task, model, ckpt["stats"], ckpt_cfg


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


# ---- modes ----------------------------------------------------------------------------------
def train(cfg, task, root, run_dir, tracker, ctx) -> float | None:
    sets = task.datasets(root, "fit")
    stats = task.fit_stats(sets["train"])
    model, criterion, metric = build_parts(task, stats)
    state = Trainer(cfg, run_dir, tracker, ctx).fit(task, model, criterion, metric, sets["train"], sets["val"],
                                                     stats, task.sample_weights(root, sets["train"]))
    summary = {"monitor": str(cfg.trainer.monitor), "best_value": state.best_value,
               "best_epoch": state.best_epoch, "best": state.best_metrics, "last": state.last_metrics,
               "checkpoints": written_checkpoints(run_dir / "checkpoints")}
    if ctx.is_main:
        RunFiles(run_dir).write_final(summary)
    raise_if_diverged(state, str(cfg.trainer.monitor))
    tracker.set_summary({f"best/{k}": v for k, v in state.best_metrics.items() if isinstance(v, (int, float))})
    if ctx.is_main:
        task.log_tables(tracker, state.best_metrics)
    return state.best_value


def log_train_summary(cfg: DictConfig, task_name: str, run_dir: Path) -> None:
    """The block a person reads at the end of training: run dir, best value, files, eval / predict commands."""
    final = json.loads((run_dir / "metrics.json").read_text())
    best = run_dir / "checkpoints" / "best.pt"
    commands = inference_commands(task_name, cfg.data.root, best) if best.is_file() else []
    epochs_run = (final.get("last") or {}).get("epoch", -1) + 1
    log.info(summary_block(run_dir, final["monitor"], final["best_value"], final["best_epoch"], epochs_run,
                           commands))


def evaluate(cfg, task, root, run_dir, tracker, ctx) -> float | None:
    task, model, stats, ckpt_cfg = load_for_inference(cfg, cfg.ckpt_path)
    tracker.set_config(ckpt_cfg)
    trainer = Trainer(ckpt_cfg, run_dir, tracker, ctx)
    model = task.for_inference(model)                    # Trainer.evaluate moves it to the device
    metric, dataset = task.build_metric(stats), task.datasets(root, "eval")["eval"]
    values = trainer.evaluate(model, None, metric, dataset, task.collate)
    metrics = {f"eval/{k}": v for k, v in values.items()}
    if ctx.is_main:
        RunFiles(run_dir).write_final({"ckpt_path": str(cfg.ckpt_path), **metrics})
    tracker.set_summary(metrics)
    log.info("[eval] " + json.dumps(metrics))
    if ctx.is_main:
        for what, path in task.write_eval_outputs(metric, dataset, run_dir, tracker).items():
            log.info(f"[eval] {what}: {path}")
    return metrics.get(str(cfg.optimized_metric).replace("val/", "eval/", 1))


WEIGHTINGS = ("mean", "metric", "stack")


def _fold_checkpoints(run_dir: Path, which: str) -> list[Path]:
    """The fold models of a mode=cv run directory: fold_*/checkpoints/<cv.checkpoint>.pt."""
    from common.cv import fold_checkpoint
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


def _stacked_predictor(cfg: DictConfig, ckpt_path):
    """ensemble.weighting=stack: one member per cv run directory (the mean of its folds), combined by the task's
    meta-model fit on the directories' oof.csv."""
    members, frames, first = [], {}, None
    for run_dir in _ckpt_entries(ckpt_path):
        if str(run_dir / "oof.csv") in frames:
            raise ValueError(f"ensemble.weighting=stack: ckpt_path lists {run_dir} twice")
        frames[str(run_dir / "oof.csv")] = _read_oof(run_dir)
        loaded = [load_for_inference(cfg, path) for path in _fold_checkpoints(run_dir, str(cfg.cv.checkpoint))]
        first = first or loaded[0]
        members.append(loaded[0][0].ensemble([model for _, model, _, _ in loaded]))
    task, _, stats, ckpt_cfg = first
    stacked = task.stack(members, frames, cfg.ensemble)
    return (task, stacked, stats, ckpt_cfg), {"weighting": "stack", "oof": list(frames), **stacked.summary()}


def _averaged_predictor(cfg: DictConfig, paths: list[Path]):
    """mean / metric: the task's ensemble of every checkpoint, with validation-metric weights for `metric`."""
    from common.ensemble import metric_weights, normalise_weights
    loaded = [load_for_inference(cfg, path) for path in paths]
    task, model, stats, ckpt_cfg = loaded[0]
    if len(loaded) == 1:
        return loaded[0], {"weighting": "single", "weights": [1.0]}
    weights = None
    if cfg.ensemble.weighting == "metric":
        weights = metric_weights([(str(p), load_checkpoint(p, str(cfg.task.name))) for p in paths])
    model = task.ensemble([m for _, m, _, _ in loaded], weights)
    weights = normalise_weights(weights, len(loaded))
    log.info(f"[predict] {cfg.ensemble.weighting} ensemble of {len(loaded)} checkpoints: "
             + ", ".join(f"{p} (weight {w:.4f})" for p, w in zip(paths, weights)))
    return (task, model, stats, ckpt_cfg), {"weighting": str(cfg.ensemble.weighting), "weights": weights}


def _top_k(cfg: DictConfig, paths: list[Path]) -> list[Path]:
    """ensemble.top_k: the k checkpoints with the best validation monitor (mean / metric weighting)."""
    from common.ensemble import top_k_indices
    if cfg.ensemble.weighting == "stack":
        raise ValueError("ensemble.top_k with ensemble.weighting=stack: the meta-model needs every cv run; "
                         "use weighting mean or metric")
    keep = top_k_indices([(str(p), load_checkpoint(p, str(cfg.task.name))) for p in paths], int(cfg.ensemble.top_k))
    log.info(f"[predict] ensemble.top_k={cfg.ensemble.top_k}: " + ", ".join(str(paths[i]) for i in keep))
    return [paths[i] for i in keep]


def _predict_group(cfg, ckpt_path, label, root, run_dir, tracker, ctx) -> dict:
    """Predict with the checkpoints of one ckpt_path entry (one file, a cv run, or a list: an ensemble)."""
    paths = checkpoint_paths(ckpt_path, str(cfg.cv.checkpoint))
    if cfg.ensemble.top_k is not None:
        paths = _top_k(cfg, paths)
    if cfg.ensemble.weighting == "stack":
        (task, model, stats, ckpt_cfg), ensemble = _stacked_predictor(cfg, ckpt_path)
    else:
        (task, model, stats, ckpt_cfg), ensemble = _averaged_predictor(cfg, paths)
    if label is not None:
        task.check_prediction_group(label)
    model = task.for_inference(model)
    tracker.set_config(ckpt_cfg)
    trainer = Trainer(ckpt_cfg, run_dir, tracker, ctx)
    results = trainer.infer(model, task.datasets(root, "predict")["predict"], task.collate)
    written = task.write_predictions(results, run_dir, stats) if ctx.is_main else {}
    return {"ckpt_path": [str(p) for p in paths], "ensemble": ensemble,
            "outputs": {k: str(v) for k, v in written.items()}}


def predict(cfg, task, root, run_dir, tracker, ctx) -> None:
    """ckpt_path: one entry, or a mapping {label: entry} predicted one label after another into this run's
    directory (no ensembling across labels; e.g. one checkpoint per SSBC track)."""
    if cfg.ensemble.weighting not in WEIGHTINGS:
        raise ValueError(f"ensemble.weighting={cfg.ensemble.weighting!r}: expected one of {', '.join(WEIGHTINGS)}")
    if isinstance(cfg.ckpt_path, DictConfig):
        if not cfg.ckpt_path:
            raise ValueError("ckpt_path={}: give at least one label: checkpoint")
        groups = {str(label): _predict_group(cfg, entry, str(label), root, run_dir, tracker, ctx)
                  for label, entry in cfg.ckpt_path.items()}
        summary = {key: {label: group[key] for label, group in groups.items()} for key in ("ckpt_path", "ensemble")}
        summary["outputs"] = {what: path for group in groups.values() for what, path in group["outputs"].items()}
    else:
        summary = _predict_group(cfg, cfg.ckpt_path, None, root, run_dir, tracker, ctx)
    if ctx.is_main:
        RunFiles(run_dir).write_final(summary)
        for what, path in summary["outputs"].items():
            log.info(f"[predict] {what}: {path}")
    return None


def synth(cfg, task) -> None:
    if cfg.data.root is None:
        raise ValueError("mode=synth writes the synthetic dataset to data.root: pass data.root=<folder>")
    root = Path(str(cfg.data.root)).expanduser()
    task.synthesize(root, int(OmegaConf.select(cfg, "data.synth_seed", default=0)))
    log.info(f"[synth] wrote the synthetic {task.name} dataset to {root}")


def run(cfg: DictConfig) -> float | None:
    if cfg.mode not in MODES:
        raise ValueError(f"mode={cfg.mode!r}: expected one of {', '.join(MODES)}")
    ctx = distributed.setup(cfg.trainer.device)
    with preemption.handlers():     # before any data is read: a signal from now on checkpoints and stops
        try:
            return _run_mode(cfg, ctx)
        except preemption.Preempted as stop:
            preemption.stop(stop.signum, ctx.is_main)


def _run_mode(cfg: DictConfig, ctx) -> float | None:
    seed_everything(int(cfg.seed))
    task = load_task(cfg)
    if cfg.mode == "synth":
        return synth(cfg, task)
    run_dir = Path(cfg.paths.output_dir)
    check_run_folders(cfg, run_dir)
    image_check.configure(cfg)
    with run_directory_lock(run_dir) if ctx.is_main else nullcontext():
        root = data_root(cfg, task)
        tracker: Tracker = make_tracker(cfg, run_dir, ctx.is_main)
        exit_code = 1
        try:
            from common.cv import cross_validate
            modes = {"train": train, "eval": evaluate, "predict": predict, "cv": cross_validate}
            value = modes[cfg.mode](cfg, task, root, run_dir, tracker, ctx)
            finish_run(tracker, run_dir, ctx.is_main)
            if cfg.mode == "train" and ctx.is_main:
                log_train_summary(cfg, task.name, run_dir)
            exit_code = 0
            return value
        finally:
            tracker.finish(exit_code)
            distributed.teardown(ctx)
