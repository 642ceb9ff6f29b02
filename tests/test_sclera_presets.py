"""The CGDSeg presets against the reference deck's tables (kept here), the deck-width model's parameter counts
against the deck's layer list computed by hand, the DiceBCE loss by hand, and the deck's augmentation."""
import albumentations as A
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from tests.cli import REPO

# the deck's "Complete Hyperparameter Table", "Optimizer" and "Mixed Training Strategy" slides
DECK = {
    "data.image_size": [256, 256], "data.batch_size": 32, "trainer.max_epochs": 70, "trainer.optim.lr": 1e-4,
    "peft.lr": 1e-5, "trainer.optim.weight_decay": 1e-4, "trainer.optim.decay_1d": True,
    "trainer.schedule.name": "cosine", "trainer.schedule.min_lr": 1e-6, "trainer.schedule.warmup_epochs": 0.0,
    "trainer.grad_clip": 1.0, "trainer.optim.betas": [0.9, 0.999], "trainer.compile": True, "seed": 42,
    "peft.name": "lora", "peft.r": 8, "peft.alpha": 16, "peft.dropout": 0.0, "peft.targets": ["qkv"],
    "backbone.name": "vit_small_patch14_dinov2.lvd142m", "model.grounding.kind": "clip",
    "model.grounding.clip_path": "openai/clip-vit-base-patch32",
    "model.grounding.prompts": ["sclera white of the eye", "white part of the human eye", "eye white region sclera",
                                "the white scleral region of the eye"],
    "model.grounding.average": True, "model.grounding.heads": 4, "model.fpn_channels": [96, 192, 384],
    "model.fpn_strides": [4, 8, 16], "model.decoder_channels": [512, 256, 128], "model.decoder_strides": [8, 4, 2],
    "model.decoder_skips": [1, 0, None], "model.decoder_input": 2, "model.dense_layers": 4, "model.growth": 32,
    "model.bn_size": 4, "model.se_reduction": 16, "model.head_channels": 64, "metric.threshold": 0.5,
    "loss.bce_weight": 0.4, "loss.dice_weight": 0.6, "loss.dice_eps": 1e-6, "data.num_workers": 8,
    "task.submission.size": [300, 400], "data.eval_masks": "ssbc",
    # "AMP (FP16): enabled (torch.cuda.amp)"; "CosineAnnealingLR T_max = 70 epochs"; "Input (B,3,256,256)",
    # "Conv2d(3,384,14,14)", "18x18 = 324 ... patches"; "bilinearly interpolated from (37,37) to (18,18) at model
    # load time"; the submission code's `cv2.resize(img, (256, 256))`
    "trainer.precision": "fp16", "trainer.schedule.interval": "epoch", "model.fit_to_patch": "crop",
    "backbone.model_kwargs.img_size": 256, "backbone.pos_embed_interpolation": "bilinear",
    "data.image_resize": "cv2_linear",
}
TRACKS = {"sclera_cgdseg_synthetic": ("Synthetic", {"SynCROI": 1, "MASD": 0, "SBVPI": 0}),
          "sclera_cgdseg_mixed": ("Mixed", {"SynCROI": 1, "MASD": 3, "SBVPI": 3})}
# the deck's "Data Augmentation Pipeline" tables, in data.augment's order: transform -> its arguments (deck units)
DECK_AUGMENT = {
    "albumentations.HorizontalFlip": {"p": 0.5}, "albumentations.VerticalFlip": {"p": 0.3},
    "albumentations.Affine": {"p": 0.4, "rotate": [-15, 15]}, "sclera.augment.Rotate90": {"p": 0.15, "ks": [1, 2, 3]},
    "sclera.augment.BrightnessContrast": {"p": 0.6, "contrast_alpha": [0.8, 1.2], "brightness_beta": [-30, 30]},
    "sclera.augment.HueSaturation": {"p": 0.4, "hue_shift": [-18, 18], "saturation_scale": [0.7, 1.3]},
    "sclera.augment.PixelGaussNoise": {"p": 0.3, "sigma": [5, 20]},
    "albumentations.OneOf": {"p": 0.25}, "albumentations.GaussianBlur": {"sigma_limit": [0.5, 3.0]},
    "albumentations.MotionBlur": {},
    "albumentations.ImageCompression": {"p": 0.25, "quality_range": [30, 95]},
    "sclera.augment.Occluders": {"p": 0.4, "count": [0, 3]},
    "common.data.augment.GaussianHighlights": {"p": 0.25, "count": [1, 3], "strength": [0.3, 0.8]},
}


def compose_cfg(overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=["logger=none", *overrides])


def plain(value):
    from omegaconf import OmegaConf
    return OmegaConf.to_container(value) if hasattr(value, "_metadata") else value


@pytest.mark.parametrize("preset", sorted(TRACKS))
def test_presets_carry_the_decks_tables(preset):
    from omegaconf import OmegaConf
    cfg = compose_cfg([f"experiment={preset}"])
    for key, value in DECK.items():
        assert plain(OmegaConf.select(cfg, key)) == value, key
    from common.data.augment import find_transform, iter_transforms
    assert [node["_target_"] for node in iter_transforms(cfg.data.augment)] == list(DECK_AUGMENT)
    for target, expected in DECK_AUGMENT.items():
        node = find_transform(cfg.data.augment, target)
        assert {key: node[key] for key in expected} == expected, target
    track, factors = TRACKS[preset]
    assert cfg.task.track == track
    assert {name: spec.factor for name, spec in cfg.data.train_sets.items()} == factors


def dense_block(cin, layers=4, k=32, bottleneck=4 * 32):
    """Each layer: BN(c) -> ReLU -> Conv1x1(c -> 4k) -> BN(4k) -> ReLU -> Conv3x3(4k -> k), no conv biases."""
    return sum(2 * (cin + k * i) + (cin + k * i) * bottleneck + 2 * bottleneck + bottleneck * k * 9
               for i in range(layers))


def decoder_stage(cin, cout, reduction=16):
    grown = cin + 4 * 32                       # DenseBlock out = in + L k
    transition = 2 * grown + grown * cout      # BN -> ReLU -> Conv1x1 (no bias)
    csse = 2 * cout * cout // reduction + cout + 1   # CSE 2 C^2 / r (no biases), SSE Conv1x1 C -> 1 + bias
    return dense_block(cin) + transition + csse


def test_deck_width_model_counts_follow_the_decks_layer_list(tmp_path):
    """The deck's parameter budget table says LoRA 0.59M, decoder 1.40M, head 0.30M; its layer list gives:"""
    from sclera.task import ScleraTask
    torch.save(torch.randn(4, 512), tmp_path / "text.pt")     # CLIP ViT-B/32 text_embeds are 512-d
    cfg = compose_cfg(["experiment=sclera_cgdseg_mixed", "backbone.weights=null", "model.grounding.kind=file",
                       f"model.grounding.file={tmp_path / 'text.pt'}"])
    model = ScleraTask(cfg).build_model({})
    lora = 12 * (8 * 384 + 1152 * 8)                                           # A (r x 384) + B (1152 x r) per block
    grounding = (512 * 384 + 384) + (3 * 384 * 384 + 3 * 384) + (384 * 384 + 384) + 2 * 384   # proj, MHA, LN
    fpn = sum(384 * c + 2 * c for c in (96, 192, 384))                         # Conv1x1 (no bias) + BN per level
    decoder = decoder_stage(384 + 192, 512) + decoder_stage(512 + 96, 256) + decoder_stage(256, 128)
    head = (128 * 64 * 9 + 64) + 2 * 64 + (64 * 1 + 1)                        # Conv3x3 + BN + Conv1x1
    assert (lora, grounding, fpn, decoder, head) == (147_456, 789_120, 259_392, 1_914_691, 73_985)
    report = model.parameter_report()
    assert report == {"backbone_adapters": lora, "grounding": grounding, "fpn": fpn, "decoder": decoder,
                      "head": head, "trainable": lora + grounding + fpn + decoder + head,
                      "frozen": report["frozen"]}
    assert report["trainable"] == 3_184_644                                   # the deck's total: 3.19M
    assert [s.dense.denselayer1.norm1.num_features for s in model.decoder] == [576, 608, 256]
    assert [s.transition[0].num_features for s in model.decoder] == [704, 736, 384]


def test_loss_is_point_four_bce_plus_point_six_batch_dice():
    from hydra.utils import instantiate
    criterion = instantiate(compose_cfg(["task=sclera"]).loss)
    logits = torch.tensor([[[[0.0, 2.0], [-1.0, 3.0]]], [[[1.0, -2.0], [0.5, 0.0]]]])
    mask = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]], [[[1.0, 0.0], [0.0, 0.0]]]])
    p = 1 / (1 + np.exp(-logits.numpy().ravel()))
    y = mask.numpy().ravel()
    bce = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    dice = 1 - (2 * (p * y).sum() + 1e-6) / (p.sum() + y.sum() + 1e-6)    # over the whole batch at once
    terms = criterion({"logits": logits}, {"mask": mask})
    assert terms["bce"].item() == pytest.approx(0.4 * bce, rel=1e-6)
    assert terms["dice"].item() == pytest.approx(0.6 * dice, rel=1e-6)


def test_decay_1d_switch_puts_weight_decay_on_every_parameter():
    from common.training.optim import build_param_groups
    net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    named = [(f"model.head.{n}", p) for n, p in net.named_parameters()]
    decay_of = lambda groups: {name: g["weight_decay"] for g in groups for name in g["names"]}
    default = decay_of(build_param_groups(named, {"head": 1e-3}, weight_decay=0.1))
    assert default == {"model.head.0.weight": 0.1, "model.head.0.bias": 0.0, "model.head.1.weight": 0.0,
                       "model.head.1.bias": 0.0}
    every = decay_of(build_param_groups(named, {"head": 1e-3}, weight_decay=0.1, decay_1d=True))
    assert set(every.values()) == {0.1}
    assert compose_cfg(["task=sclera"]).trainer.optim.decay_1d is False     # other runs keep the default


def test_augmentation_is_the_decks_table():
    """The built transforms hand albumentations the deck's values in its own units."""
    from common.data.augment import GaussianHighlights, build_augment
    from sclera.augment import Rotate90
    transform = build_augment(compose_cfg(["experiment=sclera_cgdseg_mixed"]).data.augment)
    by_type = {type(t).__name__: t for t in transform.transforms}
    assert by_type["HorizontalFlip"].p == 0.5 and by_type["VerticalFlip"].p == 0.3
    assert by_type["Affine"].p == 0.4 and tuple(by_type["Affine"].rotate) == (-15, 15)
    assert by_type["Rotate90"].p == 0.15
    assert {by_type["Rotate90"].get_params()["factor"] for _ in range(200)} == {1, 2, 3}
    bc = by_type["BrightnessContrast"]
    assert isinstance(bc, A.RandomBrightnessContrast)
    assert bc.p == 0.6 and tuple(bc.contrast_limit) == pytest.approx((-0.2, 0.2))
    assert tuple(np.array(bc.brightness_limit) * 255) == pytest.approx((-30, 30)) and bc.brightness_by_max
    hsv = by_type["HueSaturation"]
    assert hsv.p == 0.4 and hsv.hue_shift == (-18, 18) and hsv.saturation_scale == (0.7, 1.3)
    drawn = [hsv.get_params() for _ in range(300)]
    assert -18 <= min(d["hue"] for d in drawn) < -15 and 15 < max(d["hue"] for d in drawn) <= 18
    assert 0.7 <= min(d["scale"] for d in drawn) < 0.73 and 1.27 < max(d["scale"] for d in drawn) <= 1.3
    noise = by_type["PixelGaussNoise"]
    assert isinstance(noise, A.GaussNoise)
    assert noise.p == 0.3 and tuple(np.array(noise.std_range) * 255) == pytest.approx((5, 20))
    blur = by_type["OneOf"]
    assert blur.p == 0.25 and [type(t).__name__ for t in blur.transforms] == ["GaussianBlur", "MotionBlur"]
    assert tuple(blur.transforms[0].sigma_limit) == (0.5, 3.0)
    assert by_type["ImageCompression"].p == 0.25 and tuple(by_type["ImageCompression"].quality_range) == (30, 95)
    holes = by_type["Occluders"]            # counts 0..3 uniform with p 0.4 == counts 1..3 with p 0.4 * 3 / 4
    assert isinstance(holes, A.CoarseDropout)
    assert tuple(holes.num_holes_range) == (1, 3) and holes.p == pytest.approx(0.3)
    blobs = by_type["GaussianHighlights"]
    assert isinstance(blobs, GaussianHighlights) and isinstance(by_type["Rotate90"], Rotate90)
    assert blobs.p == 0.25 and blobs.count == (1, 3) and blobs.strength == (0.3, 0.8)
    assert (blobs.relative_to, blobs.size_is, blobs.min_size) == ("longer", "sigma", 0.0)
    assert isinstance(transform, A.Compose)


def test_specular_blob_strength_scales_the_blend_towards_white():
    from common.data.augment import GaussianHighlights
    image = np.full((21, 21, 3), 100, np.uint8)
    out = GaussianHighlights(p=1.0).apply(image, blobs=[(10.0, 10.0, 3.0, 0.5)])
    assert out[10, 10, 0] == int(100 + (255 - 100) * 0.5) and out[0, 0, 0] == 100   # blend, then truncated to uint8


def test_speed_reports_the_models_counts_and_a_time():
    from sclera.speed import measure
    tiny = ["backbone=tiny", "backbone.layers=[1,3]", "model/sclera=cgdseg_tiny", "data.image_size=[112,112]"]
    out = measure(tiny, [2], "cpu", amp=False, compile_model=False, repeats=1, warmup=0)
    report = out["parameters"]
    assert report["trainable"] == sum(report[k] for k in ("backbone_adapters", "grounding", "fpn", "decoder", "head"))
    assert report["backbone_adapters"] == 4 * (8 * 64 + 192 * 8)      # LoRA r8 on the tiny ViT's 4 fused qkv (dim 64)
    assert out["input"] == [112, 112] and out["ms_per_image"][2] > 0


def hand_hsv(image, hue, scale):
    """Python's colorsys per pixel: hue + `hue` OpenCV units (1/180 of a turn), S x `scale` clipped to 1."""
    import colorsys
    out = np.empty(image.shape, np.float64)
    for index in np.ndindex(image.shape[:2]):
        h, s, v = colorsys.rgb_to_hsv(*(image[index] / 255.0))
        out[index] = colorsys.hsv_to_rgb((h + hue / 180.0) % 1.0, min(s * scale, 1.0), v)
    return np.rint(out * 255)


@pytest.mark.parametrize("hue, scale", [(0.0, 1.3), (0.0, 0.7), (-18.0, 1.0), (12.5, 1.17)])
def test_hue_saturation_scales_hsv_saturation_as_a_hand_computation(hue, scale):
    """The deck's "HSV hue/saturation ... sat x[0.7,1.3]" against colorsys (1 grey level of float rounding);
    at a pure saturation scale also against the closed form: each channel c -> V - (V - c) * scale."""
    from sclera.augment import HueSaturation
    image = np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    out = HueSaturation(p=1.0).apply(image, hue=hue, scale=scale)
    assert np.abs(out.astype(int) - hand_hsv(image, hue, scale)).max() <= 1
    if hue == 0.0:
        v = image.max(axis=2, keepdims=True).astype(np.float64)
        closed = v - (v - image) * scale
        unclipped = (image.min(axis=2) >= v[..., 0] * (1 - 1 / scale)) if scale > 1 else np.ones((12, 12), bool)
        assert np.abs(out[unclipped].astype(int) - np.rint(closed[unclipped])).max() <= 1
        grey = image @ np.array([0.299, 0.587, 0.114])              # ColorJitter's blend with grey differs
        blend = np.clip(grey[..., None] + (image - grey[..., None]) * scale, 0, 255)
        assert np.abs(out.astype(int) - np.rint(blend)).max() > 10


def test_the_presets_model_meets_a_256_input_as_the_decks_conv14(tmp_path):
    """The preset's backbone: an 18x18 position-embedding grid (timm img_size 256); a 256 input gives 18x18
    tokens, those of its first 252x252 pixels (the last 4 rows and columns reach no patch)."""
    from sclera.task import ScleraTask
    cfg = compose_cfg(["experiment=sclera_cgdseg_mixed", "backbone.weights=null", "model.grounding=none"])
    model = ScleraTask(cfg).build_model({}).eval()
    assert tuple(model.backbone.model.pos_embed.shape) == (1, 1 + 18 * 18, 384)
    image = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    changed = image.clone()
    changed[..., 252:, :] = 0.0
    changed[..., :, 252:] = 1.0
    with torch.no_grad():
        features = model.features(image)
        assert features.shape[-2:] == (18, 18)
        torch.testing.assert_close(model.features(changed), features, rtol=0, atol=0)


@pytest.mark.parametrize("overrides, message", [
    (["backbone=dinov3_s16"], "backbone.pos_embed_interpolation=bilinear: backbone vit_small_patch16_dinov3"),
    (["backbone=convnext_t"], "refuses backbone.model_kwargs .*img_size"),
    (["backbone.source=hf", "backbone.name=facebook/dinov2-small"], "set it to bicubic or use backbone.source=timm"),
], ids=["rope_vit", "convnext", "transformers"])
def test_the_preset_on_a_backbone_that_cannot_take_it_fails_at_start_naming_the_key(overrides, message):
    from sclera.task import ScleraTask
    cfg = compose_cfg(["experiment=sclera_cgdseg_mixed", "backbone.weights=null", "model.grounding=none", *overrides])
    with pytest.raises((ValueError, TypeError), match=message):
        ScleraTask(cfg).build_model({})
