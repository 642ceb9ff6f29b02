"""Input pipeline rate: items/s of one data worker (decode, resize, augment -> tensors), with and without the
disk cache of decoded + resized images (data.image_cache), so a reader can tell whether a run is input-bound.

    python -m bench.pipeline                                  # every task's default synthetic train set
    python -m bench.pipeline --task roadwork --items 150 -- data.views=highres12 data.view_size=224

One process, `dataset[i]` in a loop (no DataLoader): the rate of one worker. "cold" is the first pass with the
cache (decode + write), "warm" a later pass (read). Rates are per second of this process's CPU time, which is
what a worker spends and is robust to other load on a shared machine.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from common.utils.hydra_lines import trusted_targets, version_base

REPO = Path(__file__).resolve().parents[1]
TASKS = ("biomass", "sclera", "roadwork")


def _train_set(task_name: str, overrides: list[str], cache_dir: Path | None, items: int):
    from hydra import compose, initialize_config_dir
    from torch.utils.data import Subset

    from common.training.dataset_root import data_root
    from common.training.parts import load_task
    over = [f"task={task_name}", "logger=none", f"paths.root_dir={REPO}", *overrides]
    if cache_dir is not None:
        over += ["data.image_cache.enabled=true", f"data.image_cache.dir={cache_dir}"]
    with initialize_config_dir(str(REPO / "conf"), **version_base()):
        cfg = compose("config", overrides=over)
    task = load_task(cfg)
    dataset = task.datasets(data_root(cfg, task), "fit")["train"]
    return Subset(dataset, range(min(items, len(dataset))))


def _rate(dataset) -> float:
    start = time.process_time()
    for i in range(len(dataset)):
        dataset[i]
    return len(dataset) / max(time.process_time() - start, 1e-9)


def pipeline_rates(task_name: str, overrides: list[str], items: int) -> dict:
    """{"no cache", "cold", "warm"} items/s of one worker on the task's training set (with augmentation)."""
    plain = _train_set(task_name, overrides, None, items)
    _rate(plain)                                  # the OS page cache and file digests warm for a fair baseline
    folder = Path(tempfile.mkdtemp(prefix="vfm_image_cache_"))
    try:
        cached = _train_set(task_name, overrides, folder, items)
        cold = _rate(cached)
        return {"task": task_name, "overrides": overrides, "items": len(plain), "no cache": _rate(plain),
                "cold": cold, "warm": _rate(cached)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def input_pipeline_rate(ref, cfg, items: int = 64) -> dict:
    """bench.run: one uncached pass over a reference configuration's training set."""
    from common.training.dataset_root import data_root
    from common.training.parts import load_task
    task = load_task(cfg)
    dataset = task.datasets(data_root(cfg, task), "fit")["train"]
    n = min(items, len(dataset))
    dataset[0]
    start = time.perf_counter()
    for i in range(n):
        dataset[i]
    return {"config": ref.name, "items": n, "items_per_s": n / (time.perf_counter() - start)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=TASKS, action="append", help="default: every task")
    parser.add_argument("--items", type=int, default=120)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides after --")
    args = parser.parse_args()
    import torch
    torch.set_num_threads(1)
    print(f"{'task':9} {'overrides':40} {'items':>5} {'no cache':>9} {'cold':>7} {'warm':>7}  (items/s, one worker)")
    for task_name in args.task or TASKS:
        r = pipeline_rates(task_name, list(args.overrides), args.items)
        print(f"{task_name:9} {' '.join(r['overrides'])[:40]:40} {r['items']:5d} {r['no cache']:9.1f} "
              f"{r['cold']:7.1f} {r['warm']:7.1f}", flush=True)


if __name__ == "__main__":
    with trusted_targets():
        main()
