"""The one training loop every task uses: fit, evaluate, infer.

A Trainer holds its settings (`__init__`) and, once `prepare` has built them, the parts it trains (`Training`:
model, criterion, optimiser, schedule, EMA); nothing else is added later. `fit` is prepare + the epoch loop;
`prepare` and `train_epoch` are public for code that steps the loop itself (bench/run.py).

Exact resume: every epoch starts by reseeding all generators with (seed, epoch, rank), so an epoch's draws
depend on nothing that ran before it (evaluation, a resume in a new process); each training item is loaded with a
seed of its place in the epoch (common.data.datasets.SeededItems), whichever worker loads it. A run stopped in the middle
of an epoch saves the generators' states, the batches done and the epoch's loss sums in last.pt; resumed, it
restores those states instead of reseeding and skips the batches done, so it ends with the same weights and
metrics as an uninterrupted run. A checkpoint written at the end of an epoch is resumed by the next epoch's
reseed: its saved generator states are not restored. Preemption signals: common.cluster.preemption.

Loaders: common.training.loaders (built once per fit).
"""
from __future__ import annotations

import itertools
import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from common.cluster import preemption
from common.cluster.distributed import DistContext, agree, mean_over_ranks
from common.cluster.preemption import Preempted
from common.cluster.sync_batchnorm import convert_batchnorm, wants_sync_batchnorm
from common.metric import Metric
from common.tracking.console import epoch_line, lines_above_bars
from common.tracking.tracker import RunFiles, Tracker, use_progress_bars
from common.training.checkpoint import (FORMAT_VERSION, atomic_torch_save, load_trainable_state, rng_state,
                                        set_rng_state, trainable_state)
from common.training.device import batch_size_of, move_to, resolve_channels_last, to_channels_last, to_cpu
from common.training.divergence import BufferSnapshot, NonFiniteLossError, check_at_validation, check_outputs
from common.training.ema import EMA
from common.training.fit_state import FitState, Training, add_sums, read_sums
from common.training.loaders import build_loader, end_workers
from common.training.optim import build_optimizer, build_param_groups, call_target, named_trainable
from common.training.precision import Precision
from common.utils.plain_data import plain_copy
from common.utils.seed import seed_everything

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: Path, tracker: Tracker, ctx: DistContext, trial=None):
        """trial: the sweep trial this run reports each validation to (`report(value, epoch) -> stop?`, e.g.
        sweeps.pruning.JobTrial), or None outside a sweep."""
        self.cfg, self.t, self.trial = cfg, cfg.trainer, trial
        self.run_dir, self.ckpt_dir = Path(run_dir), Path(run_dir) / "checkpoints"
        self.tracker, self.ctx, self.device = tracker, ctx, ctx.device
        self.files = RunFiles(run_dir, self.t.get("monitor"), redraw=cfg.get("curves") == "epoch") \
            if ctx.is_main else None
        self.precision = Precision(self.t.precision, self.device)
        self.bars = use_progress_bars(self.t.progress) and ctx.is_main
        self.training: Training | None = None      # set once, by prepare (fit calls it)

    def autocast(self):
        return self.precision.autocast()

    # ---- loaders ---------------------------------------------------------------------------
    def loader(self, dataset: Dataset, collate: Callable, train: bool, epoch: int = 0,
               skip_batches: int = 0, weights=None, persistent: bool = False) -> DataLoader:
        """This run's loader of `dataset` (common.training.loaders.build_loader)."""
        return build_loader(self.cfg, self.ctx, dataset, collate, train, epoch=epoch, skip_batches=skip_batches,
                            weights=weights, persistent=persistent)

    # ---- set-up ----------------------------------------------------------------------------
    def _learning_rates(self) -> dict[str, float | None]:
        return {"head": self.t.optim.lr, "uw": self.t.optim.uw_lr,
                "adapter": OmegaConf.select(self.cfg, "peft.lr"),
                "backbone": OmegaConf.select(self.cfg, "backbone.lr")}

    def place(self, model: nn.Module) -> nn.Module:
        """The model on the device, its convolution weights channels_last when trainer.channels_last says so."""
        model.to(self.device)
        if resolve_channels_last(self.t.channels_last, self.device):
            to_channels_last(model)
        return model

    def prepare(self, model: nn.Module, criterion: nn.Module, steps_per_epoch: int) -> Training:
        """Place the model and criterion, build the parameter groups, optimiser, schedule and EMA, compile and wrap
        for DDP as the trainer config says; once per Trainer (fit calls it)."""
        if self.training is not None:
            raise RuntimeError("Trainer.prepare was already called: a Trainer trains one model; make a new one")
        if wants_sync_batchnorm(self.t.sync_batchnorm, self.ctx.world_size):
            convert_batchnorm(model)     # same tensors: before EMA, the optimiser, compile and DDP see them
        self.place(model)            # before EMA copies, the optimizer and torch.compile see the weights
        criterion.to(self.device)
        backbone = getattr(model, "backbone", None)
        groups = build_param_groups(named_trainable(model, criterion), self._learning_rates(),
                                    weight_decay=self.t.optim.weight_decay,
                                    layer_decay=OmegaConf.select(self.cfg, "peft.layer_decay") or 1.0,
                                    num_blocks=getattr(backbone, "num_blocks", 1),
                                    block_of=getattr(backbone, "block_of", None),
                                    uw_weight_decay=self.t.optim.uw_weight_decay,
                                    decay_1d=bool(self.t.optim.decay_1d))
        optimizer = build_optimizer(self.t.optim, groups, self.device)
        schedule = call_target(self.t.schedule, "trainer.schedule", steps_per_epoch=steps_per_epoch,
                               max_epochs=int(self.t.max_epochs))
        ema = EMA(model, self.t.ema.decay) if self.t.ema.enabled else None
        train_model = model
        if self.t.compile:
            train_model.compile()
        if self.ctx.enabled:
            if self.t.pcgrad.enabled:
                raise ValueError("trainer.pcgrad with DDP is not supported: per-term gradients bypass DDP's "
                                 "all-reduce; run PCGrad on one process")
            ids = [self.device.index] if self.device.type == "cuda" else None
            train_model = DistributedDataParallel(model, device_ids=ids)
        self.training = Training(model, criterion, train_model, optimizer, schedule, ema, steps_per_epoch)
        return self.training

    def _steps_per_epoch(self, loader: DataLoader) -> int:
        batches = len(loader)
        if self.t.limit_train_batches:
            batches = min(batches, int(self.t.limit_train_batches))
        accumulate = int(self.t.accumulate_grad_batches)
        if batches < accumulate:
            raise ValueError(f"trainer.accumulate_grad_batches={accumulate} is more than the {batches} training "
                             f"batches of an epoch (data.batch_size, trainer.limit_train_batches): no optimiser "
                             f"step would ever run; use at most {batches}")
        return batches // accumulate

    # ---- checkpoints -----------------------------------------------------------------------
    def _payload(self, state: FitState, task_name: str, stats: dict) -> dict:
        """rng: read back only by a resume in the middle of an epoch (_resume)."""
        tr = self.training
        return {"format": FORMAT_VERSION, "task": task_name, "epoch": state.epoch, "step": state.step,
                "model": trainable_state(tr.model), "criterion": trainable_state(tr.criterion),
                "optimizer": tr.optimizer.state_dict(), "ema": tr.ema.state_dict() if tr.ema else None,
                "grad_scaler": self.precision.state_dict(),
                "rng": rng_state(), "config": OmegaConf.to_container(self.cfg, resolve=True),
                "stats": stats, "fit_state": plain_copy(vars(state), "fit_state", "the trainer's state")}   # loads back

    def _save(self, name: str, payload: dict) -> None:
        if self.ctx.is_main:
            self._export_peft_adapter(name, payload)
            atomic_torch_save(payload, self.ckpt_dir / name)

    def _export_peft_adapter(self, name: str, payload: dict) -> None:
        """Backbone adapters injected by peft also go beside the checkpoint, in peft's own format
        (`<checkpoint stem>_adapter/`, EMA weights when EMA is on); the checkpoint names that folder."""
        model, ema = self.training.model, self.training.ema
        backbone = getattr(model, "backbone", None)
        if "default" not in getattr(getattr(backbone, "model", None), "peft_config", {}):
            return
        from common.models.adapters import save_peft_adapter
        with ema.applied(model) if ema is not None else nullcontext():
            payload["peft_adapter"] = save_peft_adapter(backbone, self.ckpt_dir / f"{Path(name).stem}_adapter").name

    def _initial_state(self, task_name: str) -> FitState:
        """trainer.resume: auto continues from <run dir>/checkpoints/last.pt when it exists (a requeued job, a
        rerun into the same hydra.run.dir); true does too and says when there is none; false starts afresh."""
        if self.t.resume not in ("auto", True, False):
            raise ValueError(f"trainer.resume={self.t.resume!r}: expected auto, true or false")
        path = self.ckpt_dir / "last.pt"
        if self.t.resume is True and not path.is_file():
            log.info(f"[trainer] resume requested but {path} does not exist yet: starting from scratch")
        if self.t.resume is False or not path.is_file():
            return FitState()
        return self._resume(path, task_name)

    def _resume(self, path: Path, task_name: str) -> FitState:
        from common.training.checkpoint import load_checkpoint
        ckpt, tr = load_checkpoint(path, task_name), self.training
        load_trainable_state(tr.model, ckpt["model"], str(path))
        load_trainable_state(tr.criterion, ckpt["criterion"], str(path))
        tr.optimizer.load_state_dict(ckpt["optimizer"])
        self.precision.load_state_dict(ckpt.get("grad_scaler"))
        if tr.ema is not None and ckpt["ema"] is not None:
            tr.ema.load_state_dict(ckpt["ema"])
        state = FitState(**ckpt["fit_state"])
        if state.batches_done:           # stopped mid-epoch: its draws go on; a new epoch reseeds instead (_epochs)
            set_rng_state(ckpt["rng"])
        log.info(f"[trainer] resumed from {path} at epoch {state.epoch} batch {state.batches_done}")
        return state

    # ---- one optimisation step -------------------------------------------------------------
    def _backward(self, terms: dict[str, torch.Tensor], scale: float) -> dict[str, float]:
        """Gradients of the summed terms; with PCGrad, its counts (conflicts, pairs) for this micro-batch."""
        if not self.t.pcgrad.enabled:
            self.precision.scale(sum(terms.values()) * scale).backward()
            return {}
        from common.training.mtl import pcgrad_backward
        wanted, param_groups = set(self.t.pcgrad.groups), self.training.optimizer.param_groups
        projected = [p for g in param_groups if g["tag"] in wanted for p in g["params"]]
        others = [p for g in param_groups if g["tag"] not in wanted for p in g["params"]]
        scaled = {k: self.precision.scale(v * scale) for k, v in terms.items()}   # PCGrad's projection is linear
        return pcgrad_backward(scaled, projected, mode=self.t.pcgrad.mode,
                               primary=list(self.t.pcgrad.primary) or None, other_params=others)

    def _optimizer_step(self, state: FitState, finite: torch.Tensor) -> bool:
        """Unscale (fp16), clip, step, update EMA. Returns False (step skipped) when a micro-batch's loss (`finite`,
        on the device) or the gradients are not finite: the step's one read of the device. Under fp16, non-finite
        gradients of a finite loss are the grad scaler's overflow, which lowers the scale and is not counted as
        divergence."""
        tr = self.training
        self.precision.unscale_(tr.optimizer)
        params = [p for g in tr.optimizer.param_groups for p in g["params"] if p.grad is not None]
        clip = self.t.grad_clip if self.t.grad_clip else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, clip) if params else torch.zeros((), device=finite.device)
        if not bool(finite & torch.isfinite(norm)):
            loss_finite = bool(finite)
            overflow = self.precision.overflowed()     # the scaler lowers its scale (fp16); False without one
            if not (loss_finite and overflow):
                self._count_nonfinite(state, "gradient norm" if loss_finite else "loss")
            tr.optimizer.zero_grad(set_to_none=True)
            return False
        tr.schedule.apply(tr.optimizer, state.step)
        self.precision.step(tr.optimizer)
        tr.optimizer.zero_grad(set_to_none=True)
        if tr.ema is not None:
            tr.ema.update(tr.model)
        state.step += 1
        return True

    def _count_nonfinite(self, state: FitState, what: str) -> None:
        state.nonfinite_steps += 1
        log.warning(f"[trainer] non-finite {what} at step {state.step}: step skipped "
                    f"({state.nonfinite_steps}/{self.t.max_nonfinite_steps})")
        if state.nonfinite_steps > int(self.t.max_nonfinite_steps):
            raise NonFiniteLossError(
                f"non-finite {what} at step {state.step}, {state.nonfinite_steps} such optimiser steps (limit "
                f"trainer.max_nonfinite_steps={self.t.max_nonfinite_steps}); the run diverged: lower the "
                f"learning rate, enable trainer.grad_clip, or check the data for NaN inputs")

    # ---- epochs ----------------------------------------------------------------------------
    def train_epoch(self, batches: Iterable, state: FitState) -> dict:
        """Train the epoch's remaining batches (of `batches`, the epoch's loader: steps_per_epoch optimiser steps
        of accumulate_grad_batches micro-batches, less state.batches_done), after prepare; returns the epoch's
        train/ record. Raises Preempted at the first optimiser step after a signal, with state.batches_done and
        state.epoch_sums saying how far the epoch got."""
        tr = self.training
        if tr is None:
            raise RuntimeError("Trainer.train_epoch before Trainer.prepare: nothing to train yet")
        tr.train_model.train()
        tr.criterion.train()
        accum = int(self.t.accumulate_grad_batches)
        total = tr.steps_per_epoch * accum
        sums = dict(state.epoch_sums)          # on the device while the epoch runs; state keeps numbers (last.pt)
        pcgrad_counts: dict[str, torch.Tensor | float] = {}   # summed over the epoch's micro-batches, logged with it
        seen, finite, start = 0, None, time.perf_counter()
        last_loss = None                       # the last stepped loss (on the device), for the Diverged message
        buffers = BufferSnapshot(tr.model)     # a skipped step's forward passes must not move running statistics
        bar = tqdm(total=total - state.batches_done, desc=f"epoch {state.epoch}", leave=False, disable=not self.bars)
        for batch in itertools.islice(batches, max(total - state.batches_done, 0)):
            batch = move_to(batch, self.device)
            if state.batches_done % accum == 0:
                buffers.take()
            with self.autocast():
                outputs = tr.train_model(batch)
                terms = tr.criterion(outputs, batch)
            loss = sum(terms.values())
            # kept on the device: the step reads it once, with the gradient norm (_optimizer_step)
            batch_finite = torch.isfinite(loss.detach())
            finite = batch_finite if finite is None else finite & batch_finite
            for key, value in self._backward(terms, 1.0 / accum).items():   # a non-finite batch's counts: 0
                pcgrad_counts[key] = pcgrad_counts.get(key, 0.0) + torch.where(batch_finite, value, 0.0)
            add_sums(sums, self.device, {"loss": loss, **terms})
            seen += batch_size_of(batch)
            bar.update(1)
            state.batches_done += 1
            if state.batches_done % accum == 0:
                if self._finish_accumulation(state, finite, {k: v.detach() for k, v in terms.items()}):
                    last_loss, state.last_finite_step = loss.detach(), state.step - 1
                else:
                    buffers.restore()
                finite = None
                signum = preemption.agreed(self.ctx)
                if signum is not None:
                    state.epoch_sums = read_sums(sums)
                    state.record_last_loss(last_loss)
                    raise Preempted(signum)
        bar.close()
        state.epoch_sums = read_sums(sums)     # a signal during validation saves them in last.pt
        state.record_last_loss(last_loss)
        seconds = time.perf_counter() - start
        record = {f"train/{k}": v / max(1, state.batches_done)
                  for k, v in mean_over_ranks(self.ctx, state.epoch_sums).items()}
        record.update({"train/seconds": seconds, "train/samples_per_s": seen / max(seconds, 1e-9)})
        record.update({f"train/{k}": float(v) for k, v in pcgrad_counts.items()})
        epoch_log = getattr(tr.criterion, "epoch_log", None)   # e.g. uncertainty-weighting log-variances
        if epoch_log is not None:
            record.update({f"train/{k}": v for k, v in epoch_log().items()})
        return record

    def _finish_accumulation(self, state: FitState, finite: torch.Tensor, terms: dict[str, torch.Tensor]) -> bool:
        """finite: whether every micro-batch's loss was finite (on the device). Whether the optimiser stepped
        (False: the step was skipped as non-finite)."""
        stepped = self._optimizer_step(state, finite)
        if stepped and state.step % int(self.t.log_every_n_steps) == 0:
            values = {k: float(v) for k, v in terms.items()}
            lrs = {f"lr/{g['tag']}": g["lr"] for g in self.training.optimizer.param_groups}
            self.tracker.log_metrics({"train/loss_step": sum(values.values()),   # epoch means: train/loss
                                      **{f"train/{k}_step": v for k, v in values.items()}, **lrs}, state.step)
        return stepped

    @torch.no_grad()
    def evaluate(self, model: nn.Module, criterion: nn.Module | None, metric: Metric, dataset: Dataset,
                 collate: Callable, limit: int | None = None, on_first_batch: Callable | None = None,
                 check: Callable[[dict], None] | None = None, loader: DataLoader | None = None) -> dict:
        """Metric values (no prefix) plus the mean loss when a criterion is given; `check(outputs)` sees every
        batch's outputs before the metric does (fit: Diverged on non-finite outputs). loader: the batches of
        `dataset` (fit's, built once); None builds one."""
        model.eval()
        metric.reset()
        loss_sum, items = 0.0, 0                           # val/loss: the mean over items, on every rank count
        trained = self.training is not None and model is self.training.model
        if not trained:                                    # the training model was placed by prepare
            self.place(model)
        ema = self.training.ema if trained else None
        with ema.applied(model) if ema is not None else nullcontext():
            for i, batch in enumerate(loader if loader is not None else self.loader(dataset, collate, train=False)):
                if limit and i >= limit:
                    break
                self._check_preemption()
                batch = move_to(batch, self.device)
                with self.autocast():
                    outputs = model(batch)
                    if criterion is not None:
                        loss_sum += float(sum(criterion(outputs, batch).values())) * batch_size_of(batch)
                items += batch_size_of(batch)
                outputs = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                           for k, v in outputs.items()}
                if check is not None:
                    check(outputs)
                metric.update(outputs, batch)
                if i == 0 and on_first_batch is not None:
                    on_first_batch(to_cpu(outputs), batch)
        values = metric.compute()
        if criterion is not None:
            totals = torch.tensor([loss_sum, float(items)], dtype=torch.float64, device=self.device)
            if self.ctx.enabled:
                torch.distributed.all_reduce(totals)
            values["loss"] = float(totals[0] / totals[1].clamp(min=1))
        return values

    @torch.no_grad()
    def infer(self, model: nn.Module, dataset: Dataset, collate: Callable) -> Iterator[tuple[dict, dict]]:
        """(outputs on the CPU, batch) pairs in dataset order, for writing predictions."""
        self.place(model).eval()
        for batch in tqdm(self.loader(dataset, collate, train=False), desc="predict", disable=not self.bars):
            self._check_preemption()
            device_batch = move_to(batch, self.device)
            with self.autocast():
                outputs = model(device_batch)
            yield to_cpu(outputs), batch

    def _check_preemption(self) -> None:
        """Evaluation and prediction stop at a signal too (one process; DDP ranks hold unequal shards, so they
        agree only at training steps)."""
        if not self.ctx.enabled:
            preemption.check()

    # ---- the fit loop ----------------------------------------------------------------------
    def _improved(self, value: float, state: FitState) -> bool:
        if value is None or not math.isfinite(value):
            return False
        if state.best_value is None:
            return True
        if self.t.monitor_direction == "maximize":
            return value > state.best_value
        return value < state.best_value

    def fit(self, task, model: nn.Module, criterion: nn.Module, metric: Metric, train_set: Dataset,
            val_set: Dataset, stats: dict, sample_weights=None) -> FitState:
        """sample_weights: one per training item (common.data.datasets.sample_weights_of), or None to shuffle."""
        loaders = (self.loader(train_set, task.collate, train=True, weights=sample_weights, persistent=True),
                   self.loader(val_set, task.collate, train=False, persistent=True))    # once per fit
        self.prepare(model, criterion, self._steps_per_epoch(loaders[0]))
        state = self._initial_state(task.name)
        monitor_key = str(self.t.monitor).split("/", 1)[-1]
        end = int(self.t.max_epochs)
        if self.t.epochs_per_run:
            end = min(end, state.epoch + int(self.t.epochs_per_run))
        try:
            with lines_above_bars(self.bars):
                self._epochs(task, metric, loaders, val_set, stats, state, end, monitor_key)
        except Preempted as stop:
            self._save_preempted(stop, state, task.name, stats)
            raise
        finally:
            for loader in loaders:
                end_workers(loader)
        return state

    def _save_preempted(self, stop: Preempted, state: FitState, task_name: str, stats: dict) -> None:
        """last.pt where the run stopped (the caller ends the process: common.cluster.preemption.stop)."""
        self._save("last.pt", self._payload(state, task_name, stats))
        log.warning(f"[trainer] {stop}: wrote {self.ckpt_dir / 'last.pt'} at epoch {state.epoch} batch "
                    f"{state.batches_done}; the same command (same run directory) continues from there")

    def _epochs(self, task, metric, loaders: tuple[DataLoader, DataLoader], val_set, stats, state: FitState,
                end: int, monitor_key: str) -> None:
        """loaders: (training, validation), built once; each epoch sets the training sampler's epoch."""
        if self._should_stop(state):       # resumed after early stopping: nothing left to train
            return
        tr = self.training
        epochs = tqdm(range(state.epoch, end), desc="epochs", disable=not self.bars)
        for epoch in epochs:
            started = time.perf_counter()
            if state.batches_done == 0:     # a new epoch; resumed mid-epoch, the generators _resume restored go on
                seed_everything(int(self.cfg.seed) + epoch + 1000 * self.ctx.rank)
            train_loader, val_loader = loaders
            train_loader.sampler.set_epoch(epoch, start=state.batches_done * int(self.cfg.data.batch_size))
            record = {"epoch": epoch, **self.train_epoch(train_loader, state)}
            check_at_validation(tr.model, state)
            media = (lambda out, b: task.log_media(self.tracker, out, b, stats, state.step)) \
                if self.ctx.is_main else None
            val = self.evaluate(tr.model, tr.criterion, metric, val_set, task.collate,
                                limit=self.t.limit_val_batches, on_first_batch=media,
                                check=lambda outputs: check_outputs(outputs, state), loader=val_loader)
            task.on_validation_end(tr.model, val)
            record.update({f"val/{k}": v for k, v in val.items()})
            record.update({"step": state.step, **{f"lr/{g['tag']}": g["lr"] for g in tr.optimizer.param_groups}})
            record["epoch_seconds"] = time.perf_counter() - started
            state.epoch, state.last_metrics = epoch + 1, record
            state.batches_done, state.epoch_sums = 0, {}
            if self._improved(val.get(monitor_key), state):
                state.best_value, state.best_epoch, state.best_metrics = val[monitor_key], epoch, record
                state.epochs_without_improvement = 0
                self._save("best.pt", self._payload(state, task.name, stats))
            else:
                state.epochs_without_improvement += 1
            self._report_to_trial(val.get(monitor_key), epoch, state)
            self._save("last.pt", self._payload(state, task.name, stats))
            self._report_epoch(record, state, monitor_key)
            if self._should_stop(state):
                break

    def _report_epoch(self, record: dict, state: FitState, monitor_key: str) -> None:
        if self.files is not None:
            self.files.append_epoch(record)
        self.tracker.log_metrics(record, state.step)
        if self.ctx.is_main and self.t.progress != "off":
            log.info(epoch_line(record, int(self.t.max_epochs), monitor_key, state.best_value, state.best_epoch))

    def _report_to_trial(self, value, epoch: int, state: FitState) -> None:
        """Report the monitored value to the sweep's trial; its pruner may stop the run here (the main process
        decides, every process follows)."""
        if self.trial is None:
            return
        prune = agree(self.ctx, self.trial.report(value, epoch) if self.ctx.is_main else False)
        if prune:
            state.pruned_epoch, state.pruned_value = epoch, value

    def _should_stop(self, state: FitState) -> bool:
        if state.pruned_epoch is not None:
            log.info(f"[trainer] stopped by the sweep's pruner after epoch {state.pruned_epoch}")
            return True
        patience = self.t.early_stopping_patience
        if patience is not None and int(patience) < 1:
            raise ValueError(f"trainer.early_stopping_patience={patience}: expected epochs >= 1 without improvement "
                             f"before stopping, or null to train every epoch")
        if patience is not None and state.epochs_without_improvement >= int(patience):
            log.info(f"[trainer] early stopping: no improvement of {self.t.monitor} for {patience} epochs")
            return True
        return False
