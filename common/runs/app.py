"""Resolve the config, pick the task, dispatch on `mode`: train | eval | predict | cv | synth."""
from __future__ import annotations

import json
import logging
import time
from contextlib import nullcontext
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from common.cluster import distributed, preemption
from common.data import image_check
from common.data.datasets import sample_weights_of
from common.runs.choices import MODES
from common.runs.run_dir import check_run_folders, run_directory_lock
from common.tracking.console import inference_commands, results_block, summary_block
from common.tracking.reports import curves_setting, finish_run
from common.tracking.tracker import RunFiles, Tracker, make_tracker
from common.training.checkpoint import written_checkpoints
from common.training.dataset_root import data_root
from common.training.divergence import NonFiniteLossError, raise_if_diverged
from common.training.parts import build_parts, load_task
from common.training.trainer import Trainer
from common.utils.seed import seed_everything

log = logging.getLogger(__name__)


# ---- modes ----------------------------------------------------------------------------------
def train(cfg, task, root, run_dir, tracker, ctx) -> float | None:
    sets = task.datasets(root, "fit")
    stats = task.fit_stats(sets["train"])
    model, criterion, metric = build_parts(task, stats)
    trial = instantiate(cfg.sweep_trial) if cfg.sweep_trial is not None else None
    state = Trainer(cfg, run_dir, tracker, ctx, trial).fit(task, model, criterion, metric, sets["train"],
                                                            sets["val"], stats, sample_weights_of(sets["train"]))
    summary = {"monitor": str(cfg.trainer.monitor), "best_value": state.best_value,
               "best_epoch": state.best_epoch, "best": state.best_metrics, "last": state.last_metrics,
               "checkpoints": written_checkpoints(run_dir / "checkpoints")}
    if state.pruned_epoch is not None:          # read by the sweeper (sweeps.shared_study): the trial is PRUNED
        summary["pruned"] = {"epoch": state.pruned_epoch, "value": state.pruned_value}
        tracker.add_tags(["pruned"])
    if ctx.is_main:
        RunFiles(run_dir).write_final(summary)
    raise_if_diverged(state, str(cfg.trainer.monitor))
    tracker.set_summary({f"best/{k}": v for k, v in state.best_metrics.items() if isinstance(v, (int, float))})
    if ctx.is_main:
        for name, (columns, rows) in metric.tables(state.best_metrics).items():
            tracker.log_table(name, columns, rows)
    return state.best_value


def record_divergence(run_dir: Path, err: NonFiniteLossError, started: float) -> None:
    """metrics.json (strict JSON) of a diverged run: what train wrote in this run (a file from before `started`
    is an earlier run's), the reason and the checkpoints that exist."""
    path = run_dir / "metrics.json"
    summary = json.loads(path.read_text()) if path.is_file() and path.stat().st_mtime >= started else {}
    summary.update({"status": "diverged", "reason": str(err),
                    "checkpoints": written_checkpoints(run_dir / "checkpoints")})
    RunFiles(run_dir).write_final(summary)


def monitor_key(cfg: DictConfig) -> str:
    """The monitored metric's name without its split (val/Binary/F1 -> Binary/F1)."""
    return str(cfg.optimized_metric).split("/", 1)[-1]


def log_train_summary(cfg: DictConfig, task_name: str, run_dir: Path) -> None:
    """The block a person reads at the end of training: run dir, best value, files, eval / predict commands."""
    final = json.loads((run_dir / "metrics.json").read_text())
    best = run_dir / "checkpoints" / "best.pt"
    commands = inference_commands(task_name, cfg.data.root, best) if best.is_file() else []
    epochs_run = (final.get("last") or {}).get("epoch", -1) + 1
    log.info(summary_block(run_dir, final["monitor"], final["best_value"], final["best_epoch"], epochs_run,
                           commands))


def evaluate(cfg, task, root, run_dir, tracker, ctx) -> float | None:
    from common.inference.predictor import FROM_CHECKPOINT, load_predictor   # eval / predict / cv imports: only in their modes
    predictor = load_predictor(cfg, cfg.ckpt_path)
    tracker.set_config(predictor.config, FROM_CHECKPOINT)
    trainer = Trainer(predictor.config, run_dir, tracker, ctx)
    task = predictor.task
    metric, dataset = task.build_metric(predictor.stats), task.datasets(root, "eval", predictor.model)["eval"]
    values = trainer.evaluate(predictor.model, None, metric, dataset, task.collate)
    metrics = {f"eval/{k}": v for k, v in values.items()}
    if ctx.is_main:
        RunFiles(run_dir).write_final({"ckpt_path": str(cfg.ckpt_path), **metrics})
    tracker.set_summary(metrics)
    if ctx.is_main:
        written = task.write_eval_outputs(metric, dataset, run_dir, tracker)
        log.info(results_block(run_dir, metrics, monitor_key(cfg), [("checkpoint", str(cfg.ckpt_path)),
                                                                    *written.items()]))
    return metrics.get(str(cfg.optimized_metric).replace("val/", "eval/", 1))


def _predict_group(cfg, ckpt_path, label, root, run_dir, tracker, ctx) -> dict:
    """Predict with the checkpoints of one ckpt_path entry (one file, a cv run, or a list: an ensemble)."""
    from common.inference.predictor import FROM_CHECKPOINT, load_predictor
    predictor = load_predictor(cfg, ckpt_path)
    if label is not None:
        predictor.task.check_prediction_group(label)
    tracker.set_config(predictor.config, FROM_CHECKPOINT)
    trainer = Trainer(predictor.config, run_dir, tracker, ctx)
    task = predictor.task
    dataset = task.datasets(root, "predict", predictor.model)["predict"]
    results = trainer.infer(predictor.model, dataset, task.collate)
    written = task.write_predictions(results, dataset, run_dir, predictor.stats) if ctx.is_main else {}
    return {"ckpt_path": [str(p) for p in predictor.paths], "ensemble": predictor.ensemble,
            "outputs": {k: str(v) for k, v in written.items()}}


def predict(cfg, task, root, run_dir, tracker, ctx) -> None:
    """ckpt_path: one entry, or a mapping {label: entry} predicted one label after another into this run's
    directory (no ensembling across labels; e.g. one checkpoint per SSBC track)."""
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
        log.info(results_block(run_dir, {}, monitor_key(cfg), [("checkpoint", str(cfg.ckpt_path)),
                                                               *summary["outputs"].items()]))
    return None


def cv(cfg, task, root, run_dir, tracker, ctx) -> float | None:
    from common.training.cv import cross_validate
    return cross_validate(cfg, task, root, run_dir, tracker, ctx)


def synth(cfg, task) -> None:
    if cfg.data.root is None:
        raise ValueError("mode=synth writes the synthetic dataset to data.root: pass data.root=<folder>")
    root = Path(str(cfg.data.root)).expanduser()
    task.synthesize(root, int(cfg.data.synth_seed))
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
    run_dir, curves = Path(cfg.paths.output_dir), curves_setting(cfg)    # a bad `curves` fails before the run
    check_run_folders(cfg, run_dir)
    image_check.configure(cfg)
    with run_directory_lock(run_dir) if ctx.is_main else nullcontext():
        root = data_root(cfg, task)
        tracker: Tracker = make_tracker(cfg, run_dir, ctx.is_main)
        exit_code, started = 1, time.time()
        try:
            modes = {"train": train, "eval": evaluate, "predict": predict, "cv": cv}
            value = modes[cfg.mode](cfg, task, root, run_dir, tracker, ctx)
            finish_run(tracker, run_dir, ctx.is_main, str(cfg.trainer.monitor), curves)
            if cfg.mode == "train" and ctx.is_main:
                log_train_summary(cfg, task.name, run_dir)
            exit_code = 0
            return value
        except NonFiniteLossError as err:
            if ctx.is_main:
                record_divergence(run_dir, err, started)
            raise
        finally:
            tracker.finish(exit_code)
            distributed.teardown(ctx)
