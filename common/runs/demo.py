"""`make demo`: train -> eval -> predict every registered task on its embedded default, then one summary table.

Each step is a plain `python run.py ...` command (printed before it runs), so the demo is also a recipe. The
steps run in this one process (common.runs.in_process), so the imports and start-up are paid once, not nine
times; each step composes its config anew, exactly as the printed command would. Every step keeps its decoded,
resized images in the image cache (STEP_ARGS): later epochs, eval and predict read them instead of decoding the
synthetic JPEGs again. The cache holds the deterministic part before augmentation, so what is trained is the same.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from common.runs.in_process import run_main

REPO = Path(__file__).resolve().parents[2]
STEP_ARGS = ["data.image_cache.enabled=true"]     # added to every step's command (module docstring)


def registered_tasks() -> list[str]:
    return sorted(p.stem for p in (REPO / "conf" / "task").glob("*.yaml"))


def run_step(task: str, mode: str, run_dir: Path, extra: list[str]) -> dict:
    args = [f"task={task}", f"mode={mode}", f"hydra.run.dir={run_dir}", *STEP_ARGS, *extra]
    print("$ python run.py " + " ".join(args), flush=True)
    code = run_main(args)
    if code:
        raise SystemExit(f"demo: `python run.py {' '.join(args)}` failed ({code})")
    return json.loads((run_dir / "metrics.json").read_text())


def demo_task(task: str, base: Path, train_args: list[str]) -> list[tuple[str, str, str, str]]:
    train = run_step(task, "train", base / task / "train", train_args)
    ckpt = train["checkpoints"]["best"]
    evaluated = run_step(task, "eval", base / task / "eval", [f"ckpt_path={ckpt}"])
    predicted = run_step(task, "predict", base / task / "predict", [f"ckpt_path={ckpt}"])
    monitor = train["monitor"]
    eval_key = monitor.replace("val/", "eval/", 1)
    rows = [(task, f"train best {monitor}", f"{train['best_value']:.4f}", ckpt)]
    if eval_key in evaluated:
        rows.append((task, eval_key, f"{evaluated[eval_key]:.4f}", str(base / task / "eval" / "metrics.json")))
    for what, path in predicted["outputs"].items():
        rows.append((task, f"predict: {what}", scored_value(Path(path), monitor.split("/", 1)[-1]), path))
    return rows


def scored_value(path: Path, metric: str) -> str:
    """The metric's value when an output is a scores file that holds it (biomass: submission vs solution)."""
    if path.suffix != ".json" or not path.is_file():
        return "-"
    value = json.loads(path.read_text()).get(metric)
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def print_table(rows: list[tuple[str, ...]]) -> None:
    header = ("task", "metric", "value", "output")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(4)]
    line = "  ".join("{:<%d}" % w for w in widths)
    print("\n" + line.format(*header))
    print(line.format(*("-" * w for w in widths)))
    for row in rows:
        print(line.format(*row))


def main(train_args: list[str]) -> None:
    """train_args: overrides added to every training run (`make demo DEMO_ARGS='trainer.max_epochs=1'`)."""
    base = REPO / "logs" / "demo" / time.strftime("%Y-%m-%d_%H-%M-%S")
    start, rows = time.perf_counter(), []
    for task in registered_tasks():
        rows += demo_task(task, base, train_args)
    print_table(rows)
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s; run directories under {base}")


if __name__ == "__main__":
    main(sys.argv[1:])
