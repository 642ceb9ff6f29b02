"""Run `python run.py ...` the way users do: in this test process by default (Hydra's own command-line entry,
`run.main`, with sys.argv, environment, stdout / stderr, logging and warnings as a fresh process would have them),
or in a subprocess where the test needs a process of its own (`isolated=True`: signals, imports, PYTHONPATH)."""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import warnings
from pathlib import Path

from common.runs.in_process import run_main

REPO = Path(__file__).resolve().parents[1]
TOY = ["task=toy", f"hydra.searchpath=[file://{REPO / 'tests' / 'toy' / 'conf'}]"]
BASE_ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "NO_ALBUMENTATIONS_UPDATE": "1"}
# Variables read when a process starts (the interpreter, the OpenMP runtime): only a subprocess honours them.
PROCESS_ENV = ("PYTHONPATH", "PYTHONHASHSEED", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES")
# Python's default warning filters (a test process has pytest's), so warnings print to stderr once as in a new process.
PYTHON_WARNING_FILTERS = (("default", DeprecationWarning, "__main__"), ("ignore", DeprecationWarning, None),
                          ("ignore", PendingDeprecationWarning, None), ("ignore", ImportWarning, None),
                          ("ignore", ResourceWarning, None))


def run_cli(args: list[str], run_dir: Path, cache_dir: Path, env: dict | None = None,
            check: bool = True, timeout: int = 600, isolated: bool = False) -> subprocess.CompletedProcess:
    argv = [*args, f"hydra.run.dir={run_dir}", f"paths.cache_dir={cache_dir}", "trainer.progress=plain"]
    if not any(a.startswith("logger=") for a in args):
        argv.append("logger=none")
    env = env or {}
    if isolated or any(key in env for key in PROCESS_ENV):
        proc = _run_subprocess(argv, env, timeout)
    else:
        proc = _run_in_process(argv, env)
    if check and proc.returncode != 0:
        raise AssertionError(f"run.py {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def _run_subprocess(argv: list[str], env: dict, timeout: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "run.py"), *argv]
    return subprocess.run(cmd, cwd=REPO, env={**os.environ, **BASE_ENV, **env}, capture_output=True, text=True,
                          timeout=timeout)


@contextlib.contextmanager
def _patched_environ(values: dict):
    saved = dict(os.environ)
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def _preemption_handlers():
    """run.py installs the preemption handlers first thing in its process; here they last for the run only."""
    import signal

    from common.cluster import preemption
    saved = {signum: signal.getsignal(signum) for signum in preemption.SIGNALS}
    preemption.install()
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
        preemption._received.clear()   # a signal caught during the run ends with its process


@contextlib.contextmanager
def _fresh_warnings():
    with warnings.catch_warnings():
        warnings.resetwarnings()
        for action, category, module in reversed(PYTHON_WARNING_FILTERS):
            warnings.filterwarnings(action, category=category, module=module or "")
        warnings.showwarning = _print_warning
        yield


def _print_warning(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _exit_status(code: int | str, stderr: io.StringIO) -> int:
    """run_main's exit code as the process's exit status (sys.exit("text") prints the text and exits 1)."""
    if isinstance(code, int):
        return code
    stderr.write(f"{code}\n")
    return 1


def _run_in_process(argv: list[str], env: dict) -> subprocess.CompletedProcess:
    stdout, stderr = io.StringIO(), io.StringIO()
    with _patched_environ({**BASE_ENV, **env}), _fresh_warnings(), _preemption_handlers(), \
            contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = _exit_status(run_main(argv), stderr)
    return subprocess.CompletedProcess(["run.py", *argv], status, stdout.getvalue(), stderr.getvalue())


def synthetic_root(run_dir: Path) -> Path:
    """The synthetic dataset the run in `run_dir` used (from its saved config)."""
    from omegaconf import OmegaConf

    from common.training.dataset_root import synthetic_root as root_of
    return root_of(OmegaConf.load(Path(run_dir) / ".hydra" / "config.yaml"))
