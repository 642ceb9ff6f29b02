"""Input pipeline rate: items/s of one worker (decode, resize, augment, collate-ready tensors)."""
from __future__ import annotations

import time


def input_pipeline_rate(ref, cfg, items: int = 64) -> dict:
    from common.app import data_root, load_task
    task = load_task(cfg)
    dataset = task.datasets(data_root(cfg, task), "fit")["train"]
    n = min(items, len(dataset))
    dataset[0]
    start = time.perf_counter()
    for i in range(n):
        dataset[i]
    seconds = time.perf_counter() - start
    return {"config": ref.name, "items": n, "items_per_s": n / seconds}
