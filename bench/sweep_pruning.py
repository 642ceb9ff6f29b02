"""What pruning saves: one head sweep on cached features run with no pruner, MedianPruner and HyperbandPruner.

    python -m bench.sweep_pruning [--budget 40] [--out results.json] [--] [run.py overrides ...]

Each sweep is `run.py -m task=biomass sweeps=biomass_head data.cache_features=true` with the same seed and budget
(`budget_counts=finished`: every sweep runs `budget` trials, pruned or not), in its own log folder and sharing one
feature cache, filled by a plain run first. Prints, per pruner: the best value found, the trials pruned, the
training epochs run (every trial's epochs_run) against running every trial to the end, and the wall time.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common.utils.atomic import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
PRUNERS = ("none", "median", "hyperband")          # options of hydra/sweeper/pruner (conf/hydra/sweeper/pruner/)


def run(args: list[str], log_dir: Path, cache_dir: Path, multirun: bool = False) -> float:
    cmd = [sys.executable, "run.py", *(["-m"] if multirun else []), "task=biomass", "logger=none", "trainer.progress=off", "data.cache_features=true",
           f"paths.log_dir={log_dir}", f"paths.cache_dir={cache_dir}", *args]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def study_figures(log_dir: Path, study_name: str) -> dict:
    from optuna.trial import TrialState

    from sweeps.storage import load_study
    study = load_study(f"sqlite:///{log_dir / 'sweeps' / study_name / 'optuna.db'}", study_name)
    ran = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
           if not t.user_attrs.get("surplus")]
    return {"trials": len(ran), "pruned": sum(t.state == TrialState.PRUNED for t in ran),
            "best": study.best_value, "epochs": sum(t.user_attrs["epochs_run"] for t in ran),
            "epochs_to_the_end": sum(t.user_attrs["max_epochs"] for t in ran)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=int, default=40)
    parser.add_argument("--pruners", nargs="+", default=list(PRUNERS), choices=PRUNERS)
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="vfm-sweep-pruning-"))
    run([*args.overrides, f"hydra.run.dir={base / 'fill-cache'}"], base / "fill", base / "cache")
    rows = []
    for name in args.pruners:
        seconds = run(["sweeps=biomass_head", f"hydra.sweeper.budget={args.budget}",
                       "hydra.sweeper.budget_counts=finished", f"hydra/sweeper/pruner={name}",
                       *args.overrides], base / name, base / "cache", multirun=True)
        rows.append({"pruner": name, **study_figures(base / name, "biomass_head"), "seconds": seconds})
        print(json.dumps(rows[-1]), flush=True)
    reference = next((r for r in rows if r["pruner"] == "none"), None)
    print(f"\n{'pruner':<10} {'trials':>6} {'pruned':>6} {'best':>8} {'vs none':>8} {'epochs':>7} {'of':>5} "
          f"{'share':>6} {'wall s':>7}")
    for r in rows:
        gap = f"{r['best'] - reference['best']:+.4f}" if reference else ""
        share = r["epochs"] / reference["epochs"] if reference else r["epochs"] / r["epochs_to_the_end"]
        print(f"{r['pruner']:<10} {r['trials']:>6} {r['pruned']:>6} {r['best']:>8.4f} {gap:>8} {r['epochs']:>7} "
              f"{r['epochs_to_the_end']:>5} {share:>6.0%} {r['seconds']:>7.0f}")
    if args.out:
        atomic_write_text(args.out, json.dumps({"budget": args.budget, "overrides": args.overrides, "rows": rows},
                                               indent=2))


if __name__ == "__main__":
    main()
