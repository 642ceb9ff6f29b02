"""Head-sweep trial time with and without the feature cache (frozen backbone, no adapters).

    python -m bench.cache_trials [--trials 3] [--] [run.py overrides ...]

Runs `run.py task=biomass` trials one after another, as a sweep worker would: first without the cache, then
with it (the first cached trial fills the cache, the next ones only read it). Prints seconds per trial.
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


def trial(overrides: list[str], run_dir: Path, cache_dir: Path) -> float:
    cmd = [sys.executable, "run.py", "task=biomass", "logger=none", "trainer.progress=off", "data.augment=[]",
           f"hydra.run.dir={run_dir}", f"paths.cache_dir={cache_dir}", *overrides]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="vfm-cache-trials-"))
    rows = []
    for cached in (False, True):
        for k in range(args.trials):
            seconds = trial([*args.overrides, f"data.cache_features={str(cached).lower()}"],
                            base / f"{'cached' if cached else 'plain'}-{k}", base / "cache")
            rows.append({"cache": cached, "trial": k, "seconds": seconds})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'cache':<6} {'trial':>5} {'seconds':>8}")
    for r in rows:
        print(f"{str(r['cache']):<6} {r['trial']:>5} {r['seconds']:>8.1f}")
    if args.out:
        atomic_write_text(args.out, json.dumps({"overrides": args.overrides, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
