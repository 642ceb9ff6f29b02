"""A run imports only what it uses: peft (and with it transformers, 3.4 s of start-up on every run and sweep
trial) only with adapters or a text encoder, wandb (1.1 s) only with logger=wandb (common.utils.timm_import keeps timm's
optional `import wandb` out)."""
import json
import os
import subprocess
import sys

import pytest

from tests.cli import REPO

pytestmark = pytest.mark.slow   # runs run.py end to end (make test-fast leaves it out)

HEAVY = ("peft", "transformers", "wandb")
# run.py as users start it, reporting at exit which of HEAVY ended up in sys.modules
PROBE = ("import atexit, json, runpy, sys\n"
         "atexit.register(lambda: print('IMPORTED', json.dumps([m for m in %r if m in sys.modules])))\n"
         "sys.argv = ['run.py', *sys.argv[1:]]\n"
         "runpy.run_path('run.py', run_name='__main__')\n") % (HEAVY,)


def _imported(tmp_path, args: list[str]) -> list[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-c", PROBE, *args, f"hydra.run.dir={tmp_path / 'run'}",
                           f"paths.cache_dir={tmp_path / 'cache'}", "trainer.progress=plain"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("IMPORTED ")][-1]
    return json.loads(line.split(" ", 1)[1])


def test_plain_run_imports_neither_peft_nor_transformers_nor_wandb(tmp_path):
    assert _imported(tmp_path, ["task=biomass", "trainer=debug", "logger=none", "peft=none"]) == []


def test_adapters_import_peft(tmp_path):
    """The probe sees imports (so an empty list above means something)."""
    assert "peft" in _imported(tmp_path, ["task=biomass", "trainer=debug", "logger=none", "peft=lora"])


def test_wandb_logger_imports_wandb(tmp_path):
    assert "wandb" in _imported(tmp_path, ["task=biomass", "trainer=debug", "logger=wandb", "peft=none"])


# what `import common.runs.app` (run.py's dispatch) must leave to the modes, tasks and trackers that use them:
# timm -> torchvision -> torch._dynamo (the backbone builds it; sync BatchNorm only under DDP), pandas (ensembles,
# eval / predict), sklearn (folds, cv), matplotlib (curves.png after the run), wandb (logger=wandb)
DEFERRED = ("timm", "torchvision", "torch._dynamo", "pandas", "sklearn", "matplotlib", "wandb", "optuna")


def test_the_run_dispatch_imports_no_heavy_module():
    probe = f"import json, sys, common.runs.app; print(json.dumps([m for m in {DEFERRED!r} if m in sys.modules]))"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == []


def test_the_probe_sees_a_heavy_import():
    """The same probe after importing the predictor (eval / predict): pandas is there."""
    probe = "import json, sys, common.runs.app, common.inference.predictor; print(json.dumps('pandas' in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert json.loads(proc.stdout.splitlines()[-1]) is True
