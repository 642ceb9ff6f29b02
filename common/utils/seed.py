"""Seed every generator the suite uses (python, numpy, torch CPU and CUDA)."""
import random
from contextlib import contextmanager

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    seed_cpu(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def seed_cpu(seed: int) -> None:
    """python, numpy and torch's CPU generator (the ones data loading draws from). torch.manual_seed would also
    visit every accelerator backend (about 1 ms): too slow once per item."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)


def item_seed(seed: int, epoch: int, position: int) -> int:
    """The seed of the item at `position` of epoch `epoch`'s global order: independent of the worker that loads
    it and of where a resumed run restarted, so that a resumed epoch draws the same augmentations."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(position)]).generate_state(1)[0])


@contextmanager
def isolated_rng():
    """Run a block without consuming or changing the process's python / numpy / torch CPU generators."""
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
