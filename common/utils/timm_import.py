"""timm, imported without wandb: timm.utils.summary does `try: import wandb` for timm's own training scripts,
which the suite does not use, and that costs about 1.1 s of every run's start-up (and a sweep trial's). Import
timm from here (`from common.utils.timm_import import timm`); wandb stays importable for logger=wandb."""
from __future__ import annotations

import sys


def _import_timm_without_wandb():
    if "timm" in sys.modules or "wandb" in sys.modules:
        import timm
        return timm
    sys.modules["wandb"] = None            # makes `import wandb` raise ImportError inside timm
    try:
        import timm
    finally:
        del sys.modules["wandb"]
    return timm


timm = _import_timm_without_wandb()
