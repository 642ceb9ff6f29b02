"""Head-only training on cached backbone features equals training without the cache (augmentation off),
for every task (all three support `data.cache_features`)."""
import json

import pytest

from tests.cli import run_cli

CASES = {  # name -> the task and the overrides that switch its pixel augmentation off
    "biomass": ["task=biomass", "data.augment=[]", "model.head.dropout=0.0"],
    "sclera": ["task=sclera", "data.augment=[]"],
    "roadwork": ["task=roadwork", "data.augment=[]"],
    "roadwork-prune-before": ["task=roadwork", "data.augment=[]", "data.views=[global,center,right]",
                              "model.prune_k=2", "model.prune_where=before"],
}


def _history(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.slow
def test_cached_training_matches_uncached(case, tmp_path):
    common = ["trainer=debug", "data.cache_dtype=float32", "data.num_workers=0", *CASES[case]]
    cache = tmp_path / "cache"
    run_cli([*common, "data.cache_features=false"], tmp_path / "plain", cache)
    run_cli([*common, "data.cache_features=true"], tmp_path / "cached", cache)
    plain, cached = _history(tmp_path / "plain"), _history(tmp_path / "cached")
    monitor = [k for k in plain[0] if k.startswith("val/") and k != "val/loss"][0]
    for a, b in zip(plain, cached):
        assert abs(a[monitor] - b[monitor]) < 1e-5 and abs(a["train/loss"] - b["train/loss"]) < 1e-5
    assert list((cache / "features").rglob("*.safetensors"))


@pytest.mark.slow
def test_biomass_cache_refuses_test_time_augmentation(tmp_path):
    proc = run_cli(["task=biomass", "trainer=debug", "data.cache_features=true", "inference.tta.hflip=true"],
                   tmp_path / "r", tmp_path / "cache", check=False)
    assert proc.returncode != 0 and "data.cache_features=false for test-time augmentation" in proc.stderr


@pytest.mark.slow
def test_cache_refuses_adapters(tmp_path):
    proc = run_cli(["task=sclera", "trainer=debug", "data.cache_features=true", "peft=lora"],
                   tmp_path / "r", tmp_path / "cache", check=False)
    assert proc.returncode != 0 and "feature cache needs a frozen backbone without adapters" in proc.stderr


@pytest.mark.slow
def test_roadwork_cache_refuses_benchmark_levels(tmp_path):
    proc = run_cli(["task=roadwork", "trainer=debug", "data.cache_features=true", "data.train_benchmark_levels=true"],
                   tmp_path / "r", tmp_path / "cache", check=False)
    assert proc.returncode != 0 and "data.cache_features=false" in proc.stderr
