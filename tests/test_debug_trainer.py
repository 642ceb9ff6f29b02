"""trainer=debug caps the epochs of a run even under an experiment preset, whose trainer.max_epochs is merged
after the trainer group: every preset composed with trainer=debug runs at most the debug trainer's epochs."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"
PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def _epochs_run(cfg) -> int:
    """The epochs one process trains (common.training.trainer.Trainer.fit: max_epochs, cut by epochs_per_run)."""
    cap = cfg.trainer.epochs_per_run
    return min(int(cfg.trainer.max_epochs), int(cap)) if cap else int(cfg.trainer.max_epochs)


@pytest.mark.parametrize("preset", PRESETS)
def test_debug_trainer_caps_epochs_under_every_preset(preset):
    debug = OmegaConf.load(CONF / "trainer" / "debug.yaml")
    with initialize_config_dir(str(CONF), version_base=None):
        cfg = compose("config", overrides=[f"experiment={preset}", "trainer=debug"])
        plain = compose("config", overrides=[f"experiment={preset}"])
    assert _epochs_run(cfg) <= int(debug.max_epochs), preset
    assert _epochs_run(plain) == int(plain.trainer.max_epochs)          # without debug the preset's budget stands
