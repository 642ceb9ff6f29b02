"""Feature cache: identity, hit/miss accounting, equality with the uncached backbone, atomic concurrent writes."""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import os

import pytest
import torch
from safetensors.torch import load_file
from omegaconf import OmegaConf
from torch import nn

from common.data.cached_encoder import CachedEncoder, build_cached_encoder, encode, encoder_for
from common.data.feature_cache import FeatureCache, backbone_identity, file_digest, image_key, item_key
from common.models.backbone import Backbone, BackboneOutput, create_backbone

TINY = dict(source="timm", name="vit_small_patch14_dinov2", weights=None, layers=[1, 3], freeze=True,
            init_seed=0, lr=1.0e-5, model_kwargs=dict(embed_dim=64, depth=4, num_heads=4, img_size=224))
REG = dict(TINY, name="vit_small_patch14_reg4_dinov2")
SIZE = (28, 42)  # (H, W): a 2 x 3 patch grid, H != W so a swapped size would show


@pytest.fixture(scope="module")
def backbone():
    return create_backbone(**TINY)


@pytest.fixture(scope="module")
def reg_backbone():
    return create_backbone(**REG)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, *SIZE, generator=torch.Generator().manual_seed(seed))


def _image_files(tmp_path, images: torch.Tensor) -> list[str]:
    """One file per image whose bytes are the pixels, so the content digest follows the image."""
    paths = []
    for i, image in enumerate(images):
        path = tmp_path / "images" / f"{i}.bin"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(image.numpy().tobytes())
        paths.append(str(path))
    return paths


def _encoder(backbone, cfg, root, dtype="float32"):
    return build_cached_encoder(backbone, cfg, SIZE, root, dtype=dtype)


def _count_calls(monkeypatch, backbone) -> list[int]:
    """Patch backbone.forward with a counter of calls and of images seen."""
    calls, original = [0, 0], backbone.forward

    def counting(images):
        calls[0] += 1
        calls[1] += images.shape[0]
        return original(images)
    monkeypatch.setattr(backbone, "forward", counting)
    return calls


# ---- identity -----------------------------------------------------------------------------------
def test_file_digest_is_blake2b_of_bytes_and_follows_content(tmp_path):
    path = tmp_path / "img.bin"
    path.write_bytes(b"abc" * 1000)
    assert file_digest(path) == hashlib.blake2b(b"abc" * 1000, digest_size=20).hexdigest()
    path.write_bytes(b"abd" * 1000)
    os.utime(path, ns=(1, 1))  # a different mtime, as any real rewrite has
    assert file_digest(path) == hashlib.blake2b(b"abd" * 1000, digest_size=20).hexdigest()
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        file_digest(tmp_path / "nope.bin")


@pytest.mark.parametrize("change", [
    {"layers": [1, 2]}, {"layers": [3]}, {"init_seed": 1}, {"name": "vit_small_patch14_reg4_dinov2"},
    {"source": "hf"}, {"model_kwargs": dict(TINY["model_kwargs"], depth=5)}, {"weights": "hub"},
])
def test_identity_changes_with_every_backbone_field(change):
    assert backbone_identity(dict(TINY, **change), SIZE) != backbone_identity(TINY, SIZE)


def test_identity_changes_with_input_size_and_preprocess_but_not_lr_or_freeze():
    base = backbone_identity(TINY, SIZE)
    assert backbone_identity(TINY, (42, 28)) != base
    assert backbone_identity(TINY, SIZE, preprocess={"resize": "bilinear"}) != base
    assert backbone_identity(dict(TINY, lr=3e-4, freeze=False), SIZE) == base
    # init_seed does not matter once weights are loaded from the hub
    assert backbone_identity(dict(TINY, weights="hub", init_seed=5), SIZE) == \
        backbone_identity(dict(TINY, weights="hub"), SIZE)


def test_weights_folder_identity_is_its_files(tmp_path):
    folder = tmp_path / "hf_model"
    folder.mkdir()
    (folder / "config.json").write_text('{"hidden_size": 64}')
    (folder / "model.safetensors").write_bytes(b"w" * 32)
    first = backbone_identity(dict(TINY, source="hf", weights=str(folder)), SIZE)
    (folder / "config.json").write_text('{"hidden_size": 65}')
    os.utime(folder / "config.json", ns=(4, 4))
    assert backbone_identity(dict(TINY, source="hf", weights=str(folder)), SIZE) != first


def test_weights_file_identity_is_its_content(tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"0" * 64)
    first = backbone_identity(dict(TINY, weights=str(weights)), SIZE)
    weights.write_bytes(b"1" * 64)
    os.utime(weights, ns=(2, 2))
    assert backbone_identity(dict(TINY, weights=str(weights)), SIZE) != first
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        backbone_identity(dict(TINY, weights=str(tmp_path / "missing.pth")), SIZE)


def test_key_changes_with_view_and_image_content(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(b"pixels")
    key = image_key(path, "full")
    assert key == item_key(file_digest(path), "full")
    assert image_key(path, "tile0") != key
    path.write_bytes(b"pixelz")
    os.utime(path, ns=(3, 3))
    assert image_key(path, "full") != key


# ---- hits, misses and values --------------------------------------------------------------------
def test_second_pass_runs_no_backbone(tmp_path, backbone, monkeypatch):
    images = _images(6)
    keys = [image_key(p) for p in _image_files(tmp_path, images)]
    encoder = _encoder(backbone, TINY, tmp_path / "cache")
    calls = _count_calls(monkeypatch, backbone)
    encoder(images[:4], keys[:4])
    assert (encoder.misses, encoder.hits, calls) == (4, 0, [1, 4])
    encoder(images[2:], keys[2:])  # two hits, two misses: the backbone sees only the two misses, as one batch
    assert (encoder.misses, encoder.hits, calls) == (6, 2, [2, 6])
    for start in (0, 3):
        encoder(images[start:start + 3], keys[start:start + 3])
    assert (encoder.misses, encoder.hits, calls, encoder.backbone_calls) == (6, 8, [2, 6], 2)
    # a fresh process-level object over the same directory also hits
    again = _encoder(backbone, TINY, tmp_path / "cache")
    again(images, keys)
    assert (again.hits, again.misses, calls[0]) == (6, 0, 2)


@pytest.mark.parametrize("dtype,atol", [("float32", 0.0), ("float16", 5e-3), ("bfloat16", 4e-2)])
def test_cached_outputs_equal_uncached(tmp_path, reg_backbone, dtype, atol):
    images = _images(5, seed=1)
    keys = [f"k{i}" for i in range(5)]
    direct = reg_backbone(images)
    encoder = _encoder(reg_backbone, REG, tmp_path, dtype)
    encoder(images[[3, 1]], [keys[3], keys[1]])  # prefill out of order, then a mixed hit/miss batch
    first, second = encoder(images, keys), encoder(images, keys)
    # misses return the stored (rounded) values: the epoch that fills the cache sees what later ones read
    assert all(torch.equal(a, b) for a, b in zip(first.tokens + [first.cls], second.tokens + [second.cls]))
    assert (encoder.patch_size, encoder.embed_dim, encoder.layers) == (14, 64, [1, 3])
    for out in (first, second):
        assert out.grid == direct.grid == (2, 3)
        pairs = list(zip(out.tokens, direct.tokens)) + [(out.cls, direct.cls), (out.registers, direct.registers)]
        assert out.registers.shape == (5, 4, 64)
        for got, want in pairs:
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, want, atol=atol, rtol=0 if atol == 0 else 1e-2)


def test_training_with_cache_matches_without(tmp_path, backbone):
    """A head trained on cached float32 tokens follows exactly the uncached run (3 epochs, shuffled)."""
    images = _images(12, seed=2)
    keys = [image_key(p) for p in _image_files(tmp_path, images)]
    targets = images.mean(dim=(1, 2, 3), keepdim=False).unsqueeze(1)

    def train(encode_fn):
        torch.manual_seed(0)
        head = nn.Linear(64 * 2, 1)
        optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
        losses = []
        for epoch in range(3):
            for idx in torch.randperm(12, generator=torch.Generator().manual_seed(epoch)).split(4):
                out = encode_fn(images[idx], [keys[i] for i in idx])
                features = torch.cat([t.mean(1) for t in out.tokens], dim=1)
                loss = nn.functional.mse_loss(head(features), targets[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
        return losses, head.weight.detach().clone()

    encoder = _encoder(backbone, TINY, tmp_path / "cache")
    plain_losses, plain_w = train(lambda x, k: encode(backbone, x, k))
    cached_losses, cached_w = train(lambda x, k: encode(encoder, x, k))
    assert cached_losses == plain_losses
    assert torch.equal(cached_w, plain_w)
    assert (encoder.misses, encoder.hits, encoder.backbone_calls) == (12, 24, 3)


def test_cache_of_another_identity_misses(tmp_path, backbone):
    images = _images(2)
    keys = ["a", "b"]
    first = _encoder(backbone, TINY, tmp_path)
    first(images, keys)
    for cfg, size, dtype in [(dict(TINY, layers=[3]), SIZE, "float32"), (TINY, (42, 28), "float32"),
                             (dict(TINY, init_seed=1), SIZE, "float32"), (TINY, SIZE, "float16")]:
        other = FeatureCache.for_backbone(tmp_path, cfg, size, dtype=dtype)
        assert other.get("a") is None and other.get("b") is None
    assert FeatureCache.for_backbone(tmp_path, TINY, SIZE, dtype="float32").get("a") is not None


def test_encoder_for_follows_config(tmp_path):
    cfg = OmegaConf.create({"backbone": TINY, "peft": {"name": "none"}, "paths": {"cache_dir": str(tmp_path)},
                            "data": {"cache_features": False, "cache_dtype": "float32"}})
    assert isinstance(encoder_for(cfg, SIZE), Backbone)
    cfg.data.cache_features = True
    encoder = encoder_for(cfg, SIZE)
    assert isinstance(encoder, CachedEncoder) and encoder.cache.dtype == "float32"
    assert encoder.cache.dir == tmp_path / "features" / backbone_identity(TINY, SIZE) / "float32"
    assert (encoder.cache.dir / "identity.json").is_file()


# ---- on-disk format and errors ------------------------------------------------------------------
@pytest.mark.parametrize("dtype,nbytes", [("float16", 2), ("float32", 4)])
def test_stored_file_holds_one_item_in_storage_dtype(tmp_path, backbone, dtype, nbytes):
    encoder = _encoder(backbone, TINY, tmp_path, dtype=dtype)
    encoder(_images(8), [f"k{i}" for i in range(8)])
    path = encoder.cache.path("k5")
    entry = load_file(path)
    assert entry["grid"].tolist() == [2, 3] and "registers" not in entry
    assert [tuple(entry[f"tokens.{i}"].shape) for i in range(2)] == [(6, 64), (6, 64)]
    assert all(entry[name].dtype == getattr(torch, dtype) for name in ("tokens.0", "tokens.1", "cls"))
    # the item's values and a small header, not the batch's storage
    assert path.stat().st_size < (2 * 6 * 64 + 64) * nbytes + 1024


def test_corrupted_file_is_a_miss_and_is_rewritten(tmp_path, backbone, monkeypatch):
    images, keys = _images(2), ["a", "b"]
    encoder = _encoder(backbone, TINY, tmp_path)
    want = encoder(images, keys)
    path = encoder.cache.path("b")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.warns(UserWarning, match=str(path)):
        got = encoder(images, keys)
    assert (encoder.cache.corrupt, encoder.hits, encoder.misses, encoder.backbone_calls) == (1, 1, 3, 2)
    torch.testing.assert_close(got.tokens[1], want.tokens[1], atol=0, rtol=0)
    assert encoder.cache.get("b") is not None  # rewritten, loads again


def test_refuses_trainable_backbone_and_adapters(tmp_path):
    with pytest.raises(ValueError, match="feature cache needs a frozen backbone without adapters"):
        _encoder(create_backbone(**dict(TINY, freeze=False)), TINY, tmp_path)
    from peft import LoraConfig, inject_adapter_in_model
    adapted = create_backbone(**TINY)
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["qkv"]), adapted.model)
    for p in adapted.parameters():
        p.requires_grad_(False)  # even frozen adapters change the tokens the identity does not cover
    with pytest.raises(ValueError, match="feature cache needs a frozen backbone without adapters"):
        _encoder(adapted, TINY, tmp_path)


def test_clear_errors(tmp_path, backbone):
    encoder = _encoder(backbone, TINY, tmp_path)
    with pytest.raises(ValueError, match="3 cache keys for a batch of 2"):
        encoder(_images(2), ["a", "b", "c"])
    with pytest.raises(ValueError, match="no 'cache_key'"):
        encode(encoder, _images(2), None)
    with pytest.raises(ValueError, match="'../x'"):
        encoder.cache.get("../x")
    with pytest.raises(ValueError, match="cache dtype 'int8'"):
        FeatureCache(tmp_path, "x", dtype="int8")
    huge = BackboneOutput(tokens=[torch.full((6, 4), 1e6)], grid=(2, 3))
    with pytest.raises(ValueError, match="overflow"):
        FeatureCache(tmp_path, "x", dtype="float16").put("k", huge)


# ---- several processes at once ------------------------------------------------------------------
def _item(key: str) -> BackboneOutput:
    g = torch.Generator().manual_seed(int(hashlib.md5(key.encode()).hexdigest()[:8], 16))
    return BackboneOutput(tokens=[torch.randn(6, 32, generator=g) for _ in range(2)], grid=(2, 3),
                          cls=torch.randn(32, generator=g), registers=torch.randn(4, 32, generator=g))


def _writer(root, rank: int, rounds: int) -> None:
    cache = FeatureCache(root, "ident", dtype="float32")
    for _ in range(rounds):
        for key in [f"shared{i}" for i in range(15)] + [f"own{rank}_{i}" for i in range(5)]:
            cache.put(key, _item(key))


def _reader(root, rounds: int, result) -> None:
    cache = FeatureCache(root, "ident", dtype="float32")
    seen = wrong = 0
    for _ in range(rounds):
        for i in range(15):
            got = cache.get(f"shared{i}")
            if got is not None:
                seen += 1
                wrong += not torch.equal(got.tokens[1], _item(f"shared{i}").tokens[1])
    result.put((seen, wrong, cache.corrupt))


def test_concurrent_writers_leave_only_complete_files(tmp_path):
    ctx = mp.get_context("fork")
    result = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(tmp_path, rank, 4)) for rank in range(3)]
    procs.append(ctx.Process(target=_reader, args=(tmp_path, 40, result)))
    for proc in procs:
        proc.start()
    seen, wrong, corrupt = result.get(timeout=120)
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    assert (corrupt, wrong) == (0, 0) and seen > 0
    cache = FeatureCache(tmp_path, "ident", dtype="float32")
    files = sorted(p.name for p in cache.dir.rglob("*") if p.is_file())
    assert not [name for name in files if name.endswith(".tmp")]
    assert len(files) == 15 + 3 * 5
    for key in [f"shared{i}" for i in range(15)] + [f"own{r}_{i}" for r in range(3) for i in range(5)]:
        got, want = cache.get(key), _item(key)
        assert all(torch.equal(a, b) for a, b in zip(got.tokens, want.tokens))
        assert torch.equal(got.registers, want.registers) and torch.equal(got.cls, want.cls)
    assert cache.corrupt == 0
