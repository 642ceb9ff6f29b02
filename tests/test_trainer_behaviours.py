"""Trainer behaviours on tiny in-process models (common/training/trainer.py), each against a hand computation or an
independent run: gradient accumulation, the lr schedule counted in optimiser steps, early stopping and a resume
after it, PCGrad through the trainer, checkpoint vs command-line config at eval / predict (config_from_checkpoint),
and evaluation sharded over two gloo processes."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import Dataset

from common.cluster.distributed import DistContext
from common.data.datasets import default_collate
from common.inference import predictor as inference
from common.metric import Metric
from common.tracking.tracker import Tracker
from common.training.trainer import Trainer
from tests.tolerance import assert_close_reordered, reduction_rtol

ADAM_EPS = 1e-8          # torch.optim.AdamW's default, which common.training.optim.build_optimizer keeps


# ---- tiny parts -----------------------------------------------------------------------------------
class Items(Dataset):
    """Columns of tensors as dict items, plus the item's index as "id"."""

    def __init__(self, **columns):
        self.columns = columns

    def __len__(self):
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i):
        return {**{k: v[i] for k, v in self.columns.items()}, "id": i}


class LinearModel(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.head = nn.Linear(d, 1)

    def forward(self, batch):
        return {"pred": self.head(batch["x"]).squeeze(1)}


class MSE(nn.Module):
    """Mean squared error; remembers each training micro-batch's loss and item ids (Trainer.evaluate leaves the
    criterion in training mode, under no_grad)."""

    def __init__(self):
        super().__init__()
        self.losses, self.ids = [], []

    def forward(self, outputs, batch):
        loss = ((outputs["pred"] - batch["y"]) ** 2).mean()
        if self.training and torch.is_grad_enabled():
            self.losses.append(float(loss.detach()))
            self.ids.append(batch["id"].tolist())
        return {"mse": loss}


class NegMSE(Metric):
    def update(self, outputs, batch):
        self.add(pred=outputs["pred"], y=batch["y"])

    def compute(self):
        g = self.gathered()
        return {"neg_mse": -float(np.mean((g["pred"] - g["y"]) ** 2))}


class Scripted(Metric):
    """compute() returns the next value of a fixed sequence as "score"."""

    def __init__(self, values):
        super().__init__()
        self.values, self.calls = list(values), 0

    def update(self, outputs, batch):
        pass

    def compute(self):
        self.calls += 1
        return {"score": self.values[self.calls - 1]}


class Recorder(Tracker):
    def __init__(self):
        self.logged = []

    def log_metrics(self, metrics, step):
        self.logged.append((dict(metrics), step))


def _cfg(tmp_path, values: dict):
    """The toy task's composed config (tests.test_resume._config: CPU, no bars), grad_clip off, then `values`."""
    from tests.test_resume import _config
    cfg = _config(tmp_path, 0)
    for key, value in {"trainer.grad_clip": None, **values}.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def _named(model, criterion):
    return [(f"model.{n}", p) for n, p in model.named_parameters()] + \
           [(f"criterion.{n}", p) for n, p in criterion.named_parameters()]


def _spy_steps(trainer, model, criterion) -> list[dict]:
    """The gradient handed to each optimiser step (before clipping), by parameter name."""
    grads, original, named = [], trainer._optimizer_step, _named(model, criterion)

    def step(state, finite):
        grads.append({n: p.grad.detach().clone() for n, p in named if p.grad is not None})
        return original(state, finite)

    trainer._optimizer_step = step
    return grads


def _fit(cfg, run_dir, model, criterion, metric, train, val, tracker=None):
    from tests.toy.task import ToyTask
    trainer = Trainer(cfg, run_dir, tracker or Tracker(), DistContext())
    grads = _spy_steps(trainer, model, criterion)
    state = trainer.fit(ToyTask(cfg), model, criterion, metric, train, val, {})
    return trainer, state, grads


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---- 1. gradient accumulation ---------------------------------------------------------------------
def test_accumulated_micro_batches_step_like_one_batch_of_their_union(tmp_path):
    """2 micro-batches of 4 accumulated hand the optimiser the gradient of the mean loss over their 8 items
    (computed here by autograd), and leave the same weights as one batch of 8 (an independent run)."""
    d = 5
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, d, generator=gen), torch.randn(16, generator=gen)
    train, val = Items(x=x, y=y), Items(x=x[:4], y=y[:4])
    torch.manual_seed(0)
    initial = LinearModel(d)
    runs = {}
    for name, batch_size, accum in (("micro", 4, 2), ("whole", 8, 1)):
        cfg = _cfg(tmp_path, {"data.batch_size": batch_size, "trainer.accumulate_grad_batches": accum,
                              "trainer.limit_train_batches": 8 // batch_size, "trainer.max_epochs": 1})
        model, criterion = copy.deepcopy(initial), MSE()
        trainer, state, grads = _fit(cfg, tmp_path / name, model, criterion, NegMSE(), train, val)
        assert trainer.training.steps_per_epoch == 1 and state.step == 1 and len(grads) == 1
        assert len(criterion.ids) == accum
        runs[name] = model, criterion, grads[0]
    ids = sum(runs["micro"][1].ids, [])
    assert sorted(ids) == sorted(sum(runs["whole"][1].ids, []))      # the same 8 items of the epoch's order
    reference = copy.deepcopy(initial)
    ((reference.head(x[ids]).squeeze(1) - y[ids]) ** 2).mean().backward()
    n = len(ids) * d
    for pname, param in reference.named_parameters():
        for run in ("micro", "whole"):
            assert_close_reordered(runs[run][2][f"model.{pname}"], param.grad, n)
    for (pname, a), b in zip(runs["micro"][0].named_parameters(), runs["whole"][0].parameters()):
        assert not torch.equal(a, dict(initial.named_parameters())[pname])           # a step was taken
        assert_close_reordered(a.detach(), b.detach(), n)


@pytest.mark.parametrize("schedule, factors", [
    ({"trainer.schedule.warmup_steps": 1}, [1 / 2, 1.0, 3 / 4, 1 / 4]),
    ({"trainer.schedule.warmup_epochs": 1.0}, [1 / 3, 2 / 3, 1.0, 1 / 2]),       # 1 epoch = 2 optimiser steps
], ids=["warmup_steps", "warmup_epochs"])
def test_steps_per_epoch_and_lr_schedule_count_optimiser_steps(tmp_path, schedule, factors):
    """28 items in batches of 4 = 7 batches, accumulated 3 at a time: floor(7 / 3) = 2 optimiser steps per epoch
    on 6 micro-batches (the 7th is not trained), 4 steps in 2 epochs; the cosine schedule (floor 0) runs over those
    4 steps, warmup (s + 1) / (w + 1), then 0.5 (1 + cos(pi t / (4 - w))), as computed by hand in `factors`."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(28, 3, generator=gen), torch.randn(28, generator=gen)
    lr = 1e-3
    cfg = _cfg(tmp_path, {"data.batch_size": 4, "trainer.accumulate_grad_batches": 3, "trainer.max_epochs": 2,
                          "trainer.optim.lr": lr, "trainer.schedule.name": "cosine",
                          "trainer.schedule.min_lr_ratio": 0.0, "trainer.log_every_n_steps": 1, **schedule})
    torch.manual_seed(0)
    criterion, tracker = MSE(), Recorder()
    trainer, state, grads = _fit(cfg, tmp_path / "run", LinearModel(3), criterion, NegMSE(), Items(x=x, y=y),
                                 Items(x=x[:4], y=y[:4]), tracker)
    assert trainer.training.steps_per_epoch == 7 // 3 == 2
    assert state.step == len(grads) == 4 and len(criterion.losses) == 2 * 6
    step_logs = [(m, s) for m, s in tracker.logged if "train/loss_step" in m]
    assert [s for _, s in step_logs] == [1, 2, 3, 4]
    for (metrics, _), factor in zip(step_logs, factors):
        assert metrics["lr/head"] == pytest.approx(lr * factor, rel=1e-12)
    records = _records(tmp_path / "run")
    assert [r["step"] for r in records] == [2, 4]
    for epoch, record in enumerate(records):          # the epoch's mean over the micro-batches it trained
        assert record["train/loss"] == pytest.approx(np.mean(criterion.losses[6 * epoch:6 * epoch + 6]), rel=1e-12)
        assert record["lr/head"] == pytest.approx(lr * factors[2 * epoch + 1], rel=1e-12)


def test_accumulation_over_more_batches_than_an_epoch_has_is_refused(tmp_path):
    """12 items in batches of 4 = 3 batches, accumulate_grad_batches=4: no optimiser step would ever run, so the
    trainer refuses before training, naming the setting and the most it can be."""
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(12, 3, generator=gen), torch.randn(12, generator=gen)
    cfg = _cfg(tmp_path, {"data.batch_size": 4, "trainer.accumulate_grad_batches": 4, "trainer.max_epochs": 2})
    torch.manual_seed(0)
    model = LinearModel(3)
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match=r"accumulate_grad_batches=4 is more than the 3 training batches.*at most 3"):
        _fit(cfg, tmp_path / "run", model, MSE(), NegMSE(), Items(x=x, y=y), Items(x=x[:4], y=y[:4]))
    assert torch.equal(model.head.weight, before.head.weight)


# ---- 2. early stopping ------------------------------------------------------------------------------
@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_early_stopping_after_patience_epochs_and_resume_trains_nothing(tmp_path, direction):
    """Scores 0.1, 0.5 (best), 0.4, 0.5 (equal: no improvement), 0.3 with patience 3: epochs 0-4 run, epoch 5
    (which would have improved) does not; a resume in the same run directory trains and evaluates nothing."""
    sign = 1.0 if direction == "maximize" else -1.0
    scores = [sign * v for v in (0.1, 0.5, 0.4, 0.5, 0.3, 0.9, 0.9, 0.9, 0.9, 0.9)]
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 3, generator=gen), torch.randn(8, generator=gen)
    train, val = Items(x=x, y=y), Items(x=x[:4], y=y[:4])
    cfg = _cfg(tmp_path, {"data.batch_size": 4, "trainer.max_epochs": 10, "trainer.early_stopping_patience": 3,
                          "trainer.monitor": "val/score", "trainer.monitor_direction": direction})
    run_dir = tmp_path / "run"
    metric = Scripted(scores)
    _, state, _ = _fit(cfg, run_dir, LinearModel(3), MSE(), metric, train, val)
    assert metric.calls == 5 and state.epoch == 5 and state.epochs_without_improvement == 3
    assert state.best_epoch == 1 and state.best_value == sign * 0.5
    records = _records(run_dir)
    assert [r["epoch"] for r in records] == [0, 1, 2, 3, 4]
    assert [r["val/score"] for r in records] == scores[:5]
    best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    assert best["epoch"] == 2 and best["fit_state"]["best_epoch"] == 1
    last_bytes = (run_dir / "checkpoints" / "last.pt").read_bytes()

    resumed_metric, criterion = Scripted([sign * 10.0] * 10), MSE()
    _, resumed, grads = _fit(cfg, run_dir, LinearModel(3), criterion, resumed_metric, train, val)
    assert resumed.epoch == 5 and resumed.best_epoch == 1 and resumed.step == state.step
    assert resumed_metric.calls == 0 and criterion.losses == [] and grads == []
    assert len(_records(run_dir)) == 5
    assert (run_dir / "checkpoints" / "last.pt").read_bytes() == last_bytes


def test_early_stopping_patience_below_one_is_refused(tmp_path):
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 3, generator=gen), torch.randn(8, generator=gen)
    cfg = _cfg(tmp_path, {"data.batch_size": 4, "trainer.max_epochs": 2, "trainer.early_stopping_patience": 0})
    with pytest.raises(ValueError, match=r"early_stopping_patience=0: expected epochs >= 1.*or null"):
        _fit(cfg, tmp_path / "run", LinearModel(3), MSE(), NegMSE(), Items(x=x, y=y), Items(x=x[:4], y=y[:4]))


# ---- 3. PCGrad through the trainer ----------------------------------------------------------------
class TwoHeads(nn.Module):
    """pred_a = s * <w, x>, pred_b = s * <w, z>: w under `head` (tag head), s under `backbone` (tag backbone)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3, 1, bias=False)
        self.backbone = nn.Module()
        self.backbone.scale = nn.Parameter(torch.tensor(1.0))
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[0.5, -0.2, 0.1]]))

    def forward(self, batch):
        s = self.backbone.scale
        return {"a": s * self.head(batch["x"]).squeeze(1), "b": s * self.head(batch["z"]).squeeze(1)}


class TwoTerms(nn.Module):
    """a = mse(pred_a, ya); b = exp(log_w) * mse(pred_b, yb), log_w a criterion parameter (tag uw)."""

    def __init__(self):
        super().__init__()
        self.log_w = nn.Parameter(torch.tensor(0.0))

    def forward(self, outputs, batch):
        return {"a": ((outputs["a"] - batch["ya"]) ** 2).mean(),
                "b": self.log_w.exp() * ((outputs["b"] - batch["yb"]) ** 2).mean()}


def _conflicting_items(n=6):
    gen = torch.Generator().manual_seed(4)
    x = torch.tensor([1.0, 0.3, 0.0]) + 0.1 * torch.randn(n, 3, generator=gen)
    z = torch.tensor([1.0, 0.0, 0.5]) + 0.1 * torch.randn(n, 3, generator=gen)
    return Items(x=x, z=z, ya=torch.full((n,), 3.0), yb=torch.full((n,), -3.0))


def _project(g, onto):
    dot = torch.dot(g, onto)
    return g - dot / onto.dot(onto) * onto if dot < 0 else g


@pytest.mark.parametrize("mode", ["all", "anchored"])
def test_pcgrad_update_equals_the_projection_by_hand(tmp_path, mode):
    """One optimiser step on one batch with terms a and b whose gradients on the head conflict: the head gets
    g_a' + g_b' (all: each projected off the other when their dot product is negative; anchored on a: g_a plus
    g_b projected off g_a), the parameters outside pcgrad.groups (backbone scale, criterion log_w) the plain
    gradient of a + b; the weights after the step are AdamW's first step on those gradients, by hand."""
    lrs = {"model.head.weight": 1e-3, "model.backbone.scale": 1e-2, "criterion.log_w": 3e-2}
    cfg = _cfg(tmp_path, {"data.batch_size": 6, "trainer.max_epochs": 1, "trainer.pcgrad.enabled": True,
                          "trainer.pcgrad.mode": mode, "trainer.pcgrad.primary": ["a"] if mode == "anchored" else [],
                          "trainer.pcgrad.groups": ["head"], "trainer.optim.lr": lrs["model.head.weight"],
                          "backbone.lr": lrs["model.backbone.scale"], "trainer.optim.uw_lr": lrs["criterion.log_w"],
                          "trainer.optim.weight_decay": 0.0, "trainer.optim.uw_weight_decay": 0.0,
                          "trainer.schedule.name": "constant", "trainer.schedule.warmup_steps": 0,
                          "trainer.monitor": "val/score"})
    items = _conflicting_items()
    model, criterion = TwoHeads(), TwoTerms()
    ref_model, ref_criterion = copy.deepcopy(model), copy.deepcopy(criterion)
    initial = {n: p.detach().clone() for n, p in _named(model, criterion)}
    _, state, grads = _fit(cfg, tmp_path / "run", model, criterion, Scripted([0.0]), items, items)
    assert state.step == 1 and len(grads) == 1

    batch = default_collate([items[i] for i in range(len(items))])
    terms = ref_criterion(ref_model(batch), batch)
    w = ref_model.head.weight
    g_a, g_b = (torch.autograd.grad(terms[k], w, retain_graph=True)[0].reshape(-1) for k in ("a", "b"))
    assert torch.dot(g_a, g_b) < 0                                       # the terms do conflict on the head
    if mode == "all":
        head = _project(g_a, g_b) + _project(g_b, g_a)
    else:
        head = g_a + _project(g_b, g_a)
    plain = torch.autograd.grad(terms["a"] + terms["b"], [ref_model.backbone.scale, ref_criterion.log_w])
    expected = {"model.head.weight": head.view_as(w), "model.backbone.scale": plain[0], "criterion.log_w": plain[1]}
    n = len(items) * 3
    assert set(grads[0]) == set(expected)
    for name, grad in expected.items():
        assert_close_reordered(grads[0][name], grad, n)
    for name, param in _named(model, criterion):       # AdamW, step 1, no decay: p - lr * g / (|g| + eps)
        g = expected[name]
        assert_close_reordered(param.detach(), initial[name] - lrs[name] * g / (g.abs() + ADAM_EPS), n)
    record = _records(tmp_path / "run")[0]
    assert record["train/pcgrad/conflicts"] == (2.0 if mode == "all" else 1.0)
    assert record["train/pcgrad/pairs"] == (2.0 if mode == "all" else 1.0)


# ---- 4. checkpoint vs command line at eval / predict ----------------------------------------------
def _checkpoint_and_run(tmp_path, ckpt_overrides, run_overrides):
    """A checkpoint's config (composed from `ckpt_overrides`), then this run's, composed the way Hydra runs a job
    (HydraConfig set, so inference._command_line_data_keys reads `run_overrides`)."""
    from tests.cli import TOY
    from tests.test_tracking import _compose
    ckpt_cfg = OmegaConf.to_container(_compose([*TOY, *ckpt_overrides], tmp_path / "ckpt"), resolve=True)
    return {"config": ckpt_cfg}, _compose([*TOY, *run_overrides], tmp_path / "run")


def test_eval_config_takes_the_network_from_the_checkpoint_and_data_from_the_command_line(tmp_path):
    """config_from_checkpoint: backbone / model / task from the checkpoint even where this run's
    command line says otherwise (a model width, dropout); data is the checkpoint's, with data.root always this
    run's and every data.* given on the command line replacing the checkpoint's; trainer stays this run's."""
    ckpt, cfg = _checkpoint_and_run(
        tmp_path, ["model.dropout=0.3", "trainer.max_epochs=7", "data.batch_size=2", "data.num_workers=3",
                   "data.root=/ckpt/data", "trainer.optim.lr=0.25"],
        ["model.dropout=0.0", "backbone.model_kwargs.embed_dim=32", "trainer.max_epochs=9", "data.batch_size=16",
         "trainer.optim.lr=0.5"])
    assert inference._command_line_data_keys() == ["batch_size"]
    merged = inference.config_from_checkpoint(cfg, ckpt)
    assert cfg.backbone.model_kwargs.embed_dim == 32 and merged.backbone.model_kwargs.embed_dim == 64
    assert merged.model.dropout == 0.3 and merged.trainer.max_epochs == 9   # trainer: this run's
    assert merged.data.batch_size == 16                    # given on the command line
    assert merged.data.num_workers == 3                    # the checkpoint's: 0 is this run's default, not given
    assert merged.data.root is None                        # this run's (unset: synthetic), not /ckpt/data
    assert merged.trainer.optim.lr == 0.5

    ckpt, cfg = _checkpoint_and_run(tmp_path, ["data.root=/ckpt/data"], ["data.root=/run/data"])
    assert inference.config_from_checkpoint(cfg, ckpt).data.root == "/run/data"


@pytest.mark.parametrize("override, key", [("+data.threshold=1e-3", "threshold"),
                                           ("+data.encodings={MOBIUS:sip}", "encodings"),
                                           ("+data.flag=on", "flag")], ids=["float", "mapping", "string"])
def test_command_line_data_values_keep_hydras_meaning(tmp_path, override, key):
    ckpt, cfg = _checkpoint_and_run(tmp_path, [], [override])
    merged = inference.config_from_checkpoint(cfg, ckpt)
    assert OmegaConf.to_container(merged.data)[key] == OmegaConf.to_container(cfg.data)[key]


def test_a_data_key_deleted_on_the_command_line_is_deleted_from_the_checkpoints(tmp_path):
    ckpt, cfg = _checkpoint_and_run(tmp_path, ["data.num_workers=3"], ["~data.num_workers"])
    assert "num_workers" in ckpt["config"]["data"]
    assert "num_workers" not in inference.config_from_checkpoint(cfg, ckpt).data


# ---- 5. evaluation sharded over DDP processes -----------------------------------------------------
class Tally(Metric):
    """Which items were scored (sorted ids) and their mean squared error in float64, over every rank."""

    def update(self, outputs, batch):
        self.add(id=batch["id"], pred=outputs["pred"], y=batch["y"])

    def compute(self):
        g = self.gathered()
        order = np.argsort(g["id"], kind="stable")
        err = (g["pred"][order].astype(np.float64) - g["y"][order].astype(np.float64)) ** 2
        return {"ids": g["id"][order].tolist(), "mse": float(err.mean())}


EVAL_ITEMS = 7               # not divisible by 2 processes; batches of 2 leave a short last batch


def _evaluate(ctx: DistContext, run_dir) -> dict:
    cfg = OmegaConf.create({"seed": 0, "data": {"batch_size": 2, "num_workers": 0},
                            "trainer": {"precision": "fp32", "progress": "off", "pin_memory": False,
                                        "channels_last": False}})
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(EVAL_ITEMS, 4, generator=gen), torch.randn(EVAL_ITEMS, generator=gen)
    y[-1] += 10.0                      # the last item's loss dominates: its weight in the mean shows
    torch.manual_seed(0)
    model = LinearModel(4)
    values = Trainer(cfg, run_dir, Tracker(), ctx).evaluate(model, MSE(), Tally(), Items(x=x, y=y), default_collate)
    with torch.no_grad():
        per_item = ((model(default_collate([Items(x=x, y=y)[i] for i in range(EVAL_ITEMS)]))["pred"] - y) ** 2)
    return {**values, "per_item_mean": float(per_item.double().mean())}


def _shard_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from pathlib import Path

    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        values = _evaluate(DistContext(rank=rank, world_size=world), Path(out_dir) / f"rank{rank}")
    finally:
        dist.destroy_process_group()
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(values))


@pytest.fixture(scope="module")
def sharded_and_single(tmp_path_factory):
    import torch.multiprocessing as mp
    out = tmp_path_factory.mktemp("ddp_eval")
    mp.spawn(_shard_worker, args=(2, str(out / "init"), str(out)), nprocs=2, join=True)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return ranks, _evaluate(DistContext(), out / "single")


def test_sharded_evaluation_scores_every_item_once_like_one_process(sharded_and_single):
    ranks, single = sharded_and_single
    assert single["ids"] == list(range(EVAL_ITEMS))
    for values in ranks:                               # every rank computes the metric over all ranks' items
        assert values["ids"] == list(range(EVAL_ITEMS))
        assert values["mse"] == pytest.approx(single["mse"], rel=reduction_rtol(torch.float32, 4 * EVAL_ITEMS))
    assert single["mse"] == pytest.approx(single["per_item_mean"], rel=reduction_rtol(torch.float32, 4 * EVAL_ITEMS))


def test_sharded_evaluation_loss_is_the_mean_over_items_like_one_process(sharded_and_single):
    ranks, single = sharded_and_single
    rtol = reduction_rtol(torch.float32, 4 * EVAL_ITEMS)
    for values in ranks:
        assert values["loss"] == pytest.approx(single["loss"], rel=rtol)
    assert single["loss"] == pytest.approx(single["per_item_mean"], rel=rtol)
