"""What a run pays besides training (issue 29, item 2), checkouts A and B interleaved in one run.

    python -m bench.fixed_costs [--repo A_DIR B_DIR] [--repeats 3] [--trials 4] [--out results.json]

Per checkout (`--repo`, default this one; each is run with its own run.py as the working directory):
- start-up: seconds from launching `python run.py task=biomass trainer.max_epochs=1` to its first training step
  (Trainer.train_epoch entered), and which heavy modules were imported by then;
- first batch: seconds to the first batch of each epoch of `run.py task=biomass trainer.max_epochs=3
  data.num_workers=2` (the mean over epochs 1 and 2: a later epoch, where persistent workers are already up);
- sweep trial: an in-process sweep (`run.py -m task=biomass sweeps=biomass_head data.cache_features=true`, the
  feature cache filled first, --trials trials, no pruner): per trial, the share of its time (Optuna's start to
  end) outside its epochs (metrics.jsonl's epoch_seconds: training and validation).
Each figure is the median over --repeats (start-up, first batch) or over the sweep's trials; A and B alternate.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common.utils.atomic import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("timm", "torchvision", "torch._dynamo", "sklearn", "pandas", "matplotlib", "wandb", "optuna", "peft")
RUN = ["task=biomass", "trainer.progress=off", "logger=none"]

# run.py in this process, Trainer.train_epoch wrapped: `startup` prints the time and the heavy modules at the first
# training step and exits; `first-batch` prints the seconds to each epoch's first batch at exit
PROBE = """
import atexit, itertools, json, os, runpy, sys, time
from common.training.trainer import Trainer
mode, heavy, train_epoch, firsts = sys.argv[1], json.loads(sys.argv[2]), Trainer.train_epoch, []
def probe(self, batches, state):
    if mode == "startup":
        print("PROBE", json.dumps({"t": time.time(), "modules": [m for m in heavy if m in sys.modules]}), flush=True)
        os._exit(0)
    began = time.perf_counter()
    batches = iter(batches)
    first = next(batches)
    firsts.append(time.perf_counter() - began)
    return train_epoch(self, itertools.chain([first], batches), state)
Trainer.train_epoch = probe
atexit.register(lambda: print("PROBE", json.dumps({"firsts": firsts}), flush=True))
sys.argv = ["run.py", *sys.argv[3:]]
runpy.run_path("run.py", run_name="__main__")
"""


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "WANDB_MODE": "disabled", "NO_ALBUMENTATIONS_UPDATE": "1"}


def probe(repo: Path, mode: str, args: list[str]) -> tuple[dict, float]:
    """The probe's report and the launch time (time.time) of its process."""
    launched = time.time()
    proc = subprocess.run([sys.executable, "-c", PROBE, mode, json.dumps(HEAVY), *args], cwd=repo, env=_env(),
                          capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("PROBE ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{repo}: run.py {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].split(" ", 1)[1]), launched


def startup(repo: Path, work: Path) -> dict:
    report, launched = probe(repo, "startup", [*RUN, "trainer.max_epochs=1", f"hydra.run.dir={work / 'run'}",
                                               f"paths.cache_dir={work / 'cache'}"])
    return {"seconds": report["t"] - launched, "modules": report["modules"]}


def first_batch(repo: Path, work: Path) -> dict:
    report, _ = probe(repo, "first-batch", [*RUN, "trainer.max_epochs=3", "data.num_workers=2",
                                            f"hydra.run.dir={work / 'run'}", f"paths.cache_dir={work / 'cache'}"])
    firsts = report["firsts"]
    return {"epoch0": firsts[0], "later": statistics.mean(firsts[1:]), "firsts": firsts}


def sweep_trials(repo: Path, work: Path, trials: int) -> list[dict]:
    """Per trial of an in-process head sweep on cached features: seconds, seconds in its epochs, the share outside."""
    from sweeps.storage import load_study
    common = [*RUN, "data.cache_features=true", f"paths.log_dir={work / 'logs'}", f"paths.cache_dir={work / 'cache'}"]
    subprocess.run([sys.executable, "run.py", *common, "trainer.max_epochs=1", f"hydra.run.dir={work / 'fill'}"],
                   cwd=repo, env=_env(), check=True, capture_output=True)                # fills the feature cache
    subprocess.run([sys.executable, "run.py", "-m", *common, "sweeps=biomass_head", f"hydra.sweeper.budget={trials}",
                    "hydra/sweeper/pruner=none"], cwd=repo, env=_env(), check=True, capture_output=True)
    sweep = work / "logs" / "sweeps" / "biomass_head"
    study = load_study(f"sqlite:///{sweep / 'optuna.db'}", "biomass_head")
    rows = []
    for trial in study.get_trials(deepcopy=False):
        seconds = (trial.datetime_complete - trial.datetime_start).total_seconds()
        records = (sweep / f"trial-{trial.number}" / "metrics.jsonl").read_text().splitlines()
        epochs = sum(json.loads(line)["epoch_seconds"] for line in records)
        rows.append({"trial": trial.number, "seconds": seconds, "epochs": epochs, "outside": 1 - epochs / seconds})
    return rows


def med(rows: list[dict], key: str) -> float:
    return statistics.median(x[key] for x in rows) if rows else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", nargs="+", type=Path, default=[REPO], help="checkouts, run interleaved")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--skip", nargs="*", default=[], choices=["startup", "first-batch", "sweep"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="vfm-fixed-costs-"))
    results = {str(r): {"startup": [], "first_batch": [], "sweep": []} for r in args.repo}
    for k, repo in enumerate(args.repo):                       # untimed: synthetic data, cache files, page cache
        if "startup" not in args.skip:
            startup(repo, base / f"warm-{k}")
    for rep in range(args.repeats):
        for k, repo in enumerate(args.repo):
            if "startup" not in args.skip:
                results[str(repo)]["startup"].append(startup(repo, base / f"warm-{k}"))
            if "first-batch" not in args.skip:
                results[str(repo)]["first_batch"].append(first_batch(repo, base / f"batch-{k}-{rep}"))
            print(json.dumps({"repo": str(repo), "repeat": rep, **{key: v[-1] for key, v in
                                                                    results[str(repo)].items() if v}}), flush=True)
    if "sweep" not in args.skip:
        for k, repo in enumerate(args.repo):
            results[str(repo)]["sweep"] = sweep_trials(repo, base / f"sweep-{k}", args.trials)
            print(json.dumps({"repo": str(repo), "sweep": results[str(repo)]["sweep"]}), flush=True)
    print(f"\n{'checkout':<24} {'start-up s':>10} {'1st batch e0 s':>14} {'1st batch later s':>17} "
          f"{'trial s':>8} {'outside epochs':>14}  heavy modules at the first step")
    for repo, r in results.items():
        print(f"{Path(repo).name:<24} {med(r['startup'], 'seconds'):>10.2f} {med(r['first_batch'], 'epoch0'):>14.3f} "
              f"{med(r['first_batch'], 'later'):>17.3f} {med(r['sweep'], 'seconds'):>8.1f} "
              f"{med(r['sweep'], 'outside'):>14.0%}  {','.join(r['startup'][-1]['modules']) if r['startup'] else ''}")
    if args.out:
        atomic_write_text(args.out, json.dumps({"repos": [str(r) for r in args.repo], "results": results}, indent=2))


if __name__ == "__main__":
    main()
