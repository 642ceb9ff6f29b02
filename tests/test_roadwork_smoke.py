"""The README's CPU smoke runs of every roadwork preset (tiny backbone, debug trainer), in process:
roadwork_highres12, roadwork_highres12_light and roadwork_benchmark224 train (at most trainer=debug's 2 epochs,
whatever the preset's max_epochs), roadwork_adapt adapts the highres12 smoke checkpoint with 2 stratified folds, and
the benchmark eval writes the validator curve and the error analysis."""
import logging
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from common.runs import app

REPO = Path(__file__).resolve().parents[1]
# The README's smoke overrides (section "roadwork presets on CPU"), plus a small synthetic set for speed.
SMOKE = ["backbone=tiny", "trainer=debug", "data.view_size=28", "data.num_workers=0", "logger=none"]
HIGHRES12 = ["model.text_encoder=null"]
LIGHT = ["peft.last_n_blocks=2"]
SMALL = ["data.synth.splits.train.count=12", "data.synth.splits.val.count=8", "data.synth.splits.test.count=4",
         "data.synth.splits.train224.count=8", "data.synth.splits.val224.count=4", "data.batch_size=4",
         "trainer.limit_train_batches=2", "trainer.limit_val_batches=1"]   # 2: the presets accumulate 2 batches


def _run(tmp_path, name, overrides):
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, *SMOKE, *SMALL, f"paths.root_dir={REPO}",
                                           f"paths.output_dir={tmp_path / name}", f"paths.cache_dir={tmp_path / 'c'}"])
    app.run(cfg)
    return tmp_path / name


@pytest.mark.slow
def test_every_roadwork_preset_smoke_runs_on_cpu(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    highres = _run(tmp_path, "highres12", ["experiment=roadwork_highres12", *HIGHRES12])
    best = highres / "checkpoints" / "best.pt"
    assert best.is_file()
    assert "[epoch 1/30]" in caplog.text and "[epoch 2/30]" not in caplog.text     # 2 epochs (from 0): the cap
    light = _run(tmp_path, "light", ["experiment=roadwork_highres12_light", *LIGHT])
    assert (light / "checkpoints" / "best.pt").is_file()
    bench = _run(tmp_path, "bench224", ["experiment=roadwork_benchmark224"])
    assert (bench / "checkpoints" / "best.pt").is_file()
    adapt = _run(tmp_path, "adapt", ["experiment=roadwork_adapt", *HIGHRES12, f"adapt.init_ckpt={best}",
                                     "adapt.split=224/train", "cv.folds=2"])
    assert (adapt / "oof.csv").is_file() and "[cv] labels per fold: fold 0:" in caplog.text
    evaluated = _run(tmp_path, "eval", ["task=roadwork", "mode=eval", "benchmark=true",
                                        f"ckpt_path={bench / 'checkpoints' / 'best.pt'}"])
    for name in ("validator_curve.csv", "confusion_matrix.png", "worst_errors.png", "breakdown.csv"):
        assert (evaluated / name).is_file(), name
