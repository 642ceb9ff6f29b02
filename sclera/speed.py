"""Parameter counts per component and forward time per image of CGDSeg as a preset composes it.

    python -m sclera.speed                                    # deck widths, CPU, fp32 eager, batch 1
    python -m sclera.speed --device cuda --amp --compile --batch 1 32   # the deck's "4 ms/image, AMP + compile"

The backbone is randomly initialised (same compute as the official weights) and the grounding reads a random
(4, 512) text embedding saved to a temporary file: the grounding stage only ever uses the cached 512-d CLIP
text embedding, so its parameters and compute are those of CLIP grounding. Extra Hydra overrides follow
`--override` (e.g. `--override backbone=tiny model/sclera=cgdseg_tiny data.image_size=[112,112]`).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from common.utils.hydra_lines import trusted_targets, version_base

CONF = Path(__file__).resolve().parents[1] / "conf"


def build(overrides: list[str], text_file: Path):
    from sclera.task import ScleraTask
    torch.save(torch.randn(4, 512), text_file)
    with initialize_config_dir(config_dir=str(CONF), **version_base()):
        cfg = compose(config_name="config", overrides=[
            "experiment=sclera_cgdseg_mixed", "logger=none", "backbone.weights=null",
            "model.grounding.kind=file", f"model.grounding.file={text_file}", *overrides])
    return ScleraTask(cfg).build_model({}).eval(), tuple(cfg.data.image_size)


def forward_ms(model, size: tuple[int, int], batch: int, device: torch.device, amp: bool, repeats: int,
               warmup: int) -> float:
    """Median milliseconds per image of `repeats` timed forward passes (after `warmup` untimed ones)."""
    images = torch.rand(batch, 3, *size, device=device)
    autocast = torch.autocast(device.type, dtype=torch.float16) if amp else nullcontext()
    times = []
    with torch.no_grad(), autocast:
        for i in range(warmup + repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model({"image": images})
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1000 / batch


def measure(overrides: list[str], batches: list[int], device: str, amp: bool, compile_model: bool,
            repeats: int, warmup: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        model, size = build(overrides, Path(tmp) / "text.pt")
    dev = torch.device(device)
    model = model.to(dev)
    report = model.parameter_report()
    runner = torch.compile(model) if compile_model else model
    times = {batch: forward_ms(runner, size, batch, dev, amp, repeats, warmup) for batch in batches}
    return {"parameters": report, "input": list(size), "device": str(dev), "amp": amp, "compile": compile_model,
            "ms_per_image": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="fp16 autocast (the deck's AMP)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--override", nargs="*", default=[])
    args = parser.parse_args()
    print(json.dumps(measure(args.override, args.batch, args.device, args.amp, args.compile, args.repeats,
                             args.warmup), indent=2))


if __name__ == "__main__":
    with trusted_targets():
        main()
