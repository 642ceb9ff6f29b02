"""make bench: every task's reference configuration on one GPU, fp32 eager vs the optimised path, one table.

    python -m bench.run [--only NAME ...] [--out bench.json] [--repeats 5]

Per configuration and variant: steady-state samples/s (after warm-up, CUDA-event timing, median of repeats),
peak GPU memory, achieved TFLOP/s (FLOPs counted by torch.utils.flop_counter on the eager model) and MFU as a
fraction of a bf16 matmul measured in the same run. Backbones are randomly initialised (same FLOPs as the
pretrained ones); data is each task's synthetic set at the reference input size.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.measure import count_flops, matmul_peak_tflops, peak_memory_gib, time_per_call
from bench.pipeline import input_pipeline_rate
from bench.references import REFERENCES, TEXT_EMBEDDINGS, Reference
from common.atomic import atomic_write_text
from common.trainer import to_channels_last

REPO = Path(__file__).resolve().parents[1]


def compose(ref: Reference, cache_dir: Path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from sweeps.workers import register_resolvers
    register_resolvers()
    overrides = [*ref.overrides, f"paths.root_dir={REPO}", f"paths.cache_dir={cache_dir}",
                 "paths.output_dir=/tmp/bench-run", "logger=none", "backbone.weights=null"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


@dataclass
class Built:
    task: object
    model: torch.nn.Module
    criterion: torch.nn.Module
    batch: dict
    dataset: object = None
    extra: dict = field(default_factory=dict)


def build(ref: Reference, cfg, batch_size: int) -> Built:
    from common.app import data_root
    from common.parts import load_task
    from common.trainer import move_to
    task = load_task(cfg)
    sets = task.datasets(data_root(cfg, task), "fit")
    stats = task.fit_stats(sets["train"])
    model, criterion = task.build_model(stats).cuda(), task.build_criterion(stats).cuda()
    distinct = min(len(sets["train"]), 8)
    items = [sets["train"][i % distinct] for i in range(batch_size)]
    return Built(task, model, criterion, move_to(task.collate(items), torch.device("cuda")), sets["train"])


def freeze_features(built: Built) -> None:
    """Head-only training on cached features: the backbone returns precomputed tokens (held on the GPU)."""
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        feats = built.model.backbone(built.batch["image"])
    built.model.backbone.forward = lambda *args, **kwargs: feats


def step_fn(built: Built, train: bool, optimized: bool):
    model, criterion, batch = built.model, built.criterion, built.batch
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=optimized)
    if not train:
        model.eval()

        def infer():
            with torch.no_grad(), autocast:
                model(batch)
        return infer
    model.train()
    params = [p for p in list(model.parameters()) + list(criterion.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=optimized)

    def train_step():
        with autocast:
            loss = sum(criterion(model(batch), batch).values())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return train_step


def optimise(built: Built) -> None:
    if built.extra.get("channels_last", True):
        to_channels_last(built.model)             # conv weights only, as the trainer does
    built.model.compile()


def measure(ref: Reference, cfg, mode: str, variant: str, repeats: int, peak: float) -> dict:
    batch_size = ref.batch_size
    while True:
        try:
            built = build(ref, cfg, batch_size)
            if ref.cached:
                freeze_features(built)
            flops = count_flops(step_fn(built, mode == "train", optimized=False)) if variant == "fp32 eager" \
                else None
            if variant == "optimised":
                optimise(built)
            fn = step_fn(built, mode == "train", optimized=variant == "optimised")
            seconds = time_per_call(fn, warmup=3, repeats=repeats, calls=5)
            memory = peak_memory_gib(fn)
            break
        except torch.cuda.OutOfMemoryError:
            del built
            torch.cuda.empty_cache()
            if batch_size == 1:
                return {"config": ref.name, "mode": mode, "variant": variant, "error": "out of memory"}
            batch_size //= 2
    row = {"config": ref.name, "mode": mode, "variant": variant, "batch": batch_size,
           "samples_per_s": batch_size / seconds, "peak_gib": memory, "flops_per_call": flops}
    del built
    torch.cuda.empty_cache()
    return row


def add_rates(rows: list[dict], peak: float) -> None:
    """TFLOP/s and MFU from the eager FLOP count (the same work, whichever variant ran it)."""
    flops = {(r["config"], r["mode"]): r["flops_per_call"] / r["batch"] for r in rows if r.get("flops_per_call")}
    for row in rows:
        per_sample = flops.get((row["config"], row["mode"]))
        if per_sample and "samples_per_s" in row:
            row["tflops"] = per_sample * row["samples_per_s"] / 1e12
            row["mfu"] = row["tflops"] / peak


def print_table(rows: list[dict], peak: float) -> None:
    print(f"\nbf16 matmul peak (8192^3, this run): {peak:.0f} TFLOP/s; device {torch.cuda.get_device_name()}")
    head = f"{'config':<26} {'mode':<6} {'variant':<10} {'batch':>5} {'samples/s':>10} {'peak GiB':>8} " \
           f"{'TFLOP/s':>8} {'MFU':>5} {'target':>8} {'speed-up':>8}"
    print(head + "\n" + "-" * len(head))
    eager = {(r["config"], r["mode"]): r.get("samples_per_s") for r in rows if r["variant"] == "fp32 eager"}
    for r in rows:
        if "error" in r:
            print(f"{r['config']:<26} {r['mode']:<6} {r['variant']:<10} {r['error']}")
            continue
        ref = next(x for x in REFERENCES if x.name == r["config"])
        target = ref.targets.get(r["mode"]) if r["variant"] == "optimised" else None
        base = eager.get((r["config"], r["mode"]))
        speedup = f"{r['samples_per_s'] / base:.2f}x" if base and r["variant"] == "optimised" else ""
        print(f"{r['config']:<26} {r['mode']:<6} {r['variant']:<10} {r['batch']:>5} {r['samples_per_s']:>10.1f} "
              f"{r['peak_gib']:>8.1f} {r.get('tflops', 0):>8.1f} {r.get('mfu', 0):>5.2f} "
              f"{target if target else '':>8} {speedup:>8}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="configuration names (default: all)")
    parser.add_argument("--modes", nargs="*", default=["infer", "train"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(REPO / "logs" / "bench" / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"))
    parser.add_argument("--cache-dir", default=os.environ.get("VFM_CACHE", str(REPO / ".cache")))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("make bench needs a CUDA GPU (this measures GPU throughput)")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 eager means fp32
    torch.save(torch.randn(3, 512), TEXT_EMBEDDINGS)
    peak = matmul_peak_tflops()
    rows, pipeline = [], []
    for ref in REFERENCES:
        if args.only and ref.name not in args.only:
            continue
        cfg = compose(ref, Path(args.cache_dir))
        for mode in args.modes:
            if mode in ref.modes:
                for variant in ("fp32 eager", "optimised"):
                    rows.append(measure(ref, cfg, mode, variant, args.repeats, peak))
                    print(json.dumps(rows[-1]), flush=True)
                    write_results(args.out, peak, rows, pipeline)
        pipeline.append(input_pipeline_rate(ref, cfg))
    add_rates(rows, peak)
    write_results(args.out, peak, rows, pipeline)
    print_table(rows, peak)
    print("\ninput pipeline (one worker, decode + resize + augment): " +
          ", ".join(f"{p['config']} {p['items_per_s']:.0f} items/s" for p in pipeline))
    print(f"wrote {args.out}")


def write_results(out: str, peak: float, rows: list[dict], pipeline: list[dict]) -> None:
    """Rewritten after every row, so that a run cut short keeps what it measured."""
    atomic_write_text(out, json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                     "matmul_peak_tflops": peak, "rows": rows, "pipeline": pipeline}, indent=2))


if __name__ == "__main__":
    main()
