"""CGDSeg: shapes at two input sizes, FPN scales relative to the input, text grounding (none, file,
tiny CLIP), CSSE formula, parameter report."""
import string
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from common.models.backbone import create_backbone
from sclera.model import CSSE, CGDSeg

ROOT = Path(__file__).resolve().parents[1]


def tiny_backbone():
    return create_backbone(**OmegaConf.to_container(OmegaConf.load(ROOT / "conf/backbone/tiny.yaml")))


def model_args(**grounding):
    cfg = OmegaConf.to_container(OmegaConf.merge(OmegaConf.load(ROOT / "conf/model/sclera/cgdseg.yaml"),
                                                 OmegaConf.load(ROOT / "conf/model/sclera/cgdseg_tiny.yaml")))
    cfg.pop("_target_"), cfg.pop("defaults", None)
    cfg["grounding"].update(grounding)
    return cfg


def build(**grounding):
    torch.manual_seed(0)
    return CGDSeg.from_options(tiny_backbone(), **model_args(**grounding))


@pytest.mark.parametrize("size", [(112, 112), (126, 168)])
def test_logits_at_input_resolution_and_fpn_follows_input(size):
    model = build(kind="none").eval()
    images = torch.rand(2, 3, *size)
    with torch.no_grad():
        grid = model.features(images)
        levels = model.fpn(grid, size)
        logits = model({"image": images})["logits"]
    assert logits.shape == (2, 1, *size)
    assert grid.shape[-2:] == (size[0] // 14, size[1] // 14)
    assert [tuple(lv.shape[-2:]) for lv in levels] == [(round(size[0] / s), round(size[1] / s)) for s in (4, 8, 16)]
    assert [lv.shape[1] for lv in levels] == [24, 32, 48]


def test_input_off_the_patch_grid_is_fitted_for_the_backbone_only():
    model = build(kind="none").eval()
    images = torch.rand(1, 3, 128, 120)                     # 128 -> 126, 120 -> 112 for patch 14
    assert model.fit_to_patch == "crop"                     # the deck's Conv14: its layer list's default
    grid = lambda x: model.features(x)
    with torch.no_grad():
        assert grid(images).shape[-2:] == (9, 8)
        assert model({"image": images})["logits"].shape == (1, 1, 128, 120)
        torch.testing.assert_close(grid(images), grid(images[..., :126, :112]), rtol=0, atol=0)
        model.fit_to_patch = "resize"
        resized = F.interpolate(images, size=(126, 112), mode="bilinear", align_corners=False, antialias=True)
        torch.testing.assert_close(grid(images), grid(resized), rtol=0, atol=0)
    model.fit_to_patch = "none"
    with pytest.raises(ValueError, match="not a multiple of the patch size 14"):
        model({"image": images})


def test_crop_is_what_a_stride_14_patch_convolution_does_to_a_256_input():
    """The deck's Conv2d(3, 384, 14, 14) on 256 px: 18x18 patches over the first 252 px, the last 4 unused."""
    from sclera.model import fit_mode, fitted_to_patch
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, kernel_size=14, stride=14)
    image = torch.rand(2, 3, 256, 256)
    cropped = fitted_to_patch(image, 14, "crop")
    assert cropped.shape[-2:] == (252, 252)
    torch.testing.assert_close(conv(cropped), conv(image), rtol=0, atol=0)
    assert conv(image).shape[-2:] == (18, 18)
    changed = image.clone()
    changed[..., 252:, :] = 0.0
    changed[..., :, 252:] = 0.0
    torch.testing.assert_close(conv(changed), conv(image), rtol=0, atol=0)   # the last 4 px reach no patch
    assert (fit_mode(True), fit_mode(False)) == ("resize", "none")             # how older configs spelled them
    with pytest.raises(ValueError, match="model.fit_to_patch='pad'"):
        fit_mode("pad")


def test_gradients_reach_the_decoder_not_the_frozen_backbone():
    model = build(kind="none")
    model({"image": torch.rand(2, 3, 112, 112)})["logits"].mean().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.head.out.weight.grad is not None and model.fpn.levels[0][0].weight.grad.abs().sum() > 0


def test_grounding_none_removes_the_stage():
    args = model_args()
    for value in ("none", None):
        args["grounding"] = value
        assert CGDSeg.from_options(tiny_backbone(), **args).grounding is None


def test_parameter_report_adds_up():
    model = build(kind="none")
    report = model.parameter_report()
    assert sum(report[k] for k in ("backbone_adapters", "grounding", "fpn", "decoder", "head")) == report["trainable"]
    assert report["grounding"] == 0 and report["backbone_adapters"] == 0
    assert report["trainable"] + report["frozen"] == sum(p.numel() for p in model.parameters())


def test_stages_follow_the_deck_trace_at_the_tiny_widths():
    model = build(kind="none").eval()
    shapes = []
    for stage in model.decoder:
        stage.register_forward_hook(lambda m, args, out: shapes.append(tuple(out.shape[1:])))
    with torch.no_grad():
        logits = model({"image": torch.rand(1, 3, 112, 112)})["logits"]
    assert shapes == [(32, 14, 14), (24, 28, 28), (16, 56, 56)] and logits.shape == (1, 1, 112, 112)
    # stage 1 starts from f2 (48 ch) and joins f1 (32 ch), stage 2 joins f0 (24 ch), stage 3 no skip;
    # transitions are BN -> ReLU -> conv
    assert [s.dense.denselayer1.norm1.num_features for s in model.decoder] == [48 + 32, 32 + 24, 24]
    assert [type(m).__name__ for m in model.decoder[0].transition] == ["BatchNorm2d", "ReLU", "Conv2d"]


def test_grounding_from_file_is_normalised_averaged_and_attended(tmp_path):
    emb = torch.randn(3, 24)
    torch.save(emb, tmp_path / "text.pt")
    model = build(kind="file", file=str(tmp_path / "text.pt")).eval()
    stage = model.grounding
    torch.testing.assert_close(stage.text, F.normalize(emb, dim=-1).mean(0, keepdim=True))
    assert stage.proj.out_features == 128 and stage.attn.num_heads == 4
    # with one text key, attention gives out_proj(v_proj(proj(text))) to every patch token
    tokens = torch.randn(2, 9, 128)
    value = F.linear(stage.proj(stage.text), stage.attn.in_proj_weight[256:], stage.attn.in_proj_bias[256:])
    expected = stage.norm(tokens + stage.attn.out_proj(value))
    torch.testing.assert_close(stage(tokens), expected, atol=1e-5, rtol=1e-5)
    plain = build(kind="none").eval()
    images = torch.rand(1, 3, 112, 112)
    with torch.no_grad():
        assert not torch.allclose(model.features(images), plain.features(images))
    assert build(kind="file", file=str(tmp_path / "text.pt"), average=False).grounding.text.shape == (3, 24)


def test_bad_embedding_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        build(kind="file", file=str(tmp_path / "missing.pt"))
    torch.save({"not": "a tensor"}, tmp_path / "dict.pt")
    with pytest.raises(ValueError, match="dict.pt: expected a float tensor"):
        build(kind="file", file=str(tmp_path / "dict.pt"))
    with pytest.raises(ValueError, match="grounding.kind='bert'"):
        build(kind="bert")


def save_tiny_clip(folder: Path) -> None:
    """A tiny random CLIPModel and a character-level tokenizer, saved to a local folder."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    vocab = {c: i for i, c in enumerate(string.ascii_lowercase)}
    vocab.update({f"{c}</w>": len(vocab) + i for i, c in enumerate(string.ascii_lowercase)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(folder)
    torch.manual_seed(0)
    special = dict(bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                   pad_token_id=vocab["<|endoftext|>"])
    config = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
                                         **special),
                        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=16),
                        projection_dim=24)
    CLIPModel(config).save_pretrained(folder)


def test_grounding_is_clips_projected_text_embedding(tmp_path):
    from transformers import CLIPModel, CLIPTokenizer
    save_tiny_clip(tmp_path)
    prompts = ["white sclera", "the eye"]
    model = build(kind="clip", clip_path=str(tmp_path), prompts=prompts)
    tokenizer, clip = CLIPTokenizer.from_pretrained(tmp_path), CLIPModel.from_pretrained(tmp_path).eval()
    ids = tokenizer(prompts, padding=True, return_tensors="pt")
    assert ids["input_ids"][0].tolist() != ids["input_ids"][1].tolist()        # the prompts really differ
    with torch.no_grad():                                                       # CLIP's joint-space text_embeds
        text_embeds = clip(**ids, pixel_values=torch.zeros(1, 3, 32, 32)).text_embeds
    assert text_embeds.shape == (2, 24)                                         # projected, not the 32-d pooled output
    torch.testing.assert_close(model.grounding.text, F.normalize(text_embeds, dim=-1).mean(0, keepdim=True))
    assert all(not name.startswith("grounding.text") for name in model.state_dict())   # rebuilt, not stored


def test_missing_clip_names_the_keys_the_model_and_the_ways_out(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError) as err:
        build(kind="clip", clip_path=str(tmp_path / "no-such-clip"))
    message = str(err.value)
    for needle in ("model.grounding.kind=clip", "model.grounding.clip_path", "no-such-clip", "model.grounding.file",
                   "kind=file", "save_pretrained", "model.grounding=none"):
        assert needle in message, needle


def test_the_synthetic_datasets_tiny_clip_loads_as_clip(tmp_path):
    from sclera.tiny_clip import write_tiny_clip
    folder = write_tiny_clip(tmp_path / "CLIP-tiny-random", seed=0)
    model = build(kind="clip", clip_path=str(folder))
    assert model.grounding.text.shape == (1, 32) and torch.isfinite(model.grounding.text).all()


def test_csse_sums_channel_and_spatial_excitation():
    se = CSSE(8, reduction=4)
    x = torch.randn(2, 8, 5, 6)
    c = torch.sigmoid(se.channel[3](F.relu(se.channel[1](x.mean((2, 3), keepdim=True)))))
    s = torch.sigmoid(se.spatial[0](x))
    torch.testing.assert_close(se(x), x * c + x * s)
