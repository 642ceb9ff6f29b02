"""Roadwork auxiliary segmentation: synthetic masks, mask views aligned through augmentation, the masked
BCE on the patch grid against a hand computation, the seg head on the backbone tokens (pruning, cache), e2e."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from common.data.datasets import reseed_augmentations
from common.data.cached_encoder import build_cached_encoder
from common.data.feature_cache import image_key
from common.models.backbone import create_backbone
from roadwork import synth
from roadwork.data import RoadworkDataset, mask_files
from roadwork.loss import RoadworkLoss, seg_loss
from roadwork.model import RoadworkModel
from roadwork.samples import index_samples
from roadwork.seg_head import SegHead
from roadwork.views import cut_views, resolve_views
from tests.cli import run_cli

VOCAB = {"weather": ["clear"], "daytime": ["day"], "scene": ["urban"]}
TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 28}


def test_mask_is_exactly_the_drawn_objects():
    rng = np.random.default_rng(1)
    img, mask = Image.new("RGB", (200, 150)), Image.new("L", (200, 150))
    synth._roadwork(synth._ImageAndMask(ImageDraw.Draw(img), ImageDraw.Draw(mask)), rng, 200, 150, 60, False)
    drawn, masked = np.asarray(img).any(-1), np.asarray(mask)
    assert set(np.unique(masked)) == {0, 255} and drawn.mean() > 0.02
    np.testing.assert_array_equal(drawn, masked == 255)     # same shapes, same pixels (all colours non-black)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    synth.write_split(root / "train", root / "masks" / "train", 16, 112, 84, seed=3, positive_fraction=0.6,
                      small_fraction=0.0, distractor_p=0.0, meta_present=1.0, quality=95)
    return root, index_samples(root / "train", VOCAB, [], True, False).samples


def test_synthetic_masks_cover_the_roadwork_colours(synthetic):
    root, samples = synthetic
    orange_or_white = {0: [], 1: []}
    for sample in samples:
        mask = np.asarray(Image.open(root / "masks" / "train" / sample.name.replace(".jpg", ".png")))
        rgb = np.asarray(Image.open(sample.image)).astype(int)
        if sample.label == 0:
            assert mask.max() == 0                              # negatives: an empty mask
            continue
        assert mask.shape == rgb.shape[:2] and mask.max() == 255
        r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
        colour = ((r > 150) & (r > b + 60)) | ((r > 170) & (g > 170) & (b > 170))
        record = json.loads(sample.image.with_suffix(".json").read_text())
        if (record["weather"], record["daytime"]) == ("clear", "day"):    # unaltered colours, blue sky
            orange_or_white[1].append(colour[mask == 255].mean())
            orange_or_white[0].append(colour[mask == 0].mean())
    assert orange_or_white[1] and min(orange_or_white[1]) > 0.5 and max(orange_or_white[0]) < 0.1


def test_mask_files_and_views_stay_aligned_through_flip(synthetic, tmp_path):
    root, samples = synthetic
    samples = sorted(samples, key=lambda s: -s.label)[:2]               # two positives
    missing = root / "masks" / "train" / samples[1].name.replace(".jpg", ".png")
    missing.rename(tmp_path / "moved.png")
    try:
        masks = mask_files(samples, root, "masks")
        flip = [{"_target_": "albumentations.HorizontalFlip", "p": 1.0},
                {"_target_": "albumentations.RandomBrightnessContrast", "p": 1.0}]   # moves the image only
        data = RoadworkDataset(samples, "highres12", 28, augment=flip, masks=masks)
        reseed_augmentations(data, 0)          # the pipeline's generator is seeded from OS entropy when built
        items = [data[0], data[1]]
    finally:
        (tmp_path / "moved.png").rename(missing)
    assert masks[1] is None and masks[0] == root / "masks" / "train" / samples[0].name.replace(".jpg", ".png")
    mask_views = cut_views(Image.open(masks[0]), resolve_views("highres12"), 28, Image.NEAREST)
    expected = torch.from_numpy(np.stack(mask_views)[..., ::-1] == 255)[:, None].float()
    assert items[0]["mask_known"] == 1.0 and expected.sum() > 0
    torch.testing.assert_close(items[0]["seg_target"], expected, rtol=0, atol=0)
    image_views = np.stack(cut_views(Image.open(samples[0].image), resolve_views("highres12"), 28))
    flipped, unflipped = (torch.from_numpy(v.copy()).permute(0, 3, 1, 2).float() for v in (image_views[:, :, ::-1],
                                                                                          image_views))
    distance = {name: (items[0]["views"] * 255 - ref).abs().mean() for name, ref in
                (("flipped", flipped), ("unflipped", unflipped))}
    assert distance["flipped"] < 0.75 * distance["unflipped"]    # the image flipped the same way (then recoloured)
    assert items[1]["mask_known"] == 0.0 and items[1]["seg_target"].abs().sum() == 0
    assert "seg_target" not in RoadworkDataset(samples, "single", 28)[0]     # no masks configured: nothing new
    with pytest.raises(FileNotFoundError, match="data.masks='nope'"):
        mask_files(samples, root, "nope")


def test_bad_mask_and_benchmark_refused(synthetic, tmp_path):
    root, samples = synthetic
    Image.new("RGB", (112, 84)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="rgb.png: expected a single-channel mask"):
        RoadworkDataset(samples[:1], "single", 28, masks=[tmp_path / "rgb.png"])[0]
    with pytest.raises(ValueError, match="train_benchmark_levels"):
        RoadworkDataset(samples[:1], "single", 28, benchmark=object(), masks=[None])


def _hand_seg_loss(logits, target, known):
    b, v, _, h, w = logits.shape
    sh, sw = target.shape[-2:]
    patches = target.reshape(b, v, 1, h, sh // h, w, sw // w).mean((4, 6))    # object fraction of each patch
    per_item = torch.stack([F.binary_cross_entropy_with_logits(logits[i], patches[i]) for i in range(b)])
    return sum(per_item[i] for i in range(b) if known[i]) / max(sum(known), 1)


def test_seg_loss_matches_hand_computation_with_masked_items():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 1, 2, 3, requires_grad=True)
    target = (torch.rand(3, 4, 1, 8, 12) > 0.6).float()
    batch = {"seg_target": target, "mask_known": torch.tensor([1.0, 0.0, 1.0])}
    got = seg_loss({"seg_logits": logits}, batch)
    torch.testing.assert_close(got, _hand_seg_loss(logits, target, [1, 0, 1]))
    got.backward()
    assert logits.grad[1].abs().sum() == 0 and logits.grad[0].abs().sum() > 0  # the unknown item adds nothing
    # only some views encoded (prune_where=before): their masks are gathered
    views = torch.tensor([[0, 2], [1, 3], [0, 3]])
    part = logits.detach()[:, :2]
    got = seg_loss({"seg_logits": part, "seg_views": views}, batch)
    picked = torch.stack([target[i, views[i]] for i in range(3)])
    torch.testing.assert_close(got, _hand_seg_loss(part, picked, [1, 0, 1]))
    none = torch.randn(3, 4, 1, 2, 3, requires_grad=True)
    zero = seg_loss({"seg_logits": none}, {"seg_target": target, "mask_known": torch.zeros(3)})
    zero.backward()
    assert float(zero.detach()) == 0.0 and none.grad.abs().sum() == 0
    crit = RoadworkLoss(1.0, 0.0, 0.0, 0.5, 2.0, 0.0, 0.0, seg_weight=0.2)
    out = {"logits": torch.zeros(3, 2), "seg_logits": logits.detach()}
    terms = crit(out, {**batch, "label": torch.tensor([0, 1, 1])})
    torch.testing.assert_close(terms["seg"], 0.2 * _hand_seg_loss(logits.detach(), target, [1, 0, 1]))
    with pytest.raises(ValueError, match="data.masks"):
        crit(out, {"label": torch.tensor([0, 1, 1])})


def _model(views, backbone=None, prune_k=None, where="after"):
    backbone = backbone or create_backbone("timm", "vit_small_patch14_dinov2", None, [0, 1], True, 0, TINY)
    return RoadworkModel.from_options(
        backbone, view_names=resolve_views(views), pool="mlpmax", width=16, depth=1, num_heads=2, mlp_ratio=2.0,
        dropout=0.0, pyramid=False, fusion_cross_layers=1, fusion_refine=False, prune_k=prune_k, prune_where=where,
        vocab_sizes={}, text_fields=[], use_gps=False, meta_embed_dim=4, meta_dim=8, gps_frequencies=2,
        meta_dropout=0.0, classifier_hidden=[8], num_weather=4, feature_stats_momentum=None, seg_head=True).eval()


def test_seg_head_shape_and_logits_of_the_encoded_views():
    head = SegHead(8)
    tokens = torch.randn(2, 3, 4, 5, 8)
    out = head(tokens)
    assert out.shape == (2, 3, 1, 4, 5)
    torch.testing.assert_close(out[1, 2, 0], head.linear(F.layer_norm(tokens[1, 2], (8,), head.norm.weight,
                                                                     head.norm.bias)).squeeze(-1))
    torch.manual_seed(0)
    model = _model("highres12", prune_k=4, where="before")
    views = torch.rand(2, 12, 3, 28, 28)
    out = model({"views": views})
    assert out["seg_logits"].shape == (2, 4, 1, 2, 2) and out["seg_views"][:, 0].tolist() == [0, 0]
    for b in range(2):                                      # each encoded view's logits from its own tokens
        tokens = model.backbone(views[b, out["seg_views"][b]]).tokens[-1]       # (4, h*w, C), row-major grid
        expected = model.seg_head(tokens[None]).squeeze(2).view(1, 4, 1, 2, 2)[0]
        torch.testing.assert_close(out["seg_logits"][b], expected)


def test_seg_head_on_cached_features(tmp_path):
    torch.manual_seed(0)
    backbone = create_backbone("timm", "vit_small_patch14_dinov2", None, [0, 1], True, 0, TINY)
    cfg = {"source": "timm", "name": "vit_small_patch14_dinov2", "layers": [0, 1], "model_kwargs": TINY}
    cached = _model("single", build_cached_encoder(backbone, cfg, (28, 28), tmp_path, dtype="float32"))
    plain = _model("single", backbone)
    plain.load_state_dict(cached.state_dict(), strict=False)
    Image.new("RGB", (28, 28), (200, 90, 10)).save(tmp_path / "a.png")
    views = torch.rand(1, 1, 3, 28, 28)
    batch = {"views": views, "cache_key": [[image_key(tmp_path / "a.png", "center-28")]]}
    first, second = cached(batch)["seg_logits"], cached(batch)["seg_logits"]   # a miss, then a hit
    assert cached.backbone.hits == 1 and cached.backbone.misses == 1
    torch.testing.assert_close(second, first)
    torch.testing.assert_close(first, plain({"views": views})["seg_logits"])


@pytest.mark.slow
def test_train_with_masks_logs_seg_loss(tmp_path):
    small = ["data.synth.splits.train.count=16", "data.synth.splits.val.count=8", "data.synth.splits.test.count=2",
             "data.synth.splits.train224.count=2", "data.synth.splits.val224.count=2", "data.batch_size=8",
             "data.num_workers=0", "data.views=[global,center]", "data.view_size=28", "backbone=tiny"]
    run_cli(["task=roadwork", "trainer=debug", "data.masks=masks", "model.seg_head=true", *small],
            tmp_path / "train", tmp_path / "cache")
    records = [json.loads(line) for line in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    seg = [r["train/seg"] for r in records if "train/seg" in r]
    assert len(seg) == 2 and all(0.0 < v < 0.2 * 5 for v in seg), records
    assert all(np.isfinite(r["val/loss"]) for r in records if "val/loss" in r)
