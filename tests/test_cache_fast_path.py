"""The feature cache's fast path: on a hit the dataset reads the stored tokens in the DataLoader workers in place of
the pixels, no image is decoded and no backbone is built (it is built once, at the first miss); training and
evaluation give what reading the cache inside the model's forward gives."""
from __future__ import annotations

import json

import pytest
import torch

from common.data import cached_encoder, feature_cache
from common.data.datasets import default_collate
from common.data.cached_encoder import CachedEncoder, encode
from common.data.feature_cache import CachedFeatures, FeatureCache, pixels_or_features
from common.models.backbone import create_backbone
from tests.cli import run_cli
from tests.test_cache import SIZE, TINY

# a whole epoch of every split of the synthetic set, so that the first run fills the cache
BIOMASS = ["task=biomass", "trainer=debug", "trainer.limit_train_batches=null", "trainer.limit_val_batches=null",
           "trainer.max_epochs=1", "data.cache_features=true", "data.cache_dtype=float32", "model.head.dropout=0.0"]


def _factory(calls: list):
    def build():
        calls.append(1)
        return create_backbone(**TINY)
    return build


def _never(*args, **kwargs):
    raise AssertionError("called on a cache hit")


def test_a_hit_builds_no_backbone_and_a_miss_builds_it_once(tmp_path):
    cache = FeatureCache.for_backbone(tmp_path, TINY, SIZE, dtype="float32")
    images = torch.rand(3, 3, *SIZE, generator=torch.Generator().manual_seed(0))
    keys = ["a", "b", "c"]
    calls = []
    first = CachedEncoder(_factory(calls), cache)      # a cold cache: built at once, its description written
    assert calls == [1] and cache.spec_path.is_file()
    want = first(images, keys)

    calls.clear()
    encoder = CachedEncoder(_factory(calls), cache)
    backbone = create_backbone(**TINY)
    assert (encoder.patch_size, encoder.embed_dims, encoder.layers, encoder.layer_strides) == \
           (backbone.patch_size, backbone.embed_dims, backbone.layers, backbone.layer_strides)
    items = [{"image": pixels_or_features(cache, k, _never), "cache_key": k} for k in keys]
    batch = default_collate(items)
    assert isinstance(batch["image"], CachedFeatures) and tuple(batch["image"].image_size) == SIZE
    got = encode(encoder, batch["image"], batch["cache_key"])
    assert calls == [] and not encoder.built and encoder.state_dict() == {}
    for a, b in zip(want.tokens + [want.cls], got.tokens + [got.cls]):
        assert torch.equal(a, b)

    others = torch.rand(2, 3, *SIZE, generator=torch.Generator().manual_seed(1))
    encoder(others, ["d", "e"])
    encoder(others, ["f", "g"])
    assert calls == [1] and encoder.backbone_calls == 2


def test_a_batch_mixing_hits_and_misses_gets_pixels(tmp_path):
    cache = FeatureCache.for_backbone(tmp_path, TINY, SIZE, dtype="float32")
    encoder = CachedEncoder(create_backbone(**TINY), cache)
    images = torch.rand(2, 3, *SIZE, generator=torch.Generator().manual_seed(0))
    encoder(images[:1], ["a"])
    values = [pixels_or_features(cache, k, lambda i=i: images[i]) for i, k in enumerate(["a", "b"])]
    assert isinstance(values[0], feature_cache.CachedItem) and isinstance(values[1], torch.Tensor)
    assert torch.equal(default_collate([{"image": v} for v in values])["image"], images)
    # features of another cache (another backbone) are refused, not used
    other = CachedEncoder(create_backbone(**TINY), FeatureCache.for_backbone(tmp_path, TINY, (14, 14), "float32"))
    with pytest.raises(ValueError, match="build the model and its datasets from one config"):
        encode(other, default_collate([{"image": values[0]}])["image"], ["a"])


def _state(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["model"]


def _history(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_cache_hit_run_decodes_nothing_builds_nothing_and_reads_in_workers(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    run_cli([*BIOMASS, "data.num_workers=0"], tmp_path / "fill", cache)
    get = FeatureCache.get

    def get_in_workers(self, key):
        if torch.utils.data.get_worker_info() is None:
            raise AssertionError("cached features read in the main process")
        return get(self, key)
    monkeypatch.setattr("biomass.data.load_rgb", _never)                 # the image decoder
    monkeypatch.setattr(cached_encoder, "build_encoder", _never)          # the backbone factory
    monkeypatch.setattr("common.models.backbone.create_backbone", _never)
    monkeypatch.setattr(FeatureCache, "get", get_in_workers)
    run_cli([*BIOMASS, "data.num_workers=2", "trainer.max_epochs=2"], tmp_path / "hits", cache)
    assert len(_history(tmp_path / "hits")) == 2


@pytest.mark.slow
def test_reading_in_the_dataset_trains_as_reading_in_forward(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    run_cli([*BIOMASS, "data.num_workers=0"], tmp_path / "fill", cache)
    args = [*BIOMASS, "data.num_workers=0", "trainer.max_epochs=2", "seed=3"]
    run_cli(args, tmp_path / "fast", cache)
    # the datasets without the cache: pixels and keys, the encoder reads the tokens in forward
    monkeypatch.setattr("biomass.task.feature_cache_of", lambda *a, **k: None)
    run_cli(args, tmp_path / "forward", cache)
    fast, forward = _state(tmp_path / "fast"), _state(tmp_path / "forward")
    assert fast.keys() == forward.keys() and all(torch.equal(fast[k], forward[k]) for k in fast)
    drop = ("time", "seconds", "per_s")       # speeds differ, nothing else may
    assert [{k: v for k, v in row.items() if not any(d in k for d in drop)} for row in _history(tmp_path / "fast")] \
        == [{k: v for k, v in row.items() if not any(d in k for d in drop)} for row in _history(tmp_path / "forward")]


@pytest.mark.slow
def test_a_checkpoint_of_a_cached_run_evaluates_as_with_its_backbone(tmp_path):
    cache = tmp_path / "cache"
    run_cli([*BIOMASS, "data.num_workers=0"], tmp_path / "train", cache)
    ckpt = tmp_path / "train" / "checkpoints" / "best.pt"
    assert not any(k.startswith("backbone.") for k in torch.load(ckpt, weights_only=True)["model"])
    values = {}
    for cached in ("true", "false"):
        run_cli(["task=biomass", "mode=eval", f"ckpt_path={ckpt}", f"data.cache_features={cached}",
                 "data.num_workers=0"], tmp_path / f"eval-{cached}", cache)
        metrics = json.loads((tmp_path / f"eval-{cached}" / "metrics.json").read_text())
        values[cached] = {k: v for k, v in metrics.items() if k.startswith("eval/")}
    assert values["true"] and values["true"] == values["false"]
