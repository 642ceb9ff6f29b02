"""Backbone builder: token contract per family, weight loading (local file, local folder, hub cache), errors."""
import json
from pathlib import Path

import huggingface_hub.constants
import pytest
import safetensors.torch
import torch
from omegaconf import OmegaConf

from common.models.backbone import Backbone, WeightsUnavailableError, create_backbone

ROOT = Path(__file__).resolve().parents[1]
VIT = dict(embed_dim=32, depth=3, num_heads=2)
HF_V2 = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, mlp_ratio=2, image_size=56, patch_size=14)
HF_V3 = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
             num_register_tokens=4)
CONV = dict(depths=[1, 1, 1, 1], dims=[8, 16, 32, 64])
# family key -> (source, name, tiny model_kwargs, layers, expected family, registers)
SPECS = {
    "timm_dinov2": ("timm", "vit_small_patch14_dinov2", dict(VIT, img_size=56), [0, 2], "timm_vit", 0),
    "timm_dinov2_reg": ("timm", "vit_small_patch14_reg4_dinov2", dict(VIT, img_size=56), [0, 2], "timm_vit", 4),
    "timm_dinov3": ("timm", "vit_small_patch16_dinov3", VIT, [1, -1], "timm_eva", 4),
    "timm_dinov3_qkvb": ("timm", "vit_small_patch16_dinov3_qkvb", VIT, [2], "timm_eva", 4),
    "hf_dinov2": ("hf", "facebook/dinov2-small", HF_V2, [0, 2], "hf_dinov2", 0),
    "hf_dinov3": ("hf", "facebook/dinov3-vits16-pretrain-lvd1689m", HF_V3, [1, 2], "hf_dinov3", 4),
    "convnext": ("timm", "convnext_base", CONV, [1, 3], "timm_convnext", 0),
    "convnextv2": ("timm", "convnextv2_base", CONV, [0, 2], "timm_convnext", 0),
}
TIMM_KEYS = [k for k, s in SPECS.items() if s[0] == "timm"]
HF_KEYS = [k for k, s in SPECS.items() if s[0] == "hf"]


def build(key, weights=None, init_seed=0, **overrides):
    source, name, kwargs, layers, _, _ = SPECS[key]
    args = dict(source=source, name=name, weights=weights, layers=layers, freeze=True, init_seed=init_seed,
                model_kwargs=kwargs, lr=1e-5)
    return create_backbone(**dict(args, **overrides))


def images(backbone, hp=2, wp=3, seed=0):
    s = backbone.patch_size
    return torch.rand(2, 3, hp * s, wp * s, generator=torch.Generator().manual_seed(seed))


def assert_same_outputs(a, b, x):
    oa, ob = a(x), b(x)
    for ta, tb in zip(oa.tokens, ob.tokens):
        torch.testing.assert_close(ta, tb, rtol=0, atol=0)


@pytest.mark.parametrize("key", list(SPECS))
def test_token_shapes_non_square(key):
    _, _, _, layers, family, regs = SPECS[key]
    bb = build(key)
    assert isinstance(bb, Backbone) and bb.family == family
    out = bb(images(bb, 2, 5))
    assert len(out.tokens) == len(layers)
    for tokens, (h, w), stride, dim in zip(out.tokens, out.grids, bb.layer_strides, bb.embed_dims):
        assert (h, w) == (2 * bb.patch_size // stride, 5 * bb.patch_size // stride)
        assert tokens.shape == (2, h * w, dim)
    assert out.grid == (2, 5) == out.grids[-1]
    if family == "timm_convnext":
        assert out.cls is None and out.registers is None
        assert bb.patch_size == bb.layer_strides[-1] == {1: 8, 2: 16, 3: 32}[layers[-1]]
    else:
        assert out.cls.shape == (2, bb.embed_dim)
        assert (out.registers is None) if regs == 0 else out.registers.shape == (2, regs, bb.embed_dim)


@pytest.mark.parametrize("key", ["timm_dinov2_reg", "timm_dinov3", "convnext"])
def test_timm_tokens_match_forward_features(key):
    bb = build(key, layers=[-1] if key != "convnext" else [3])
    x = images(bb, 3, 2)
    out = bb(x)
    ref = bb.model.forward_features((x - bb.mean) / bb.std)
    if ref.dim() == 4:
        ref = ref.flatten(2).transpose(1, 2)
    else:
        torch.testing.assert_close(out.cls, ref[:, 0])
        torch.testing.assert_close(out.registers, ref[:, 1:bb.num_prefix_tokens])
        ref = ref[:, bb.num_prefix_tokens:]
    torch.testing.assert_close(out.tokens[-1], ref)


@pytest.mark.parametrize("key", HF_KEYS)
def test_hf_tokens_match_last_hidden_state(key):
    bb = build(key, layers=[-1])
    x = images(bb, 3, 2)
    out = bb(x)
    ref = bb.model(pixel_values=(x - bb.mean) / bb.std)
    p = bb.num_prefix_tokens
    torch.testing.assert_close(out.tokens[0], ref.last_hidden_state[:, p:])
    torch.testing.assert_close(out.cls, ref.pooler_output)
    if bb.num_registers:
        torch.testing.assert_close(out.registers, ref.last_hidden_state[:, 1:p])


@pytest.mark.parametrize("key", ["timm_dinov2", "hf_dinov3", "convnext"])
def test_input_not_multiple_of_patch_raises(key):
    bb = build(key)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        bb(torch.rand(1, 3, bb.patch_size * 2 + 3, bb.patch_size * 2))


@pytest.mark.parametrize("key", ["timm_dinov3", "hf_dinov2"])
def test_random_init_is_seeded_and_frozen(key):
    a, b, c = build(key, init_seed=3), build(key, init_seed=3), build(key, init_seed=4)
    x = images(a)
    assert_same_outputs(a, b, x)
    assert not torch.equal(a(x).tokens[-1], c(x).tokens[-1])
    assert not any(p.requires_grad for p in a.parameters())
    assert all(p.requires_grad for p in build(key, freeze=False).parameters())


def test_bad_layers_raise():
    with pytest.raises(ValueError, match="layers"):
        build("timm_dinov2", layers=[2, 0])
    with pytest.raises(ValueError, match="layers"):
        build("hf_dinov2", layers=[5])


@pytest.mark.parametrize("key,suffix", [(k, ".safetensors") for k in TIMM_KEYS] + [("timm_dinov2", ".pth")])
def test_timm_local_file_round_trip(key, suffix, tmp_path):
    source = build(key, init_seed=7)
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in source.model.state_dict().items()}
    if suffix == ".safetensors":
        safetensors.torch.save_file(state, str(path))
    else:
        torch.save(state, path)
    loaded = build(key, weights=str(path), init_seed=0)
    x = images(loaded)
    assert_same_outputs(source, loaded, x)
    assert not torch.equal(build(key, init_seed=0)(x).tokens[-1], loaded(x).tokens[-1])


def write_preprocessor(folder, mean, std):
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": mean, "image_std": std}))


@pytest.mark.parametrize("key", HF_KEYS)
def test_hf_local_folder_and_file_round_trip(key, tmp_path):
    source = build(key, init_seed=7)
    source.model.save_pretrained(tmp_path)
    write_preprocessor(tmp_path, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3])
    from_folder = build(key, weights=str(tmp_path), model_kwargs={})
    from_file = build(key, weights=str(tmp_path / "model.safetensors"))
    torch.testing.assert_close(from_folder.mean.flatten(), torch.tensor([0.5, 0.4, 0.3]))
    torch.testing.assert_close(from_file.mean, source.mean)  # a bare file carries no processor: defaults
    from_folder.mean.copy_(source.mean)
    from_folder.std.copy_(source.std)
    x = images(source)
    assert_same_outputs(source, from_folder, x)
    assert_same_outputs(source, from_file, x)


def fake_hub_repo(cache, repo_id, files):
    """Write files into the huggingface_hub cache layout: models--org--name/{refs/main, snapshots/<hash>/}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    for name, write in files.items():
        write(snapshot / name)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.mark.parametrize("key", ["timm_dinov2", "timm_dinov3_qkvb", "convnextv2"])
def test_timm_hub_weights_from_offline_cache(key, offline_cache):
    source = build(key, init_seed=5)
    state = {k: v.contiguous() for k, v in source.model.state_dict().items()}
    fake_hub_repo(offline_cache, "tiny-org/tiny-timm",
                  {"model.safetensors": lambda p: safetensors.torch.save_file(state, str(p))})
    loaded = build(key, weights="hub", hub_name="tiny-org/tiny-timm")
    assert_same_outputs(source, loaded, images(source))


@pytest.mark.parametrize("key", HF_KEYS)
def test_hf_hub_weights_from_offline_cache(key, offline_cache):
    source = build(key, init_seed=5)
    snapshot = fake_hub_repo(offline_cache, "tiny-org/tiny-hf", {})
    source.model.save_pretrained(snapshot)
    write_preprocessor(snapshot, [0.1, 0.2, 0.3], [0.3, 0.2, 0.1])
    loaded = build(key, weights="hub", hub_name="tiny-org/tiny-hf", model_kwargs={})
    torch.testing.assert_close(loaded.std.flatten(), torch.tensor([0.3, 0.2, 0.1]))
    loaded.mean.copy_(source.mean)
    loaded.std.copy_(source.std)
    assert_same_outputs(source, loaded, images(source))


@pytest.mark.parametrize("key,repo", [("timm_dinov3", "timm/vit_small_patch16_dinov3.lvd1689m"),
                                      ("hf_dinov2", "facebook/dinov2-small")])
def test_hub_weights_unavailable_offline_is_one_clear_error(key, repo, offline_cache):
    with pytest.raises(WeightsUnavailableError) as err:
        build(key, weights="hub")
    message = str(err.value)
    assert SPECS[key][1] in message and repo in message and "backbone.weights=/path/to/file" in message


def test_missing_weights_path_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="vit_small_patch14_dinov2"):
        build("timm_dinov2", weights=str(tmp_path / "nope.safetensors"))


def test_timm_weights_of_other_architecture_raise(tmp_path):
    path = tmp_path / "dinov2.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in build("timm_dinov2").model.state_dict().items()},
                                str(path))
    with pytest.raises(ValueError, match=r"vit_small_patch16_dinov3.*do not fit.*missing: .*gamma_1.*unexpected: .*ls1\.gamma"):
        build("timm_dinov3", weights=str(path))
    with pytest.raises(ValueError, match=r"shape mismatch: .*blocks\.0\.attn\.qkv\.weight"):
        build("timm_dinov2", weights=str(path), model_kwargs=dict(VIT, embed_dim=48, img_size=56))


def test_hf_weights_of_other_architecture_raise(tmp_path):
    build("hf_dinov2").model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"do not fit.*missing: .*model\.layer\.0"):
        build("hf_dinov3", weights=str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"shape mismatch: .*mlp\.fc1"):
        build("hf_dinov2", weights=str(tmp_path), model_kwargs={"mlp_ratio": 3})


@pytest.mark.parametrize("path", sorted(p for p in (ROOT / "conf" / "backbone").glob("*.yaml") if p.stem != "tiny"),
                         ids=lambda p: p.stem)
def test_backbone_configs_build_the_named_architecture(path):
    """Every preset builds (on the meta device: no memory, no download) with valid layers and a hub id."""
    cfg = OmegaConf.to_container(OmegaConf.load(path))
    assert cfg["source"] == "timm" and cfg["weights"] == "hub"
    with torch.device("meta"):
        bb = create_backbone(**dict(cfg, weights=None))
    assert bb.model.pretrained_cfg["hf_hub_id"] == "timm/" + cfg["name"]
    expected = "timm_convnext" if "convnext" in path.stem else "timm_eva" if "dinov3" in path.stem else "timm_vit"
    assert bb.family == expected and bb.layers[-1] == bb.num_blocks - 1
    assert bb.patch_size == {"dinov2": 14, "dinov3": 16, "convne": 32}[path.stem[:6]]


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_loaded_position_embeddings_are_resampled_with_the_configured_mode(tmp_path, mode):
    """A 4x4-grid checkpoint loaded into a 3x3-grid model (model_kwargs.img_size): timm's resampling with
    backbone.pos_embed_interpolation, antialiased as timm does it, written here with F.interpolate."""
    import torch.nn.functional as F
    source = build("timm_dinov2", init_seed=3)
    path = tmp_path / "vit.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(path))
    loaded = build("timm_dinov2", weights=str(path), model_kwargs=dict(VIT, img_size=42),
                   pos_embed_interpolation=mode)
    pos = source.model.pos_embed
    grid = pos[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(3, 3), mode=mode, align_corners=False, antialias=True)
    want = torch.cat([pos[:, :1], want.permute(0, 2, 3, 1).reshape(1, 9, -1)], dim=1)
    torch.testing.assert_close(loaded.model.pos_embed, want, rtol=0, atol=1e-6)
    other = F.interpolate(grid, size=(3, 3), mode="bicubic" if mode == "bilinear" else "bilinear",
                          align_corners=False, antialias=True)
    assert (loaded.model.pos_embed[:, 1:] - other.permute(0, 2, 3, 1).reshape(1, 9, -1)).abs().max() > 1e-3


def test_pos_embed_interpolation_is_refused_where_nothing_resamples_it():
    with pytest.raises(ValueError, match="backbone.pos_embed_interpolation=bilinear: backbone convnext_base has no"):
        build("convnext", pos_embed_interpolation="bilinear")
    with pytest.raises(ValueError, match="only timm backbones take it"):
        build("hf_dinov2", pos_embed_interpolation="bilinear")
    with pytest.raises(ValueError, match="backbone.pos_embed_interpolation='nearest'"):
        build("timm_dinov2", pos_embed_interpolation="nearest")
    with pytest.raises(TypeError, match="refuses backbone.model_kwargs"):
        build("convnext", model_kwargs=dict(CONV, img_size=256))
