"""The GPU benchmark (bench/) run on the CPU with the tiny backbone, so it cannot drift from the suite's code.

`python -m bench.run --device cpu --tiny` composes every reference configuration, builds it through the suite's
own task / model / trainer code and times each measurable variant; a reference that no longer builds, a variant
that fails, or a row without a figure or a reason fails here rather than on a rarely lent GPU.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.references import REFERENCES
from bench.run import SKIPPED

REPO = Path(__file__).resolve().parents[1]


# bf16 eager is left to test_gpu_check_runs_on_cpu_and_reports_every_target (the GPU check's own variant): on a
# CPU without bf16 kernels it is 5-15x slower than fp32 and would double this test
VARIANTS = ("fp32 eager", "optimised")


def run_cpu_bench(out: Path) -> tuple[dict, str]:
    # MKL_NUM_THREADS too: conftest sets it to the worker's share (2 when pytest runs without -n), and torch then
    # takes 2 intra-op threads despite OMP_NUM_THREADS=1: beside other work on 2 cores the sclera reference alone
    # took 108 s instead of 29 s
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "WANDB_MODE": "disabled", "NO_ALBUMENTATIONS_UPDATE": "1"}
    cmd = [sys.executable, "-m", "bench.run", "--device", "cpu", "--tiny", "--repeats", "1", "--calls", "1",
           "--warmup", "1", "--variants", *VARIANTS, "--out", str(out), "--cache-dir", str(out.parent / "cache")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"bench.run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(out.read_text()), proc.stdout


def row_of(rows: list[dict], config: str, mode: str, variant: str) -> dict:
    [row] = [r for r in rows if (r["config"], r["mode"], r["variant"]) == (config, mode, variant)]
    return row


@pytest.mark.slow
def test_every_reference_runs_on_cpu(tmp_path):
    """One bench.run (~60 s on 2 idle cores): the JSON holds every reference with a finite positive rate for
    each measured variant and a reason for each skipped one, and the printed table lists every row."""
    results, stdout = run_cpu_bench(tmp_path / "bench.json")
    rows = results["rows"]
    assert {r["config"] for r in rows} == {ref.name for ref in REFERENCES}
    assert results["timing"] == "time.perf_counter" and results["tiny"] is True
    assert results["matmul_peak_tflops"] is None and results["datasheet_peak_tflops"] is None
    for ref in REFERENCES:
        for mode in ref.modes:
            for variant in (v for v in VARIANTS if v not in SKIPPED["cpu"]):
                row = row_of(rows, ref.name, mode, variant)
                assert "error" not in row and "skipped" not in row, row
                assert math.isfinite(row["samples_per_s"]) and row["samples_per_s"] > 0, row
                assert row["batch"] == ref.tiny_batch and row["peak_gib"] is None, row
            for variant, reason in SKIPPED["cpu"].items():
                assert reason and row_of(rows, ref.name, mode, variant)["skipped"] == reason
            eager = row_of(rows, ref.name, mode, "fp32 eager")
            assert eager["flops_per_call"] > 0 and eager["tflops"] > 0, eager
    assert len(rows) == sum(len(ref.modes) for ref in REFERENCES) * len(VARIANTS)
    assert {p["config"] for p in results["pipeline"]} == {ref.name for ref in REFERENCES}
    assert all(p["items_per_s"] > 0 for p in results["pipeline"])

    lines = stdout[stdout.index("bf16 matmul peak"):].splitlines()
    for row in rows:
        [line] = [line for line in lines
                  if line.startswith(f"{row['config']:<32} {row['mode']:<6} {row['variant']:<10}")]
        if "skipped" in row:
            assert line.endswith(f"skipped: {row['skipped']}"), line
        else:
            assert f" {row['samples_per_s']:.1f} " in line and " n/a " in line, line


SIZE_KEYS = ("backbone=tiny", "backbone.layers=", "peft.last_n_blocks=", "data.image_size=", "data.view_size=",
             "data.synth.")


def test_tiny_overrides_change_sizes_only():
    """Fast: every reference and its --tiny form compose and pass run.py's choice check; --tiny swaps in the
    tiny backbone and changes sizes only (same task, model, loss, adapters)."""
    from omegaconf import OmegaConf

    from bench.references import TINY
    from bench.run import compose
    for ref in REFERENCES:
        assert all(o.startswith(SIZE_KEYS) for o in [*TINY, *ref.tiny]), ref.tiny
        full = compose(ref, REPO / ".cache", "fp32 eager", "cpu", tiny=False)
        tiny = compose(ref, REPO / ".cache", "fp32 eager", "cpu", tiny=True)
        assert tiny.backbone.model_kwargs.embed_dim == 64
        for key in ("task", "model", "loss"):
            assert OmegaConf.to_container(full[key]) == OmegaConf.to_container(tiny[key]), key
        peft = {k: v for k, v in OmegaConf.to_container(tiny.peft).items() if k != "last_n_blocks"}
        assert peft == {k: v for k, v in OmegaConf.to_container(full.peft).items() if k != "last_n_blocks"}
        assert tiny.trainer.precision == "fp32" and tiny.trainer.compile is False


def test_fp32_baseline_turns_tf32_off_and_restores_it():
    import torch

    from bench.measure import strict_fp32
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with strict_fp32():
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


# ---- issue 29: MFU on two bases, the presets' batch sizes, the GPU check ---------------------------------------
@pytest.mark.parametrize("name, tflops", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200", 989.0),
                                          ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA H100 PCIe", 756.0),
                                          ("Tesla T4", None), ("cpu (2 cores, 1 torch threads)", None)])
def test_datasheet_peak_of_the_detected_gpu(name, tflops):
    from bench.measure import datasheet_peak_tflops
    assert datasheet_peak_tflops(name) == tflops


def test_mfu_on_both_bases_by_hand():
    from bench.run import add_rates
    rows = [{"config": "c", "mode": "train", "variant": "bf16 eager", "batch": 4, "flops_per_call": 4e12,
             "samples_per_s": 100.0},
            {"config": "c", "mode": "train", "variant": "optimised", "batch": 4, "flops_per_call": None,
             "samples_per_s": 400.0}]
    add_rates(rows, peak=800.0, datasheet=1000.0)
    assert [(r["tflops"], r["mfu"], r["mfu_datasheet"]) for r in rows] == [(100.0, 0.125, 0.1), (400.0, 0.5, 0.4)]
    add_rates(rows, peak=None, datasheet=None)
    assert rows[1]["mfu"] is None and rows[1]["mfu_datasheet"] is None


def test_reference_batches_are_the_composed_presets():
    """No bench constant: each reference's batch is its composed configuration's data.batch_size."""
    from bench.references import batch_size_of
    from bench.run import compose
    for ref in REFERENCES:
        cfg = compose(ref, REPO / ".cache", "optimised", "cpu", tiny=False)
        assert ref.batch_size is None and batch_size_of(ref, cfg, tiny=False) == cfg.data.batch_size
        assert batch_size_of(ref, cfg, tiny=True) == ref.tiny_batch


ISSUE_TARGETS = {("sclera_cgdseg_s14_256", "infer"): 8000, ("sclera_cgdseg_s14_256", "train"): 2000,
                 ("biomass_dinov3_l16_480x960_lora", "infer"): 300, ("biomass_dinov3_l16_480x960_lora", "train"): 120,
                 ("biomass_dinov3_l16_cached_head", "train"): 4000, ("roadwork_b14_12x518", "infer"): 110}


def test_gpu_check_verdicts_by_hand():
    from bench.gpu_check import verdicts
    results = {"sclera_cgdseg_s14_256": {"exit": 0, "device": "d", "rows": [
        {"mode": "infer", "variant": "optimised", "samples_per_s": 9000.0, "batch": 32},
        {"mode": "train", "variant": "optimised", "samples_per_s": 1000.0, "batch": 32}]},
        "roadwork_b14_12x518": {"exit": "timeout", "rows": []}}
    status = {(r["config"], r["mode"]): r["status"] for r in verdicts(results)}
    assert set(status) == set(ISSUE_TARGETS)
    assert status[("sclera_cgdseg_s14_256", "infer")] == "met"
    assert status[("sclera_cgdseg_s14_256", "train")] == "missed (50%)"
    assert status[("roadwork_b14_12x518", "infer")] == "no figure: no row (bench.run exit timeout)"
    assert status[("biomass_dinov3_l16_cached_head", "train")] == "no figure: no row (bench.run exit not run)"


@pytest.mark.slow
def test_gpu_check_runs_on_cpu_and_reports_every_target(tmp_path):
    """The prepared GPU command, on the CPU with the tiny backbone: one bench.run per reference with a target, the
    issue's targets each with a status (on the CPU: no figure, the optimised variant's skip reason), the bf16
    eager rows measured with their FLOPs (MFU n/a on both bases), results and a table in the output folder."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "WANDB_MODE": "disabled", "NO_ALBUMENTATIONS_UPDATE": "1", "OUT": str(tmp_path / "out")}
    cmd = [sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--tiny", "--repeats", "1", "--calls", "1",
           "--warmup", "1", "--budget", "1200"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    rows = json.loads((out / "targets.json").read_text())["rows"]
    assert {(r["config"], r["mode"]): r["target"] for r in rows} == ISSUE_TARGETS
    for row in rows:
        assert row["status"] == f"no figure: {SKIPPED['cpu']['optimised']}", row
        [eager] = [r for r in json.loads((out / f"bench-{row['config']}.json").read_text())["rows"]
                   if (r["mode"], r["variant"]) == (row["mode"], "bf16 eager")]
        assert eager["samples_per_s"] > 0 and eager["tflops"] > 0, eager
        assert eager["mfu"] is None and eager["mfu_datasheet"] is None
    table = (out / "targets.md").read_text()
    assert all(f"| {r['config']} | {r['mode']} |" in table for r in rows)
