"""Frozen sentence-encoder text metadata: pooling, padding, freezing, cache, NULL handling, raw text in samples."""
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from common.data.datasets import default_collate
from common.models.backbone import WeightsUnavailableError
from common.training.checkpoint import trainable_state
from common.training.optim import named_trainable
from roadwork.data import RoadworkDataset
from roadwork.meta_encoder import MetadataEncoder
from roadwork.samples import index_samples
from roadwork.text_encoder import SentenceEncoder

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "road", "work", "ahead", "cone", "closed", "lane", "the"]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizer
    folder = tmp_path_factory.mktemp("tiny_bert")
    BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)}).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=0.5,
                        attention_probs_dropout_prob=0.5)       # dropout on: eval mode must switch it off
    BertModel(config).save_pretrained(folder)
    return folder


def encoder(folder: Path, normalize: bool = True, cache_size: int = 100) -> SentenceEncoder:
    return SentenceEncoder(name_or_path=str(folder), max_length=16, normalize=normalize, cache_size=cache_size)


def hand_embedding(folder: Path, text: str, normalize: bool) -> torch.Tensor:
    from transformers import BertModel, BertTokenizer
    tokenizer, model = BertTokenizer.from_pretrained(folder), BertModel.from_pretrained(folder).eval()
    ids = tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        hidden = model(**ids).last_hidden_state[0]            # (T, H), no padding: plain mean over tokens
    pooled = hidden.mean(0)
    return F.normalize(pooled, dim=0) if normalize else pooled


@pytest.mark.parametrize("normalize", [True, False])
def test_mean_pooled_embedding_matches_hand_computation(tiny_bert, normalize):
    enc = encoder(tiny_bert, normalize=normalize).train()       # train() must not enable the BERT dropout
    got = enc(["road work ahead"])
    assert got.shape == (1, 16) and enc.hidden_size == 16
    torch.testing.assert_close(got[0], hand_embedding(tiny_bert, "road work ahead", normalize))
    if normalize:
        assert torch.linalg.vector_norm(got[0]).item() == pytest.approx(1.0)


def test_padding_does_not_change_an_embedding(tiny_bert):
    enc = encoder(tiny_bert, cache_size=0)
    ids = enc.tokenizer(["cone", "the road lane closed ahead"], padding=True)["attention_mask"]
    assert sum(ids[0]) < len(ids[0])                               # the short sentence really is padded
    alone, batched = enc(["cone"]), enc(["cone", "the road lane closed ahead"])
    torch.testing.assert_close(batched[0], alone[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batched[0], batched[1])


def test_frozen_and_left_out_of_optimiser_and_checkpoint(tiny_bert):
    meta = MetadataEncoder({}, ["scene_description"], use_gps=False, dim=8, out_dim=8, gps_frequencies=2,
                           dropout=0.0, text_encoder={"name_or_path": str(tiny_bert), "max_length": 16,
                                                      "normalize": True, "cache_size": 10})
    bert_names = {f"model.{n}" for n, _ in meta.named_parameters() if n.startswith("text_encoder.")}
    assert bert_names and all(not p.requires_grad for p in meta.text_encoder.parameters())
    trainable = {n for n, _ in named_trainable(meta, torch.nn.Module())}
    assert not trainable & bert_names and "model.text_proj.scene_description.weight" in trainable
    assert not any(k.startswith("text_encoder.") for k in trainable_state(meta))
    out = meta({"scene_description": torch.tensor([1]), "scene_description_text": ["road work"]})
    out.sum().backward()
    assert all(p.grad is None for p in meta.text_encoder.parameters())
    assert meta.text_proj["scene_description"].weight.grad is not None


def test_cache_hit_returns_the_same_tensor_without_running_the_model(tiny_bert):
    enc = encoder(tiny_bert, cache_size=2)
    calls = []
    enc.model.register_forward_hook(lambda module, args, out: calls.append(1))
    first = enc(["road work", "cone", "road work"])
    assert len(calls) == 1 and list(enc.cache) == ["road work", "cone"]
    torch.testing.assert_close(first[0], first[2], rtol=0, atol=0)
    again = enc(["cone", "road work"])
    assert len(calls) == 1                                        # served from the cache
    torch.testing.assert_close(again, first[[1, 0]], rtol=0, atol=0)
    enc(["lane"])                                                # bounded: evicts the least recently used
    assert len(calls) == 2 and list(enc.cache) == ["road work", "lane"]


def test_metadata_encoder_text_null_and_known(tiny_bert):
    cfg = {"name_or_path": str(tiny_bert), "max_length": 16, "normalize": True, "cache_size": 10}
    meta = MetadataEncoder({}, ["scene_description"], use_gps=False, dim=8, out_dim=8, gps_frequencies=2,
                           dropout=0.0, text_encoder=cfg).eval()
    with torch.no_grad():
        meta.text_null["scene_description"].normal_()
    batch = {"scene_description": torch.tensor([0, 1, 1, 0]),
             "scene_description_text": ["", "road work ahead", "cone", ""]}
    with torch.no_grad():
        parts = meta._text("scene_description", batch)
        proj = meta.text_proj["scene_description"](meta.text_encoder(["road work ahead", "cone"]))
    null = meta.text_null["scene_description"]
    torch.testing.assert_close(parts[[0, 3]], null.expand(2, -1))
    torch.testing.assert_close(parts[1:3], proj)
    assert not torch.allclose(parts[1], parts[2])
    meta.train()
    meta.dropout = 1.0                                            # every known text dropped -> NULL
    torch.testing.assert_close(meta._text("scene_description", batch), null.expand(4, -1))
    # no text field in the data: the encoder is off and never loaded (a missing folder does not matter)
    off = MetadataEncoder({"weather": 2}, [], False, 8, 8, 2, 0.0, text_encoder={**cfg, "name_or_path": "/no/such"})
    assert off.text_encoder is None and off.out_dim == 8


def test_flag_embedding_unchanged_without_text_encoder():
    meta = MetadataEncoder({"weather": 3}, ["scene_description"], use_gps=False, dim=4, out_dim=4,
                           gps_frequencies=2, dropout=0.5).train()
    assert meta.text_encoder is None
    batch = {"weather": torch.tensor([0, 1, 3, 2, 1, 2]), "scene_description": torch.tensor([0, 1, 1, 0, 1, 1])}
    torch.manual_seed(3)
    got = meta(batch)
    torch.manual_seed(3)                                          # the previous formula: categories, then flags
    parts = []
    for name, table in {**meta.categories, **meta.texts}.items():
        index = batch[name]
        kept = (index > 0) & (torch.rand(index.shape) >= 0.5)
        parts.append(table(torch.where(kept, index, torch.zeros_like(index))))
    torch.testing.assert_close(got, meta.out(torch.cat(parts, dim=1)))


def test_missing_weights_error_names_the_path(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="(?s)no-such-org/no-such-model.*hf download"):
        SentenceEncoder(name_or_path="no-such-org/no-such-model", max_length=8, normalize=True, cache_size=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsUnavailableError, match=f"(?s){re.escape(str(tmp_path / 'empty'))}.*config.json"):
        SentenceEncoder(name_or_path=str(tmp_path / "empty"), max_length=8, normalize=True, cache_size=0)


def test_samples_and_batches_carry_the_raw_text(tmp_path):
    records = {"a": {"label": 1, "scene_description": "  Road work ahead "},
               "b": {"label": 0, "scene_description": "null"}, "c": {"label": 0}}
    for stem, record in records.items():
        Image.new("RGB", (56, 42), (200, 100, 0)).save(tmp_path / f"{stem}.jpg")
        (tmp_path / f"{stem}.json").write_text(json.dumps(record))
    samples = index_samples(tmp_path, {}, ["scene_description"], require_label=True, skip_bad=False).samples
    got = {s.name: (s.meta["scene_description"], s.meta["scene_description_text"]) for s in samples}
    assert got == {"a.jpg": (1, "Road work ahead"), "b.jpg": (0, ""), "c.jpg": (0, "")}
    batch = default_collate([RoadworkDataset(samples, "single", 28)[i] for i in range(3)])
    assert batch["scene_description_text"] == ["Road work ahead", "", ""]
    assert batch["scene_description"].tolist() == [1, 0, 0]
    (tmp_path / "c.json").write_text(json.dumps({"label": 0, "scene_description": ["a", "list"]}))
    with pytest.raises(ValueError, match="c.json: scene_description must be text"):
        index_samples(tmp_path, {}, ["scene_description"], require_label=True, skip_bad=False)


def test_text_null_zeros_is_the_plans_unknown_text(tiny_bert):
    cfg = {"name_or_path": str(tiny_bert), "max_length": 16, "normalize": True, "cache_size": 10}
    meta = MetadataEncoder({}, ["scene_description"], use_gps=False, dim=8, out_dim=None, gps_frequencies=2,
                           dropout=0.0, text_encoder=cfg, text_dim=12, text_null="zeros").eval()
    batch = {"scene_description": torch.tensor([0, 1]), "scene_description_text": ["", "road work ahead"]}
    out = meta(batch)
    assert out.shape == (2, 12) and meta.out_dim == 12
    assert torch.equal(out[0], torch.zeros(12))
    assert "model.text_null.scene_description" not in dict(named_trainable(meta, torch.nn.Identity()))
    with pytest.raises(ValueError, match="text_null"):
        MetadataEncoder({}, ["scene_description"], False, 8, None, 2, 0.0, text_encoder=cfg, text_null="mean")
