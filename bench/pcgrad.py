"""PCGrad step time against a plain summed-loss step, the biomass_csiro_vitdet preset otherwise unchanged.

    python -m bench.pcgrad [--pairs 3] [--calls 3] [--only head vits14]

Each configuration builds the preset through the suite's own path (bench.run: compose, build, Trainer.train_epoch
of one optimiser step) twice from the same seed, once with trainer.pcgrad as the preset sets it (anchored_support
on the head group) and once with trainer.pcgrad.enabled=false; the two steps are timed alternately (A, B, A, B...),
each time the median of `calls` calls after one warm-up, on the CPU with one torch thread unless OMP says otherwise.
  head:   the preset's head (ViTDet readout, width 512, bottleneck 4096, six UW terms) on the tiny backbone's
          frozen tokens (computed once: the head alone is timed) of a 16x32 patch grid (512 tokens; the preset's 30x60
          is too slow for this CPU), batch 2.
  vits14: a random-weight DINOv2 ViT-S/14 (backbone=dinov2_s14 backbone.weights=null, layers [5, 8, 11], LoRA on
          the last 12 blocks as the preset's last 16) at 16x32 = 512 tokens, batch 2, the whole step timed.
Prints one row per pair and the min / median PCGrad / plain ratios.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path
import tempfile

import torch

from bench.measure import time_per_call
from bench.references import Reference
from bench.run import build, compose, freeze_features, train_step

PRESET = ["experiment=biomass_csiro_vitdet", "data.num_workers=0", "trainer.ema.enabled=false"]
CONFIGS = {
    "head": (Reference("pcgrad_head", [*PRESET, "backbone=tiny", "backbone.layers=[1,2,3]", "peft.last_n_blocks=4",
                                       "data.image_size=[224,448]"], batch_size=2), True),
    "vits14": (Reference("pcgrad_vits14", [*PRESET, "backbone=dinov2_s14", "backbone.layers=[5,8,11]",
                                           "peft.last_n_blocks=12", "data.image_size=[224,448]"], batch_size=2), False),
}


def step_of(ref: Reference, cached: bool, pcgrad: bool, cache_dir: Path):
    cfg = compose(Reference(ref.name, [*ref.overrides, f"trainer.pcgrad.enabled={str(pcgrad).lower()}"],
                            ref.batch_size), cache_dir, "fp32 eager", "cpu", tiny=False)
    built = build(ref, cfg, ref.batch_size, train=True)
    if cached:
        freeze_features(built)
    return train_step(built)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--only", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args(argv)
    cache_dir = Path(tempfile.mkdtemp(prefix="vfm-bench-pcgrad-"))
    print(f"torch threads {torch.get_num_threads()}")
    print(f"{'config':<8} {'pair':>4} {'plain s':>9} {'pcgrad s':>9} {'ratio':>6}")
    summary = []
    for name in args.only:
        ref, cached = CONFIGS[name]
        plain, pcgrad = step_of(ref, cached, False, cache_dir), step_of(ref, cached, True, cache_dir)
        ratios = []
        for pair in range(args.pairs):
            a = time_per_call(plain, warmup=1, repeats=1, calls=args.calls, device="cpu")
            b = time_per_call(pcgrad, warmup=1, repeats=1, calls=args.calls, device="cpu")
            ratios.append(b / a)
            print(f"{name:<8} {pair:>4} {a:>9.4f} {b:>9.4f} {b / a:>6.2f}", flush=True)
        summary.append((name, min(ratios), statistics.median(ratios)))
    print(f"\n{'config':<8} {'min ratio':>9} {'median':>7}")
    for name, low, mid in summary:
        print(f"{name:<8} {low:>9.2f} {mid:>7.2f}")


if __name__ == "__main__":
    main()
