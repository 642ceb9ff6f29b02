"""The GPU check of issue 29: BENCHMARKS.md's reference table re-measured against its targets in one command, sized
to finish within 8 minutes on one H100, every result under --out (default $OUT).

    OUT=<folder> python3 -m bench.gpu_check                           # on the GPU machine
    python3 -m bench.gpu_check --device cpu --tiny --out <folder>     # the CPU check (tests/test_bench.py)

Each reference with a target (bench.references.REFERENCES) runs in its own `python -m bench.run --only <name>`
process, at its composed configuration's batch size, with two variants: `optimised` (the path the targets are
set for) and `bf16 eager` (what mode=predict runs without compile; its FLOP count gives TFLOP/s and MFU on both
bases). A process gets the budget left divided by the references left, so one slow reference cannot take the
others' time; a reference cut short keeps the rows it measured (bench.run rewrites its JSON after every row).
Writes bench-<name>.json and bench-<name>.log per reference, then targets.json and targets.md: per target the
measured samples/s, met or missed (or why there is no figure), TFLOP/s and MFU against the datasheet's and the
measured matmul peak.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.references import REFERENCES
from common.utils.atomic import atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 460           # 8 minutes less start-up: the whole check, the H100's compile times included
VARIANTS = ("bf16 eager", "optimised")
TARGET_VARIANT = "optimised"


def run_reference(name: str, out: Path, device: str, tiny: bool, timeout: float, sizes: list[str]) -> dict:
    """One bench.run process for reference `name`; its JSON (what it measured, even when cut short) or an empty
    result, with the process's exit status."""
    result, log = out / f"bench-{name}.json", out / f"bench-{name}.log"
    cmd = [sys.executable, "-m", "bench.run", "--only", name, "--device", device, "--variants", *VARIANTS,
           "--out", str(result), *sizes, *(["--tiny"] if tiny else [])]
    with open(log, "w") as handle:
        try:
            code = subprocess.run(cmd, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    found = json.loads(result.read_text()) if result.is_file() else {"rows": []}
    return {**found, "exit": code}


def verdicts(results: dict[str, dict]) -> list[dict]:
    """One row per (reference, mode) target: the optimised variant's figure against it."""
    rows = []
    for ref in REFERENCES:
        for mode, target in ref.targets.items():
            found = results.get(ref.name, {"rows": [], "exit": "not run"})
            row = next((r for r in found["rows"] if (r["mode"], r["variant"]) == (mode, TARGET_VARIANT)), None)
            figure = row.get("samples_per_s") if row else None
            if figure is None:
                why = (row.get("skipped") or row.get("error")) if row else f"no row (bench.run exit {found['exit']})"
                status = f"no figure: {why}"
            else:
                status = "met" if figure >= target else f"missed ({figure / target:.0%})"
            rows.append({"config": ref.name, "mode": mode, "target": target, "samples_per_s": figure,
                         "batch": row.get("batch") if row else None, "status": status,
                         "tflops": row.get("tflops") if row else None, "mfu_datasheet": row.get("mfu_datasheet")
                         if row else None, "mfu_matmul": row.get("mfu") if row else None,
                         "device": found.get("device")})
    return rows


def _cell(value, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(rows: list[dict], seconds: float) -> str:
    lines = [f"GPU check (python -m bench.gpu_check), {seconds:.0f} s; device {rows[0]['device'] if rows else '?'}", "",
             "| configuration | mode | batch | samples/s | target | status | TFLOP/s | MFU datasheet | MFU matmul |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['config']} | {r['mode']} | {r['batch'] or ''} | {_cell(r['samples_per_s'])} | {r['target']:,} | "
              f"{r['status']} | {_cell(r['tflops'])} | {_cell(r['mfu_datasheet'], '.2f')} | "
              f"{_cell(r['mfu_matmul'], '.2f')} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=os.environ.get("OUT"), help="results folder (default $OUT)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny backbone, small inputs (the CPU check)")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for every reference together")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    if args.out is None:
        parser.error("--out or $OUT: the folder the results go to")
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = ["--repeats", str(args.repeats), "--calls", str(args.calls), "--warmup", str(args.warmup)]
    started, results = time.monotonic(), {}
    measured = [ref for ref in REFERENCES if ref.targets]
    for k, ref in enumerate(measured):
        left = args.budget - (time.monotonic() - started)
        results[ref.name] = run_reference(ref.name, args.out, args.device, args.tiny, left / (len(measured) - k),
                                          sizes)
        print(f"{ref.name}: exit {results[ref.name]['exit']}, {len(results[ref.name]['rows'])} rows", flush=True)
    rows, seconds = verdicts(results), time.monotonic() - started
    atomic_write_json(args.out / "targets.json", {"seconds": seconds, "rows": rows})
    table = markdown(rows, seconds)
    atomic_write_text(args.out / "targets.md", table)
    print(table)


if __name__ == "__main__":
    main()
