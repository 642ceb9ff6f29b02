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
from bench.run import DEFAULT_VARIANTS, SKIPPED

REPO = Path(__file__).resolve().parents[1]


def run_cpu_bench(out: Path) -> tuple[dict, str]:
    # MKL_NUM_THREADS too: conftest sets it to the worker's share (2 when pytest runs without -n), and torch then
    # takes 2 intra-op threads despite OMP_NUM_THREADS=1: beside other work on 2 cores the sclera reference alone
    # took 108 s instead of 29 s
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "WANDB_MODE": "disabled", "NO_ALBUMENTATIONS_UPDATE": "1"}
    cmd = [sys.executable, "-m", "bench.run", "--device", "cpu", "--tiny", "--repeats", "1", "--out", str(out),
           "--cache-dir", str(out.parent / "cache")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"bench.run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(out.read_text()), proc.stdout


def row_of(rows: list[dict], config: str, mode: str, variant: str) -> dict:
    [row] = [r for r in rows if (r["config"], r["mode"], r["variant"]) == (config, mode, variant)]
    return row


@pytest.mark.slow
def test_every_reference_runs_on_cpu(tmp_path):
    """One bench.run (~50 s on 2 shared cores): the JSON holds every reference with a finite positive rate for
    each measured variant and a reason for each skipped one, and the printed table lists every row."""
    results, stdout = run_cpu_bench(tmp_path / "bench.json")
    rows = results["rows"]
    assert {r["config"] for r in rows} == {ref.name for ref in REFERENCES}
    assert results["timing"] == "time.perf_counter" and results["tiny"] is True
    assert results["matmul_peak_tflops"] is None
    for ref in REFERENCES:
        for mode in ref.modes:
            for variant in (v for v in DEFAULT_VARIANTS["cpu"] if v not in SKIPPED["cpu"]):
                row = row_of(rows, ref.name, mode, variant)
                assert "error" not in row and "skipped" not in row, row
                assert math.isfinite(row["samples_per_s"]) and row["samples_per_s"] > 0, row
                assert row["batch"] == ref.tiny_batch and row["peak_gib"] is None, row
            for variant, reason in SKIPPED["cpu"].items():
                assert reason and row_of(rows, ref.name, mode, variant)["skipped"] == reason
            eager = row_of(rows, ref.name, mode, "fp32 eager")
            assert eager["flops_per_call"] > 0 and eager["tflops"] > 0, eager
    assert len(rows) == sum(len(ref.modes) for ref in REFERENCES) * len(DEFAULT_VARIANTS["cpu"])
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
