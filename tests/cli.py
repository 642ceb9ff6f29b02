"""Run `python run.py ...` in a subprocess, the way users do."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOY = ["task=toy", f"hydra.searchpath=[file://{REPO / 'tests' / 'toy' / 'conf'}]"]


def run_cli(args: list[str], run_dir: Path, cache_dir: Path, env: dict | None = None,
            check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
                "NO_ALBUMENTATIONS_UPDATE": "1", **(env or {})}
    cmd = [sys.executable, str(REPO / "run.py"), *args, f"hydra.run.dir={run_dir}",
           f"paths.cache_dir={cache_dir}", "trainer.progress=plain"]
    if not any(a.startswith("logger=") for a in args):
        cmd.append("logger=none")
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"run.py {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def synthetic_root(run_dir: Path) -> Path:
    """The synthetic dataset the run in `run_dir` used (from its saved config)."""
    from omegaconf import OmegaConf

    from common.app import synthetic_root as root_of
    return root_of(OmegaConf.load(Path(run_dir) / ".hydra" / "config.yaml"))
