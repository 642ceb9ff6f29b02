"""LoRA / DoRA adapters on every ViT family: formulas, gradients, merge, save/load, block limits, errors."""
import re
import warnings

import pytest
import torch
from peft.tuners.lora import LoraLayer

from common.models import adapters
from common.models.adapters import (adapter_state_dict, check_adapters_active, inject_adapters, load_adapter_state_dict,
                                    load_peft_adapter, merge_adapters, save_peft_adapter)
from common.models.backbone import create_backbone
from common.models.backbone_families import FAMILIES as REGISTERED_FAMILIES
from common.training.optim import build_param_groups, tag_of
from tests.tolerance import assert_close_reordered

VIT = dict(embed_dim=32, depth=3, num_heads=2)
SPECS = {  # key -> (source, name, tiny model_kwargs)
    "timm_dinov2": ("timm", "vit_small_patch14_dinov2", dict(VIT, img_size=56)),
    "timm_dinov3": ("timm", "vit_small_patch16_dinov3", VIT),
    "timm_dinov3_qkvb": ("timm", "vit_small_patch16_dinov3_qkvb", VIT),
    "timm_dinov3_swiglu": ("timm", "vit_small_plus_patch16_dinov3", VIT),
    "hf_dinov2": ("hf", "facebook/dinov2-small",
                  dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, mlp_ratio=2, image_size=56,
                       patch_size=14)),
    "hf_dinov3": ("hf", "facebook/dinov3-vits16-pretrain-lvd1689m",
                  dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                       num_register_tokens=4, use_gated_mlp=True)),  # gated like ViT-S+/H+/7B
}
FAMILIES = ["timm_dinov2", "timm_dinov3", "timm_dinov3_qkvb", "hf_dinov2", "hf_dinov3"]
ALL_TARGETS = ["qkv", "proj", "mlp"]


def build(key, layers=(0, 2)):
    source, name, kwargs = SPECS[key]
    bb = create_backbone(source=source, name=name, weights=None, layers=list(layers), freeze=True, init_seed=0,
                         model_kwargs=kwargs)
    # Random-init layer scales are 1e-5 (DINO's init); use 1 so that adapter effects are well above rounding.
    for n, p in bb.named_parameters():
        if re.search(r"(gamma|lambda1|ls\d\.gamma)", n):
            p.data.fill_(1.0)
    return bb


def adapted(key, method="lora", targets=ALL_TARGETS, last_n_blocks=None, r=4, alpha=8, layers=(0, 2)):
    bb = build(key, layers)
    names = inject_adapters(bb, method, r=r, alpha=alpha, dropout=0.0, targets=targets,
                            last_n_blocks=last_n_blocks)
    return bb, names


def randomize_adapters(bb, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in bb.named_parameters():
            if "lora_" in n:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))


def images(bb, hp=2, wp=3):
    s = bb.patch_size
    return torch.rand(2, 3, hp * s, wp * s, generator=torch.Generator().manual_seed(1))


def tokens(bb, x):
    return torch.cat([t.flatten() for t in bb(x).tokens])


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("key", FAMILIES)
def test_adapters_start_as_identity_change_output_and_get_gradients(key, method):
    base = build(key)
    bb, names = adapted(key, method)
    x = images(bb)
    torch.testing.assert_close(tokens(bb, x), tokens(base, x))  # B = 0 at init: no change yet
    assert check_adapters_active(bb, (bb.patch_size * 2, bb.patch_size * 3)) > 0
    randomize_adapters(bb)
    assert not torch.allclose(tokens(bb, x), tokens(base, x), atol=1e-4)
    trainable = {n for n, p in bb.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    tokens(bb, x).square().sum().backward()
    for n, p in bb.named_parameters():
        if "lora_" in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    per_block = {"hf_dinov2": 6, "hf_dinov3": 7}.get(key, 4)  # q,k,v,o,fc1,fc2 (+ gate) vs qkv,proj,fc1,fc2
    assert len(names) == 3 * per_block


def wrapped_layer(bb, suffix):
    name, layer = next((n, m) for n, m in bb.model.named_modules() if isinstance(m, LoraLayer) and n.endswith(suffix))
    return name, layer


@pytest.mark.parametrize("key,suffix", [("timm_dinov2", "blocks.1.attn.qkv"), ("timm_dinov3_qkvb", "blocks.2.attn.qkv"),
                                        ("timm_dinov3_swiglu", "blocks.0.mlp.fc1_g"),
                                        ("hf_dinov2", "layer.1.attention.v_proj"),
                                        ("hf_dinov3", "layer.2.mlp.gate_proj")])
def test_lora_layer_equals_hand_computation(key, suffix):
    bb, _ = adapted(key, "lora", targets=["qkv", "fc1"], r=4, alpha=8)
    randomize_adapters(bb)
    _, layer = wrapped_layer(bb, suffix)
    base = layer.get_base_layer()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(5, base.in_features)
    expected = x @ base.weight.T + (8 / 4) * (x @ a.T) @ b.T
    if base.bias is not None:
        expected = expected + base.bias
    assert_close_reordered(layer(x), expected, base.in_features)


@pytest.mark.parametrize("key,suffix", [("timm_dinov2", "blocks.0.mlp.fc2"), ("timm_dinov3_qkvb", "blocks.1.attn.qkv"),
                                        ("hf_dinov2", "layer.2.attention.o_proj"),
                                        ("hf_dinov3", "layer.0.attention.q_proj")])
def test_dora_layer_equals_formula(key, suffix):
    bb, _ = adapted(key, "dora", targets=ALL_TARGETS, r=4, alpha=8)
    _, layer = wrapped_layer(bb, suffix)
    w = layer.get_base_layer().weight
    m = layer.lora_magnitude_vector["default"].weight
    torch.testing.assert_close(m, w.norm(dim=1))  # DoRA starts at the base weight's row norms
    randomize_adapters(bb)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    merged = w + (8 / 4) * b @ a
    directed = m[:, None] * merged / merged.norm(dim=1, keepdim=True)
    x = torch.randn(5, w.shape[1])
    expected = x @ directed.T
    if layer.get_base_layer().bias is not None:
        expected = expected + layer.get_base_layer().bias
    assert_close_reordered(layer(x), expected, w.shape[1])


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("key", FAMILIES)
def test_merge_keeps_outputs_and_removes_wrappers(key, method):
    bb, _ = adapted(key, method)
    randomize_adapters(bb)
    x = images(bb, 3, 2)
    before = tokens(bb, x)
    merge_adapters(bb)
    assert_close_reordered(tokens(bb, x), before, x.numel())
    assert not any(isinstance(m, LoraLayer) for m in bb.modules())
    assert set(bb.state_dict()) == set(build(key).state_dict())


def test_qkvb_bias_route_is_needed_and_applied(monkeypatch):
    bb, _ = adapted("timm_dinov3_qkvb", "lora", targets=["qkv"])
    assert all(blk.attn.qkv_bias_separate for blk in bb.model.blocks)
    monkeypatch.setattr(adapters, "_route_fused_qkv_bias", lambda *_: None)
    raw, _ = adapted("timm_dinov3_qkvb", "lora", targets=["qkv"])
    with pytest.raises(RuntimeError, match=r"never called.*blocks\.0\.attn\.qkv"):
        check_adapters_active(raw, 32)


def test_check_fails_when_adapters_cannot_reach_the_used_layers():
    bb, _ = adapted("timm_dinov2", "lora", last_n_blocks=1, layers=(0, 1))
    with pytest.raises(RuntimeError, match="does not change the output"):
        check_adapters_active(bb, 28)


@pytest.mark.parametrize("key", ["timm_dinov3", "hf_dinov2"])
def test_adapter_state_dict_round_trip(key, tmp_path):
    src, _ = adapted(key, "dora")
    randomize_adapters(src, seed=3)
    state = adapter_state_dict(src)
    assert state and all("lora_" in k for k in state)
    torch.save(state, tmp_path / "adapters.pt")
    dst, _ = adapted(key, "dora")
    x = images(src)
    assert not torch.allclose(tokens(dst, x), tokens(src, x))
    load_adapter_state_dict(dst, torch.load(tmp_path / "adapters.pt", weights_only=True))
    torch.testing.assert_close(tokens(dst, x), tokens(src, x), rtol=0, atol=0)
    other, _ = adapted(key, "dora", r=2)
    with pytest.raises(ValueError, match="does not fit"):
        load_adapter_state_dict(other, state)


@pytest.mark.parametrize("key,block_re", [("timm_dinov3", r"\.blocks\.(\d+)\."), ("hf_dinov3", r"\.layer\.(\d+)\.")])
def test_last_n_blocks_limits_injection_and_names_feed_the_optimiser(key, block_re):
    bb, names = adapted(key, "lora", targets=["qkv"], last_n_blocks=2)
    blocks = {int(re.search(block_re, "." + n).group(1)) for n in names}
    assert blocks == {1, 2}
    trainable = [("model.backbone." + n, p) for n, p in bb.named_parameters() if p.requires_grad]
    groups = build_param_groups(trainable, {"adapter": 1.0}, weight_decay=0.0, layer_decay=0.5,
                                num_blocks=bb.num_blocks, block_of=bb.block_of)
    lr_of = {name: g["lr"] for g in groups for name in g["names"]}
    for full, _ in trainable:
        assert tag_of(full) == "adapter"
        block = int(re.search(block_re, full).group(1))
        assert lr_of[full] == 0.5 ** (bb.num_blocks - 1 - block)
    _, all_names = adapted(key, "lora", targets=["qkv"], last_n_blocks=None)
    assert len(all_names) == 3 * len(names) // 2
    for bad in (0, 4):
        with pytest.raises(ValueError, match="last_n_blocks"):
            adapted(key, "lora", targets=["qkv"], last_n_blocks=bad)


def test_bad_targets_and_methods_raise(monkeypatch):
    with pytest.raises(ValueError, match=r"unknown target 'qkvx'.*fc1"):
        adapted("timm_dinov2", targets=["qkvx"])
    with pytest.raises(ValueError, match="expected 'lora' or 'dora'"):
        adapted("hf_dinov2", method="ia3")
    monkeypatch.setitem(REGISTERED_FAMILIES["timm_eva"].adapter_targets, "proj", ("attn.out_proj",))
    with pytest.raises(ValueError, match=r"'proj' matches no linear module.*'attn\.qkv'"):
        adapted("timm_dinov3", targets=["proj"])
    conv = create_backbone(source="timm", name="convnext_base", weights=None, layers=[3],
                           model_kwargs=dict(depths=[1, 1, 1, 1], dims=[8, 16, 32, 64]))
    with pytest.raises(ValueError, match="timm_convnext"):
        inject_adapters(conv, "lora", 4, 8, 0.0, ["mlp"], None)


def test_check_passes_on_dino_init_and_restores_weights():
    """Random DINO blocks scale residual branches by 1e-5: the check must still see DoRA act, and undo its probe."""
    source, name, kwargs = SPECS["timm_dinov3"]
    bb = create_backbone(source=source, name=name, weights=None, layers=[2], model_kwargs=kwargs)
    inject_adapters(bb, "dora", r=4, alpha=8, dropout=0.1, targets=["qkv"], last_n_blocks=None)
    bb.train()
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    assert check_adapters_active(bb, 32) > 0
    assert bb.training
    for k, v in bb.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("key", ["timm_dinov2", "hf_dinov3"])
def test_saved_adapter_loads_with_peft_alone(key, tmp_path):
    """The folder beside each checkpoint is PeftModel's format: `PeftModel.from_pretrained` on the same base model
    rebuilds the adapted model (every adapter weight loaded, none missing, the same outputs)."""
    from peft import LoraConfig, PeftModel
    src, _ = adapted(key, "dora")
    randomize_adapters(src, seed=5)
    folder = save_peft_adapter(src, tmp_path / "best_adapter")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = LoraConfig.from_pretrained(str(folder))
    assert config.use_dora and config.r == 4 and config.lora_alpha == 8
    dst = build(key)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(dst.model, str(folder))
    assert not [w for w in caught if "adapter keys" in str(w.message)]     # peft's "Found missing adapter keys"
    loaded = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert loaded and all(torch.equal(v, peft_model.base_model.model.state_dict()[k.removeprefix("base_model.model.")])
                          for k, v in loaded.items())
    x = images(src)
    torch.testing.assert_close(tokens(dst, x), tokens(src, x), rtol=0, atol=0)
    again, _ = adapted(key, "dora")
    load_peft_adapter(again, folder)                                  # the suite's loader reads the same folder
    torch.testing.assert_close(tokens(again, x), tokens(src, x), rtol=0, atol=0)
    save_peft_adapter(again, folder)                                  # overwriting leaves no temporary folders
    assert [p.name for p in tmp_path.iterdir()] == ["best_adapter"]
