"""Cached head trials: what a trial on the feature cache costs against one without it (biomass, frozen backbone).

    python -m bench.cached_trials [--pairs 3] [--sweep-trials 10] [--out bench/results/<file>.json]

Every figure is CPU time (user + system of this process and of its finished children: DataLoader workers, run.py
processes) with one torch thread (OMP_NUM_THREADS=1 is set for this process and its children), A = uncached and
B = cached interleaved (A, B, A, B...) after one warm-up of each (the warm-up B fills the cache), so that a machine
whose load drifts shifts both alike. Both sides run `data.augment=[]` (the cached trial cannot augment), so they do
the same work but the backbone's. Ratios are B / A per pair; the table gives their minimum and median.

1. `sweep`: trials one after another in this process, as the Optuna sweeper runs them (run.py's Hydra entry called
   again; imports paid once): `task=biomass backbone=dinov2_s14 backbone.weights=null` at the task's input size
   (data.image_size), `--sweep-epochs` epochs on `--sweep-images` synthetic training images. Target B/A <= 0.25.
2. `process`: `run.py task=biomass` on the tiny backbone (the task's embedded default), each trial a fresh process.
   Target B/A <= 0.6.
3. `epoch`: one cache-hit training epoch through the suite's loader (the datasets read the disk cache;
   data.num_workers=0, so that every read counts here) against the same batches held in memory, both by
   Trainer.train_epoch on the tiny backbone's head. Target hit / in-memory <= 1.2.
4. `sweep10`: `run.py -m task=biomass sweeps=biomass_head data.cache_features=true hydra.sweeper.budget=N`, one
   process of N cached trials end to end after a run filled the cache: CPU and wall seconds per trial.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

from common.runs.in_process import run_main  # noqa: E402
from common.utils.atomic import atomic_write_text  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BASE = ["task=biomass", "logger=none", "trainer.progress=off", "data.augment=[]"]
TARGETS = {"sweep": 0.25, "process": 0.6, "epoch": 1.2}


def cpu_seconds() -> float:
    """User + system seconds of this process and of its children that have finished."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def in_process(args: list[str]) -> None:
    """One run.py run in this process (Hydra's entry, as a sweep's launcher calls the task function; the modules
    stay imported from one run to the next)."""
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        code = run_main(args)
    if code:
        raise RuntimeError(f"run.py {' '.join(args)} failed ({code})")


def as_process(args: list[str]) -> None:
    subprocess.run([sys.executable, "run.py", *args], cwd=REPO, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def timed(fn, args: list[str]) -> dict:
    cpu, wall = cpu_seconds(), time.perf_counter()
    fn(args)
    return {"cpu_s": cpu_seconds() - cpu, "wall_s": time.perf_counter() - wall}


def interleaved(name: str, fn, common: list[str], pairs: int, base: Path) -> list[dict]:
    """Warm-ups (A, then B filling the cache), then `pairs` pairs of A (uncached) and B (cached)."""
    rows = []
    for k in range(-1, pairs):
        pair = {}
        for side, cached in (("A", "false"), ("B", "true")):
            args = [*common, f"data.cache_features={cached}", f"hydra.run.dir={base / name / f'{side}{k}'}"]
            pair[side] = timed(fn, args)
        if k >= 0:
            rows.append({"pair": k, **pair, "ratio": pair["B"]["cpu_s"] / pair["A"]["cpu_s"]})
            print(json.dumps({name: rows[-1]}), flush=True)
    return rows


def epoch_ratio(cache_dir: Path, repeats: int) -> list[dict]:
    """A cache-hit epoch through the suite's loader against the same batches held in memory (after a run filled
    the cache): Trainer.train_epoch over each, interleaved, `repeats` times."""
    import torch

    from bench.run import compose_overrides
    from common.cluster.distributed import DistContext
    from common.tracking.tracker import Tracker
    from common.training.dataset_root import data_root
    from common.training.fit_state import FitState
    from common.training.parts import build_parts, load_task
    from common.training.trainer import Trainer
    from common.utils.seed import seed_everything
    cfg = compose_overrides([*BASE, "data.cache_features=true", "data.num_workers=0", "trainer.device=cpu",
                             f"paths.cache_dir={cache_dir}", f"paths.output_dir={cache_dir.parent / 'epoch'}"])
    seed_everything(int(cfg.seed))
    task = load_task(cfg)
    sets = task.datasets(data_root(cfg, task), "fit")
    model, criterion, _ = build_parts(task, task.fit_stats(sets["train"]))
    trainer = Trainer(cfg, Path(cfg.paths.output_dir), Tracker(), DistContext(device=torch.device("cpu")))
    loader = trainer.loader(sets["train"], task.collate, train=True)
    held = list(loader)
    if model.backbone.built or not all(type(b["image"]).__name__ == "CachedFeatures" for b in held):
        raise RuntimeError("the cache did not serve every training item: fill it first")
    trainer.prepare(model, criterion, steps_per_epoch=len(held))
    rows = []
    for k in range(-1, repeats):
        pair = {}
        for side, batches in (("memory", lambda: iter(held)), ("disk", lambda: iter(loader))):
            cpu, wall = cpu_seconds(), time.perf_counter()
            trainer.train_epoch(batches(), FitState())
            pair[side] = {"cpu_s": cpu_seconds() - cpu, "wall_s": time.perf_counter() - wall}
        if k >= 0:
            rows.append({"pair": k, **pair, "ratio": pair["disk"]["cpu_s"] / pair["memory"]["cpu_s"]})
            print(json.dumps({"epoch": rows[-1]}), flush=True)
    return rows


def sweep_trials(budget: int, base: Path) -> dict:
    """`budget` cached trials of the head sweep in one run.py -m process (the cache filled before)."""
    args = ["-m", *BASE, "sweeps=biomass_head", "data.cache_features=true", f"hydra.sweeper.budget={budget}",
            "hydra/sweeper/pruner=none", f"paths.log_dir={base / 'sweep'}", f"paths.cache_dir={base / 'cache'}"]
    row = timed(as_process, args)
    return {"trials": budget, **row, "cpu_s_per_trial": row["cpu_s"] / budget,
            "wall_s_per_trial": row["wall_s"] / budget}


def summary(rows: list[dict]) -> dict:
    ratios = [r["ratio"] for r in rows]
    return {"min": min(ratios), "median": statistics.median(ratios), "max": max(ratios)}


def print_table(result: dict) -> None:
    print(f"\n{'measure':<8} {'pairs':>5} {'A cpu s':>9} {'B cpu s':>9} {'B/A min':>8} {'median':>7} {'target':>7} "
          f"{'met':>4}")
    for name, (a, b) in (("sweep", ("A", "B")), ("process", ("A", "B")), ("epoch", ("memory", "disk"))):
        rows = result.get(name)
        if not rows:
            continue
        s, target = summary(rows), TARGETS[name]
        a_cpu = statistics.median(r[a]["cpu_s"] for r in rows)
        b_cpu = statistics.median(r[b]["cpu_s"] for r in rows)
        print(f"{name:<8} {len(rows):>5} {a_cpu:>9.2f} {b_cpu:>9.2f} {s['min']:>8.3f} {s['median']:>7.3f} "
              f"{target:>7} {'yes' if s['median'] <= target else 'no':>4}")
    if result.get("sweep10"):
        r = result["sweep10"]
        print(f"\n{r['trials']} cached trials in one sweep process: {r['cpu_s_per_trial']:.2f} CPU s and "
              f"{r['wall_s_per_trial']:.2f} wall s per trial (start-up included)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=["sweep", "process", "epoch", "sweep10"],
                        choices=["sweep", "process", "epoch", "sweep10"])
    parser.add_argument("--sweep-epochs", type=int, default=2)
    parser.add_argument("--sweep-images", type=int, default=40, help="synthetic training images of the sweep trials")
    parser.add_argument("--sweep-trials", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import torch
    torch.set_num_threads(1)
    base = Path(tempfile.mkdtemp(prefix="vfm-cached-trials-"))
    result = {"device": f"cpu ({os.cpu_count()} cores, 1 torch thread)", "pairs": args.pairs}
    cache = [f"paths.cache_dir={base / 'cache'}"]

    def save() -> None:                 # after every section: a run stopped later keeps what it measured
        result["summary"] = {name: summary(result[name]) for name in ("sweep", "process", "epoch") if result.get(name)}
        if args.out:
            atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    if "sweep" in args.only:
        common = [*BASE, *cache, "backbone=dinov2_s14", "backbone.weights=null",
                  f"trainer.max_epochs={args.sweep_epochs}", f"data.synth.n_train={args.sweep_images}"]
        result["sweep_overrides"] = common
        result["sweep"] = interleaved("sweep", in_process, common, args.pairs, base)
        save()
    if "process" in args.only:
        result["process"] = interleaved("process", as_process, [*BASE, *cache], args.pairs, base)
        save()
    if "epoch" in args.only or "sweep10" in args.only:
        as_process([*BASE, *cache, "data.cache_features=true", f"hydra.run.dir={base / 'fill'}"])
    if "epoch" in args.only:
        result["epoch"] = epoch_ratio(base / "cache", args.pairs)
        save()
    if "sweep10" in args.only:
        result["sweep10"] = sweep_trials(args.sweep_trials, base)
        save()
    print_table(result)


if __name__ == "__main__":
    main()
