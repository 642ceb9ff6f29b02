"""The reference configurations of issue 8, as command-line overrides of the suite's own configs.

The batch size of a reference is its composed configuration's `data.batch_size` (bench.references.batch_size_of),
the size its preset (or task) trains and predicts with. `targets`: samples/s of the optimised path (issue 29).

`tiny` (bench.run --tiny): overrides appended after a reference's own, which swap in the tiny random backbone
(conf/backbone/tiny.yaml: 4 blocks, width 64, patch 14) and small inputs, so that every reference builds and runs
through the same code in seconds on a CPU (tests/test_bench.py). They change sizes only: the task, model, head,
adapters and loss of the reference stay as its own overrides set them. `tiny_batch` is the batch size there.
"""
from __future__ import annotations

from dataclasses import dataclass, field

TEXT_EMBEDDINGS = "/tmp/vfm-bench-text.pt"   # random CLIP-sized prompt embeddings (no hub on the GPU machine)


@dataclass
class Reference:
    name: str
    overrides: list[str]
    batch_size: int | None = None                   # None: the composed configuration's data.batch_size
    targets: dict = field(default_factory=dict)     # samples/s the optimised path should reach per mode
    modes: tuple = ("infer", "train")
    tiny: list[str] = field(default_factory=list)   # --tiny: appended after `overrides` (after TINY)
    tiny_batch: int = 2


TINY = ["backbone=tiny", "backbone.layers=[3]"]     # the tiny backbone's last block (it has 4)


REFERENCES = [
    Reference("sclera_cgdseg_s14_256", [
        "experiment=sclera_cgdseg_synthetic", "model.grounding.kind=file", f"model.grounding.file={TEXT_EMBEDDINGS}",
        "data.synth.train_per_set=8", "data.synth.val_per_set=2", "data.synth.eval_per_set=2"],
        targets={"infer": 8000, "train": 2000},
        tiny=["data.image_size=[112,112]"], tiny_batch=2),
    Reference("biomass_dinov3_l16_480x960_lora", [
        "task=biomass", "backbone=dinov3_l16", "backbone.layers=[23]", "peft=lora", "peft.targets=[qkv]",
        "peft.last_n_blocks=16", "model/biomass=vitdet_dense", "model.head.width=512", "model.head.hidden=256",
        "data.image_size=[480,960]", "data.synth.n_train=16", "data.synth.n_test=4", "data.synth.width=960",
        "data.synth.height=480"],
        targets={"infer": 300, "train": 120},
        tiny=["peft.last_n_blocks=3", "data.image_size=[112,224]", "data.synth.width=224", "data.synth.height=112"],
        tiny_batch=2),
    Reference("biomass_dinov3_l16_cached_head", [
        "task=biomass", "backbone=dinov3_l16", "backbone.layers=[23]", "peft=none", "data.cache_features=true",
        "model/biomass=vitdet_dense",
        "model.head.width=512", "model.head.hidden=256", "data.image_size=[480,960]", "data.synth.n_train=16",
        "data.synth.n_test=4", "data.synth.width=960", "data.synth.height=480"],
        targets={"train": 4000}, modes=("train",),
        tiny=["data.image_size=[112,224]", "data.synth.width=224", "data.synth.height=112"], tiny_batch=4),
    Reference("roadwork_b14_12x518", [
        "task=roadwork", "backbone=dinov2_b14", "backbone.layers=[11]", "data.views=highres12",
        "data.view_size=518", "model.width=512", "model.depth=4", "model.num_heads=8",
        "model.classifier_hidden=[512,256]", "data.synth.splits.train.count=16", "data.synth.splits.val.count=8",
        "data.synth.splits.test.count=4"],
        targets={"infer": 110}, modes=("infer",),
        tiny=["data.view_size=56", *[f"data.synth.splits.{s}.count=4" for s in ("train224", "val224")]],
        tiny_batch=2),
    Reference("roadwork_b14_224_single", [
        "task=roadwork", "backbone=dinov2_b14", "backbone.layers=[11]", "data.views=single", "data.view_size=224",
        "data.synth.splits.train.count=16", "data.synth.splits.val.count=8", "data.synth.splits.test.count=4"],
        modes=("infer",),
        tiny=["data.view_size=56", *[f"data.synth.splits.{s}.count=4" for s in ("train224", "val224")]],
        tiny_batch=4),
]


def overrides_of(ref: Reference, tiny: bool) -> list[str]:
    """The reference's Hydra overrides; with `tiny`, the size-only CPU overrides appended (the later wins)."""
    return [*ref.overrides, *TINY, *ref.tiny] if tiny else list(ref.overrides)


def batch_size_of(ref: Reference, cfg, tiny: bool) -> int:
    """The tiny batch with --tiny; else the reference's own batch_size when it names one (bench.pcgrad's), and the
    composed configuration's data.batch_size (its preset's, or its task's) for REFERENCES, which name none."""
    if tiny:
        return ref.tiny_batch
    return int(ref.batch_size if ref.batch_size is not None else cfg.data.batch_size)
