"""make bench: every task's reference configuration on one GPU, fp32 eager vs the optimised path, one table.

    python -m bench.run [--only NAME ...] [--out bench.json] [--repeats 5]
    python -m bench.run --device cpu --tiny --repeats 1     # the CPU check of tests/test_bench.py

Every configuration is composed from the suite's own Hydra configs (bench/references.py) and built the way
`run.py` trains: `load_task`, `data_root`, `task.datasets`, `task.fit_stats`, `common.training.parts.build_parts` (seeded
model with head adapters, criterion). A training step is `Trainer.train_epoch` over one optimiser step's batches
after `Trainer.prepare` (parameter groups, optimiser, schedule, gradient clipping, EMA, channels_last, compile as
the trainer config says); an inference call is `Trainer.infer`'s body (adapters merged as `mode=predict` merges
them, `Trainer.place`, the trainer's autocast, outputs to the CPU) on one batch held on the device. The variants differ
only in trainer settings (VARIANTS), so they are the trainer's own switches.

Per configuration and variant: steady-state samples/s (median of `--repeats` timed groups of `--calls` calls
after `--warmup` calls, so compilation and autotuning are excluded; CUDA events on the GPU, time.perf_counter on
the CPU), peak GPU memory, achieved TFLOP/s (FLOPs counted by torch.utils.flop_counter on the fp32 eager model)
and MFU on two bases: the datasheet's dense bf16 peak of the detected GPU (bench.measure.DATASHEET_BF16_TFLOPS;
n/a for a GPU not listed and the CPU) and a bf16 8192^3 matmul measured in the same run. FLOPs are counted on
an eager variant (fp32 or bf16: the same work), never under torch.compile. The fp32 baseline runs with TF32 off for
matmuls and cuDNN. Backbones are randomly initialised (same FLOPs as the pretrained ones); data is each task's
synthetic set at the reference input size; the batch is the composed configuration's `data.batch_size` (the
preset's or the task's), halved on running out of memory.

--tiny appends size-only overrides (tiny random backbone, small inputs and batches; bench/references.py) so that
every reference builds and runs in seconds on a CPU. --device cpu measures what makes sense there: fp32 eager
and bf16 autocast eager; torch.compile (the optimised variant) is listed as skipped with its reason; peak memory
and MFU are n/a. CPU figures are a smoke check of the benchmark, not performance figures.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.measure import (count_flops, datasheet_peak_tflops, matmul_peak_tflops, peak_memory_gib, strict_fp32,
                           time_per_call)
from bench.pipeline import input_pipeline_rate
from bench.references import REFERENCES, TEXT_EMBEDDINGS, Reference, batch_size_of, overrides_of
from common.utils.atomic import atomic_path, atomic_write_json
from common.utils.hydra_lines import trusted_targets, version_base

REPO = Path(__file__).resolve().parents[1]

# Trainer settings of each variant (the trainer's own switches; `optimised` is conf/trainer/gpu.yaml's recipe).
VARIANTS = {
    "fp32 eager": ["trainer.precision=fp32", "trainer.compile=false", "trainer.channels_last=false",
                   "trainer.optim.fused=false"],
    "optimised": ["trainer.precision=bf16", "trainer.compile=true", "trainer.channels_last=true",
                  "trainer.optim.fused=auto"],
    "bf16 eager": ["trainer.precision=bf16", "trainer.compile=false", "trainer.channels_last=true",
                   "trainer.optim.fused=auto"],
}
EAGER = ("fp32 eager", "bf16 eager")      # variants whose FLOPs are counted (torch.compile hides them)
DEFAULT_VARIANTS = {"cuda": ("fp32 eager", "optimised"), "cpu": ("fp32 eager", "bf16 eager", "optimised")}
SKIPPED = {"cpu": {"optimised": "torch.compile runs on CUDA only here (Inductor's CPU kernels are not the GPU's; "
                                "bf16 eager stands in)"}}


def compose(ref: Reference, cache_dir: Path, variant: str, device: str, tiny: bool):
    """The reference's config as run.py composes it, with the variant's trainer settings."""
    return compose_overrides([*overrides_of(ref, tiny), f"paths.root_dir={REPO}", f"paths.cache_dir={cache_dir}",
                              f"paths.output_dir={Path(tempfile.gettempdir()) / 'bench-run'}", "logger=none",
                              "backbone.weights=null", "trainer.progress=off", f"trainer.device={device}",
                              *VARIANTS[variant]])


def compose_overrides(overrides: list[str]):
    """The config run.py composes from these overrides, its config-group choices checked as run.py checks them
    (without the hydra section)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    from common.runs.choices import check_choices
    from common.runs.resolvers import register_resolvers as register_path_resolvers
    from sweeps.workers import register_resolvers
    register_path_resolvers()
    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "conf"), **version_base()):
        cfg = hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)
    check_choices(cfg, dict(cfg.hydra.runtime.choices))
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


@dataclass
class Built:
    task: object
    trainer: object
    model: torch.nn.Module
    criterion: torch.nn.Module
    batch: dict
    samples: int                 # items per call (batch x gradient accumulation for a training step)


def build(ref: Reference, cfg, batch_size: int, train: bool) -> Built:
    """The reference's task, data, model and criterion through the suite's own code; a trainer for the step. With
    data.cache_features (the cached-head reference) the held batch is read from the suite's disk cache
    (`read_from_disk_cache`)."""
    from common.cluster.distributed import DistContext, resolve_device
    from common.data import image_check
    from common.tracking.tracker import Tracker
    from common.training.dataset_root import data_root
    from common.training.device import move_to
    from common.training.parts import build_parts, load_task
    from common.training.trainer import Trainer
    from common.utils.seed import seed_everything
    seed_everything(int(cfg.seed))
    task = load_task(cfg)
    image_check.configure(cfg)
    sets = task.datasets(data_root(cfg, task), "fit")
    stats = task.fit_stats(sets["train"])
    model, criterion, _ = build_parts(task, stats)
    device = resolve_device(str(cfg.trainer.device))
    trainer = Trainer(cfg, Path(cfg.paths.output_dir), Tracker(), DistContext(device=device))
    distinct = min(len(sets["train"]), 8)

    def read_batch() -> dict:
        return task.collate([sets["train"][i % distinct] for i in range(batch_size)])
    batch = read_from_disk_cache(model, read_batch, device) if cfg.data.cache_features else read_batch()
    accumulate = int(cfg.trainer.accumulate_grad_batches) if train else 1
    return Built(task, trainer, model, criterion, move_to(batch, device), batch_size * accumulate)


def read_from_disk_cache(model: torch.nn.Module, read_batch, device: torch.device) -> dict:
    """Head-only training on the suite's feature cache (data.cache_features): the backbone's tokens of the batch's
    items computed once through the model's CachedEncoder and written to the disk cache, then the batch read again
    by the datasets as a cache-hit epoch reads it (the stored tokens in place of the pixels, float32 as the cache
    returns them), so that the step times the head on exactly what a cached trial trains on."""
    from common.data.feature_cache import CachedFeatures
    first = read_batch()
    if not isinstance(first["image"], CachedFeatures):
        with torch.no_grad():
            model.backbone(first["image"].to(device), first["cache_key"])
    batch = read_batch()
    if not isinstance(batch["image"], CachedFeatures):
        raise RuntimeError("the feature cache did not serve the batch after it was filled")
    return batch


def freeze_features(built: Built) -> None:
    """A head timed alone on tokens of a backbone that cannot be cached (adapters: bench.pcgrad's preset): the
    backbone returns tokens computed once, held on the device as float32. The cached-head reference reads the
    suite's disk cache instead (`read_from_disk_cache`)."""
    backbone = built.model.backbone.to(built.trainer.device)
    with torch.no_grad(), built.trainer.autocast():
        out = backbone(built.batch["image"])
    out.tokens = [t.float() for t in out.tokens]
    backbone.forward = lambda *args, **kwargs: out


def train_step(built: Built):
    """One optimiser step of the suite's training loop: Trainer.train_epoch of a one-step epoch over the held
    batch (accumulate_grad_batches micro-batches: forward and loss under the trainer's autocast, non-finite check,
    backward, gradient clipping, schedule, optimiser step, EMA)."""
    from common.training.fit_state import FitState
    trainer = built.trainer
    trainer.prepare(built.model, built.criterion, steps_per_epoch=1)
    state = FitState()

    def step():
        state.batches_done, state.epoch_sums = 0, {}
        trainer.train_epoch(itertools.repeat(built.batch), state)
    return step


def infer_step(built: Built):
    """One prediction call as mode=predict makes it: adapters merged (trainer.merge_adapters), the model placed
    by Trainer.place, eval mode, no gradients, the trainer's autocast, outputs to the CPU (Trainer.infer)."""
    from common.inference.predictor import merge_for_inference
    from common.training.device import to_cpu
    trainer, batch = built.trainer, built.batch
    model = merge_for_inference(built.model, trainer.t.merge_adapters, "bench")
    trainer.place(model).eval()
    if trainer.t.compile:
        model.compile()
    built.model = model

    @torch.no_grad()
    def infer():
        with trainer.autocast():
            to_cpu(model(batch))
    return infer


def measure(ref: Reference, cfg, mode: str, variant: str, batch_size: int, repeats: int, warmup: int,
            calls: int, device: str) -> dict:
    base = {"config": ref.name, "mode": mode, "variant": variant}
    cuda = device == "cuda"
    built = None
    while True:
        try:
            with strict_fp32() if variant == "fp32 eager" else nullcontext():
                built = build(ref, cfg, batch_size, mode == "train")
                fn = train_step(built) if mode == "train" else infer_step(built)
                flops = count_flops(fn) if variant in EAGER else None
                seconds = time_per_call(fn, warmup=warmup, repeats=repeats, calls=calls, device=device)
                memory = peak_memory_gib(fn, device)
            break
        except torch.cuda.OutOfMemoryError:
            del built
            built = None
            if cuda:
                torch.cuda.empty_cache()
            if batch_size == 1:
                return {**base, "error": "out of memory"}
            batch_size //= 2
    row = {**base, "batch": built.samples, "samples_per_s": built.samples / seconds, "peak_gib": memory,
           "flops_per_call": flops}
    del built
    if cuda:
        torch.cuda.empty_cache()
    return row


def add_rates(rows: list[dict], peak: float | None, datasheet: float | None) -> None:
    """TFLOP/s from an eager FLOP count (the same work, whichever variant ran it); MFU against the matmul peak
    measured in this run (`mfu`) and against the datasheet's (`mfu_datasheet`), None where that peak is."""
    flops = {(r["config"], r["mode"]): r["flops_per_call"] / r["batch"] for r in rows if r.get("flops_per_call")}
    for row in rows:
        per_sample = flops.get((row["config"], row["mode"]))
        if per_sample and "samples_per_s" in row:
            row["tflops"] = per_sample * row["samples_per_s"] / 1e12
            row["mfu"] = row["tflops"] / peak if peak else None
            row["mfu_datasheet"] = row["tflops"] / datasheet if datasheet else None


def _num(value, spec: str, width: int) -> str:
    return f"{'n/a':>{width}}" if value is None else f"{value:>{width}{spec}}"


def print_table(rows: list[dict], peak: float | None, datasheet: float | None, device_name: str) -> None:
    peak_text = f"{peak:.0f} TFLOP/s" if peak else "n/a"
    sheet_text = f"{datasheet:.0f} TFLOP/s" if datasheet else "n/a"
    print(f"\nbf16 matmul peak (8192^3, this run): {peak_text}; datasheet dense bf16 peak: {sheet_text}; "
          f"device {device_name}")
    head = f"{'config':<32} {'mode':<6} {'variant':<10} {'batch':>5} {'samples/s':>10} {'peak GiB':>8} " \
           f"{'TFLOP/s':>8} {'MFU':>5} {'MFU ds':>6} {'target':>8} {'speed-up':>8}"
    print(head + "\n" + "-" * len(head))
    eager = {(r["config"], r["mode"]): r.get("samples_per_s") for r in rows if r["variant"] == "fp32 eager"}
    for r in rows:
        if "error" in r or "skipped" in r:
            what = f"error: {r['error']}" if "error" in r else f"skipped: {r['skipped']}"
            print(f"{r['config']:<32} {r['mode']:<6} {r['variant']:<10} {what}")
            continue
        ref = next(x for x in REFERENCES if x.name == r["config"])
        target = ref.targets.get(r["mode"]) if r["variant"] == "optimised" else None
        base = eager.get((r["config"], r["mode"]))
        speedup = f"{r['samples_per_s'] / base:.2f}x" if base and r["variant"] != "fp32 eager" else ""
        print(f"{r['config']:<32} {r['mode']:<6} {r['variant']:<10} {r['batch']:>5} {r['samples_per_s']:>10.1f} "
              f"{_num(r['peak_gib'], '.1f', 8)} {_num(r.get('tflops'), '.3f' if not peak else '.1f', 8)} "
              f"{_num(r.get('mfu'), '.2f', 5)} {_num(r.get('mfu_datasheet'), '.2f', 6)} {target if target else '':>8} "
              f"{speedup:>8}")


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="configuration names (default: all)")
    parser.add_argument("--modes", nargs="*", default=["infer", "train"], choices=["infer", "train"])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny random backbone, small inputs and batches (bench/references.py): a CPU check")
    parser.add_argument("--variants", nargs="*", choices=list(VARIANTS),
                        help="default: fp32 eager and optimised on cuda; fp32 eager and bf16 eager on cpu, where "
                             "optimised (torch.compile) is listed as skipped. bf16 eager on cuda is what "
                             "mode=predict runs there (trainer.precision=auto, no compile)")
    parser.add_argument("--repeats", type=int, default=5, help="timed groups; the figure is their median")
    parser.add_argument("--calls", type=int, default=5, help="calls per timed group")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (compilation, autotuning)")
    parser.add_argument("--out", default=str(REPO / "logs" / "bench" / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"))
    parser.add_argument("--cache-dir", default=os.environ.get("VFM_CACHE", str(REPO / ".cache")))
    args = parser.parse_args(argv)
    unknown = sorted(set(args.only or []) - {ref.name for ref in REFERENCES})
    if unknown:
        parser.error(f"unknown configuration(s) {', '.join(unknown)}: expected {', '.join(r.name for r in REFERENCES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.run --device cuda needs a CUDA GPU (this measures GPU throughput); "
                         "--device cpu --tiny checks the benchmark on a CPU")
    with atomic_path(TEXT_EMBEDDINGS) as tmp:       # concurrent runs never read a partial file
        torch.save(torch.randn(3, 512), tmp)
    peak = matmul_peak_tflops() if args.device == "cuda" else None
    name = device_name(args.device)
    datasheet = datasheet_peak_tflops(name) if args.device == "cuda" else None
    rows, pipeline = [], []
    for ref in REFERENCES:
        if args.only and ref.name not in args.only:
            continue
        cfg = None
        for mode in args.modes:
            if mode not in ref.modes:
                continue
            for variant in args.variants or DEFAULT_VARIANTS[args.device]:
                reason = SKIPPED.get(args.device, {}).get(variant)
                if reason:
                    rows.append({"config": ref.name, "mode": mode, "variant": variant, "skipped": reason})
                else:
                    cfg = compose(ref, Path(args.cache_dir), variant, args.device, args.tiny)
                    rows.append(measure(ref, cfg, mode, variant, batch_size_of(ref, cfg, args.tiny), args.repeats,
                                        args.warmup, args.calls, args.device))
                print(json.dumps(rows[-1]), flush=True)
                write_results(args.out, name, (peak, datasheet), rows, pipeline, args)
        if cfg is None:
            cfg = compose(ref, Path(args.cache_dir), "fp32 eager", args.device, args.tiny)
        pipeline.append(input_pipeline_rate(ref, cfg))
    add_rates(rows, peak, datasheet)
    write_results(args.out, name, (peak, datasheet), rows, pipeline, args)
    print_table(rows, peak, datasheet, name)
    print("\ninput pipeline (one worker, decode + resize + augment): " +
          ", ".join(f"{p['config']} {p['items_per_s']:.0f} items/s" for p in pipeline))
    print(f"wrote {args.out}")


def write_results(out: str, device_name: str, peaks: tuple[float | None, float | None], rows: list[dict],
                  pipeline: list[dict], args) -> None:
    """Rewritten after every row, so that a run cut short keeps what it measured (strict JSON: a non-finite
    figure is written as null). peaks: (measured matmul, datasheet) bf16 TFLOP/s."""
    atomic_write_json(out, {
        "device": device_name, "torch": torch.__version__, "tiny": args.tiny, "repeats": args.repeats,
        "calls": args.calls, "warmup": args.warmup,
        "timing": "cuda events" if args.device == "cuda" else "time.perf_counter",
        "matmul_peak_tflops": peaks[0], "datasheet_peak_tflops": peaks[1], "rows": rows, "pipeline": pipeline})


if __name__ == "__main__":
    with trusted_targets():
        main()
