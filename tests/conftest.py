import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

if "VFM_SYNTH_DIR" not in os.environ:
    # One synthetic dataset per task and settings for the whole session (xdist workers inherit the variable):
    # generating roadwork's takes ~30 s. Keyed by the generator's settings, written atomically under a lock.
    os.environ["VFM_SYNTH_DIR"] = tempfile.mkdtemp(prefix="vfm-test-synth-")
    atexit.register(shutil.rmtree, os.environ["VFM_SYNTH_DIR"], True)

# The CPU cores shared among the xdist workers (and the run.py processes they start): two workers of two threads
# each on two cores oversubscribe OpenMP and run a training epoch ~6x slower than one thread each.
THREADS = max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
# Not MKL_NUM_THREADS: run.py subprocesses get OMP_NUM_THREADS=1, which an inherited MKL_NUM_THREADS=2 overrides.
os.environ["OMP_NUM_THREADS"] = str(THREADS)

import torch  # noqa: E402

torch.set_num_threads(THREADS)

from common.runs.resolvers import register_resolvers  # noqa: E402  (configs composed in-process use ${cwd:})

register_resolvers()


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _no_hydra_config_between_tests():
    """Tests that compose with return_hydra_config set Hydra's process-wide HydraConfig; code that asks
    `HydraConfig.initialized()` in a later test of the same worker must not see it."""
    yield
    from hydra.core.hydra_config import HydraConfig
    HydraConfig.instance().cfg = None
