"""Biomass on cached backbone features: the same training as without the cache, and no backbone call after
the first epoch."""
import json

from tests.cli import run_cli

FAST = ["task=biomass", "trainer=debug", "data.aug.p_clean=1.0", "model.head.dropout=0.0",
        "data.cache_dtype=float32", "data.num_workers=0"]


def _history(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_cached_training_matches_uncached(tmp_path):
    cache = tmp_path / "cache"
    run_cli([*FAST, "data.cache_features=false"], tmp_path / "plain", cache)
    run_cli([*FAST, "data.cache_features=true"], tmp_path / "cached", cache)
    plain, cached = _history(tmp_path / "plain"), _history(tmp_path / "cached")
    for a, b in zip(plain, cached):
        assert abs(a["val/r2_weighted"] - b["val/r2_weighted"]) < 1e-6
        assert abs(a["train/loss"] - b["train/loss"]) < 1e-6
    assert list((cache / "features").rglob("*.pt"))


def test_cache_refuses_pixel_changing_options(tmp_path):
    proc = run_cli([*FAST, "data.cache_features=true", "data.tta.hflip=true", "mode=train"], tmp_path / "r",
                   tmp_path / "cache", check=False)
    assert proc.returncode != 0 and "data.cache_features=false for test-time augmentation" in proc.stderr
