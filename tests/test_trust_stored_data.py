"""What a checkpoint holds is data (issue 30): a `_target_` hidden in a tuple, in the statistics or in roadwork's
vocabularies never reaches hydra.utils.instantiate, and random containers placed anywhere in a checkpoint either
load as plain values or are refused by name: a sentinel callable they name is never called."""
from __future__ import annotations

import copy
import random
import re

import pytest
import torch
from hydra.errors import InstantiationException
from omegaconf import OmegaConf

from common.inference import predictor as inference
from common.training.checkpoint import load_checkpoint, trainable_state
from common.training.parts import load_task
from common.utils.plain_data import UntrustedData, plain_copy
from tests.test_biomass_model import STATS
from tests.test_inference_config import _cfg

CALLS: list = []
SENTINEL = f"{__name__}.sentinel"


def sentinel(*args, **kwargs):
    """What an attacker's `_target_` would run."""
    CALLS.append((args, kwargs))
    return None


def _payload(victim):
    return {"_target_": "pathlib.Path.write_text",
            "_args_": [{"_target_": "pathlib.Path", "_args_": [str(victim)]}, "import os"]}


@pytest.fixture(scope="module")
def biomass(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("biomass")
    cfg = _cfg(["task=biomass", "mode=predict"], tmp_path)
    model = load_task(cfg).build_model(STATS)
    ckpt = {"format": 1, "task": "biomass", "config": OmegaConf.to_container(cfg, resolve=True),
            "model": trainable_state(model), "stats": copy.deepcopy(STATS), "ema": None}
    return cfg, ckpt


def _save(tmp_path, ckpt, name="crafted.pt"):
    path = tmp_path / name
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("where", ["config.model.head.head", "config.data.augment.0", "config.model.views",
                                   "stats.species"])
def test_a_target_inside_a_tuple_is_refused_by_name(tmp_path, biomass, where):
    cfg, ckpt = biomass
    victim = tmp_path / "victim.pth"
    ckpt = copy.deepcopy(ckpt)
    *parents, last = where.split(".")
    node = ckpt
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[int(last) if isinstance(node, list) else last] = (_payload(victim),)
    path = _save(tmp_path, ckpt)
    for ckpt_path in (path, [path, _save(tmp_path, ckpt, "second.pt")]):     # eval, and a two-checkpoint ensemble
        with pytest.raises(UntrustedData, match=re.escape(re.sub(r"\.(\d+)", r"[\1]", where)) + r" is a builtins\.tuple"):
            inference.load_predictor(cfg, ckpt_path)
    assert not victim.exists()


def test_a_target_in_the_statistics_is_refused(tmp_path, biomass):
    """The issue's attack: stats reach `instantiate(cfg.model, stats=stats)`, which would build the node."""
    cfg, ckpt = biomass
    victim = tmp_path / "site-packages" / "evil.pth"
    victim.parent.mkdir()
    ckpt = {**ckpt, "stats": {**ckpt["stats"], "extra": _payload(victim)}}
    with pytest.raises(UntrustedData, match=r"stats\.extra\._target_ names a callable"):
        inference.load_for_inference(cfg, _save(tmp_path, ckpt))
    assert not victim.exists()


def test_roadwork_vocabularies_hold_no_target(tmp_path):
    cfg = _cfg(["task=roadwork", "mode=predict"], tmp_path)
    config = OmegaConf.to_container(cfg, resolve=True)
    victim = tmp_path / "victim.pth"
    for planted in ((_payload(victim),), _payload(victim)):
        config["data"]["vocabularies"] = {"weather": planted}
        path = _save(tmp_path, {"format": 1, "task": "roadwork", "config": config, "model": {}, "stats": {}})
        with pytest.raises(UntrustedData, match=r"data\.vocabularies\.weather"):
            inference.load_for_inference(cfg, path)
    assert not victim.exists()


def test_plain_copy_rebuilds_containers():
    stored = {"a": [1, 2.5, "x", None, True, {"b": torch.zeros(2)}]}
    copied = plain_copy(stored, "stats", "f.pt", tensors=True)
    assert copied == {"a": [1, 2.5, "x", None, True, {"b": stored["a"][5]["b"]}]}
    assert copied["a"] is not stored["a"] and copied["a"][5] is not stored["a"][5]
    for bad, message in [({"k": (1,)}, r"stats\.k is a builtins\.tuple"), ({1: 2}, r"stats\[1\] has a int key"),
                         ({"k": "${oc.env:HOME}"}, r"stats\.k=.* interpolation"),
                         ({"k": [{"_target_": "x"}]}, r"stats\.k\[0\]\._target_ names a callable"),
                         ({"k": torch.zeros(1)}, r"stats\.k is a torch\.Tensor")]:
        with pytest.raises(UntrustedData, match=message):
            plain_copy(bad, "stats", "f.pt")


# ---- property: random containers anywhere in a checkpoint ---------------------------------------------
def _random_value(rng: random.Random, depth: int = 0):
    kinds = ["int", "float", "str", "interp", "target"] + (["dict", "list", "tuple"] if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.randint(-5, 5)
    if kind == "float":
        return rng.uniform(-1, 1)
    if kind == "str":
        return rng.choice(["a", "lora", "mean", SENTINEL])
    if kind == "interp":
        return rng.choice(["${oc.env:HOME}", "x${model.head}", "${sentinel:}"])
    if kind == "target":
        return {"_target_": SENTINEL, **({"_partial_": True} if rng.random() < 0.5 else {})}
    items = [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if kind == "list":
        return items
    if kind == "tuple":
        return tuple(items)
    keys = [rng.choice(["_target_", "_args_", "head", "name", "${x}", "k"]) for _ in items]
    return {key: SENTINEL if key == "_target_" else item for key, item in zip(keys, items)}


def _places(value, path=()):
    """Every (container, key) of a nested config, where a random value can replace or be added."""
    if isinstance(value, dict):
        yield value, "planted"
        for key, item in value.items():
            yield value, key
            yield from _places(item, path + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield value, i
            yield from _places(item, path + (i,))


def test_random_containers_anywhere_never_instantiate(tmp_path, biomass):
    """300 seeded cases; the first accepted ones that change what eval builds are built (model and predictor)."""
    cfg, base = biomass
    rng = random.Random(30)
    accepted, built, rejected = 0, 0, []
    base_merged = inference.config_from_checkpoint(cfg, load_checkpoint(_save(tmp_path, base), "biomass"))
    for case in range(300):
        ckpt = copy.deepcopy(base)
        places = list(_places({"config": ckpt["config"], "stats": ckpt["stats"]}))
        container, key = rng.choice(places[1:])
        container[key] = _random_value(rng)
        path = _save(tmp_path, ckpt, f"case{case % 4}.pt")
        try:
            loaded = load_checkpoint(path, "biomass")
            merged = inference.config_from_checkpoint(cfg, loaded, str(path))
        except UntrustedData as err:
            assert str(path) in str(err)
            continue
        accepted += 1
        assert SENTINEL not in targets_in(OmegaConf.to_container(merged, resolve=True))
        assert plain_copy(loaded["stats"], "stats", str(path), tensors=True) == loaded["stats"]
        if built < 3 and merged != base_merged:
            try:
                inference.load_for_inference(cfg, path)
            except (ValueError, TypeError, KeyError, AttributeError, InstantiationException) as err:
                rejected.append(err)    # a plain value the model rejects: what matters is that nothing was called
            built += 1
    assert CALLS == [] and 0 < accepted < 300 and len(rejected) <= built


def targets_in(value):
    if isinstance(value, dict):
        return [value.get("_target_")] + [t for item in value.values() for t in targets_in(item)]
    if isinstance(value, list):
        return [t for item in value for t in targets_in(item)]
    return []


def test_accepted_random_checkpoints_build_without_calling_the_sentinel(tmp_path, biomass):
    """The random checkpoints that load (plain values in free places) build a predictor, and the sentinel they
    mention (as a plain string) is never called."""
    cfg, base = biomass
    ckpt = copy.deepcopy(base)
    ckpt["stats"]["planted"] = [SENTINEL, {"head": SENTINEL}]
    ckpt["config"]["data"]["encodings"] = {"planted": SENTINEL} if "encodings" in ckpt["config"]["data"] else {}
    inference.load_predictor(cfg, _save(tmp_path, ckpt))
    assert CALLS == []


def test_a_checkpoint_cannot_choose_the_image_cache_folder(tmp_path, biomass):
    """Before: a checkpoint switched data.image_cache on with its own folder and eval wrote .npy files there."""
    cfg, ckpt = biomass
    ckpt = copy.deepcopy(ckpt)
    ckpt["config"]["data"]["image_cache"] = {"enabled": True, "dir": str(tmp_path / "theirs")}
    merged = inference.config_from_checkpoint(cfg, load_checkpoint(_save(tmp_path, ckpt), "biomass"))
    assert OmegaConf.to_container(merged.data.image_cache) == OmegaConf.to_container(cfg.data.image_cache)
