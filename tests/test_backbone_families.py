"""Backbone families are registered specs: every registered family is built and indexed, and a new family is one
registration (no edit of backbone.py, adapters.py or optim.py)."""
import pytest
import torch

from common.models.adapters import inject_adapters
from common.models.backbone import create_backbone
from common.models.backbone_families import (FAMILIES, TIMM_BLOCKS, FamilySpec, _timm_vit_geometry, _timm_vit_tokens,
                                             register_family)
from common.training.optim import build_param_groups
from tests.test_backbone import SPECS, build, images

BEIT = dict(depth=3, embed_dim=32, num_heads=2, img_size=32)


def test_every_registered_family_has_a_tiny_model_in_the_backbone_tests():
    assert {spec[4] for spec in SPECS.values()} == set(FAMILIES)


@pytest.mark.parametrize("key", list(SPECS))
def test_block_of_finds_every_block_and_nothing_outside_them(key):
    bb = build(key)
    assert bb.spec is FAMILIES[SPECS[key][4]]
    blocks = [bb.block_of(name) for name, _ in bb.model.named_parameters()]
    assert set(blocks) - {None} == set(range(bb.num_blocks))
    assert None in blocks                     # the patch embedding / stem belongs to no block


def test_registering_a_name_twice_fails():
    with pytest.raises(ValueError, match="registered twice"):
        register_family(FAMILIES["timm_vit"])


def test_a_new_family_is_one_registration(monkeypatch):
    """BEiT (timm.models.beit) is no registered family; one FamilySpec makes it build, adapt and decay."""
    with pytest.raises(ValueError, match=r"timm\.models\.beit.*no registered family"):
        create_backbone(source="timm", name="beit_base_patch16_224", weights=None, layers=[2], model_kwargs=BEIT)
    monkeypatch.setitem(FAMILIES, "timm_beit", FamilySpec(
        name="timm_beit", source="timm", kinds=("timm.models.beit",), geometry=_timm_vit_geometry,
        tokens=_timm_vit_tokens, block_pattern=TIMM_BLOCKS, adapter_targets={"qkv": ("attn.qkv",)}))
    bb = create_backbone(source="timm", name="beit_base_patch16_224", weights=None, layers=[1, 2],
                         model_kwargs=BEIT)
    out = bb(images(bb, 2, 2))
    assert bb.family == "timm_beit" and [t.shape for t in out.tokens] == [torch.Size([2, 4, 32])] * 2
    assert out.cls is not None and out.cls.shape == (2, 32)
    names = inject_adapters(bb, "lora", r=2, alpha=4, dropout=0.0, targets=["qkv"], last_n_blocks=2)
    assert names == ["blocks.1.attn.qkv", "blocks.2.attn.qkv"]
    trainable = [("model.backbone.model." + n, p) for n, p in bb.model.named_parameters() if p.requires_grad]
    groups = build_param_groups(trainable, {"adapter": 1.0}, weight_decay=0.0, layer_decay=0.5,
                                num_blocks=bb.num_blocks, block_of=bb.block_of)
    assert sorted(g["lr"] for g in groups) == [0.5, 1.0]        # block 1 one step below the top block 2
