"""Multi-view roadwork classifier.

views (B, V, 3, S, S) -> backbone (all views of the batch as ONE batch) -> per-view feature (CLS or
pooled tokens) -> projection to `width` -> [view pruning] -> [channel pyramid] -> gated-attention
blocks over views -> gated view fusion -> concat(vision, metadata) -> classifier -> 2 logits.
Also returns per-view logits (consistency loss) and weather logits from vision only (auxiliary loss);
with `seg_head`, per-patch roadwork-object logits of the views the backbone saw (auxiliary segmentation loss).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from common.data.cached_encoder import encode as backbone_tokens
from common.data.feature_cache import leading_shape, map_inputs
from common.models.backbone import Backbone, BackboneOutput
from common.models.option_groups import group_options
from roadwork.blocks import ChannelPyramid, GatedBlock
from roadwork.feature_stats import FeatureStats
from roadwork.meta_encoder import MetadataEncoder
from roadwork.seg_head import SegHead
from roadwork.view_fusion import GatedViewFusion, ViewScorer, gather_views

POOLS = ("cls", "mean", "max", "meanmax", "mlpmax", "mlpmeanmax")


class TokenMlpPool(nn.Module):
    """Learned pooling: a per-token MLP on the configured layers' patch tokens, then max (and mean) over
    tokens. Lets the head pick out small objects that plain pooling of frozen features washes out."""

    def __init__(self, in_dim: int, width: int, with_mean: bool):
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, width), nn.GELU(), nn.Linear(width, width))
        self.merge = nn.Linear(2 * width, width) if with_mean else nn.Identity()
        self.with_mean = with_mean

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.mlp(tokens)
        pooled = torch.cat([h.amax(1), h.mean(1)], dim=-1) if self.with_mean else h.amax(1)
        return self.merge(pooled)


def pool_tokens(tokens: list[Tensor], cls: Optional[Tensor], pool: str) -> Tensor:
    if pool == "cls":
        if cls is None:
            raise ValueError("model.pool=cls but the backbone has no class token; use mean, max or meanmax")
        return cls
    parts = []
    for t in tokens:
        if pool in ("mean", "meanmax"):
            parts.append(t.mean(1))
        if pool in ("max", "meanmax"):
            parts.append(t.amax(1))
    return torch.cat(parts, dim=-1)


class ViewFeatures(NamedTuple):
    feats: Tensor              # (B, V', width): the kept views' features
    scores: Optional[Tensor]   # view importance scores, None without pruning
    tokens: Tensor             # (B, V'', h, w, C): last configured layer's patch tokens of the encoded views
    encoded: Optional[Tensor]  # (B, V'') indices into the views of the encoded ones; None = all, in order


def mlp_head(in_dim: int, hidden: Sequence[int], out_dim: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(in_dim, h), nn.GELU(), nn.Dropout(dropout)]
        in_dim = h
    return nn.Sequential(*layers, nn.Linear(in_dim, out_dim))


@dataclass(frozen=True)
class ModelInputs:
    """What the data gives the model (RoadworkTask.build_model derives it from data.*)."""
    view_names: Sequence[str]
    vocab_sizes: dict                    # categorical metadata field -> vocabulary size (NULL entry excluded)
    text_fields: Sequence[str]           # free-text metadata fields
    use_gps: bool
    num_weather: int                     # classes of the auxiliary weather head
    view_size: Optional[int] = None      # the input side of each view (ensembles of different inputs)


@dataclass(frozen=True)
class ViewFeatureOptions:
    """Per view: pooled tokens (`pool`) -> projection to `width` -> [pruning to the prune_k best views, scored
    `prune_where` the backbone] -> [channel pyramid]."""
    pool: str
    width: int
    pyramid: bool
    prune_k: Optional[int]
    prune_where: str


@dataclass(frozen=True)
class BlockOptions:
    """Gated-attention blocks over the views; num_heads, mlp_ratio and dropout also serve the fusion (dropout
    the pyramid and the classifier too)."""
    depth: int
    num_heads: int
    mlp_ratio: float
    dropout: float
    block_norm: str = "pre"


@dataclass(frozen=True)
class FusionOptions:
    """Gated view fusion: cross-view attention layers and an optional refinement attention."""
    fusion_cross_layers: int
    fusion_refine: bool


@dataclass(frozen=True)
class MetaOptions:
    """The metadata encoder (roadwork.meta_encoder), used when the data has metadata inputs."""
    meta_embed_dim: int
    meta_dim: Optional[int]              # None: the fields' concatenation, no output projection (the plan)
    gps_frequencies: int
    meta_dropout: float
    text_encoder: Optional[dict] = None
    gps_encoding: str = "octaves"
    gps_frequency_range: Sequence[float] = (1.0, 1.0e4)
    gps_project: bool = True
    text_dim: Optional[int] = None
    text_null: str = "learned"


@dataclass(frozen=True)
class HeadOptions:
    """The classifier on concat(vision, metadata), the training feature statistics and the auxiliary seg head."""
    classifier_hidden: Sequence[int]
    feature_stats_momentum: Optional[float]
    seg_head: bool = False
    weather_hidden: Sequence[int] = ()   # the auxiliary weather head's hidden widths ([] = one Linear)


# constructor argument -> its option group. The field defaults (view_size, block_norm, text_encoder, gps_encoding,
# gps_frequency_range, gps_project, text_dim, text_null, seg_head, weather_hidden) are what checkpoints written
# before those options existed were built with.
OPTION_GROUPS = {"inputs": ModelInputs, "views": ViewFeatureOptions, "blocks": BlockOptions, "fusion": FusionOptions,
                 "meta": MetaOptions, "head": HeadOptions}


class RoadworkModel(nn.Module):
    """Built from the flat keys of conf/model/roadwork/*.yaml by `from_options` (RoadworkTask.build_model)."""

    def __init__(self, backbone: Backbone, inputs: ModelInputs, views: ViewFeatureOptions, blocks: BlockOptions,
                 fusion: FusionOptions, meta: MetaOptions, head: HeadOptions):
        super().__init__()
        if views.pool not in POOLS:
            raise ValueError(f"model.pool={views.pool!r}: expected one of {POOLS}")
        width, dropout = views.width, blocks.dropout
        self.backbone, self.pool, self.view_names = backbone, views.pool, list(inputs.view_names)
        self.project = self._make_projection(backbone, views.pool, width)
        self.pruner = self._make_pruner(views.prune_k, views.prune_where, width)
        self.pyramid = ChannelPyramid(width, dropout) if views.pyramid else nn.Identity()
        self.blocks = nn.ModuleList([GatedBlock(width, blocks.num_heads, blocks.mlp_ratio, dropout,
                                                norm=blocks.block_norm) for _ in range(blocks.depth)])
        self.view_size = inputs.view_size      # the input side of each view (ensembles of different inputs)
        self.fusion = GatedViewFusion(width, blocks.num_heads, fusion.fusion_cross_layers, fusion.fusion_refine,
                                      blocks.mlp_ratio, dropout)
        self.view_head = nn.Linear(width, 2)
        self.weather_head = (mlp_head(width, head.weather_hidden, inputs.num_weather, dropout) if head.weather_hidden
                             else nn.Linear(width, inputs.num_weather))     # checkpoints before weather_hidden
        has_meta = bool(inputs.vocab_sizes) or bool(inputs.text_fields) or inputs.use_gps
        self.meta = MetadataEncoder(inputs.vocab_sizes, inputs.text_fields, inputs.use_gps, meta.meta_embed_dim,
                                    meta.meta_dim, meta.gps_frequencies, meta.meta_dropout,
                                    text_encoder=meta.text_encoder, gps_encoding=meta.gps_encoding,
                                    gps_frequency_range=meta.gps_frequency_range, gps_project=meta.gps_project,
                                    text_dim=meta.text_dim, text_null=meta.text_null) if has_meta else None
        self.classifier = mlp_head(width + (self.meta.out_dim if has_meta else 0), head.classifier_hidden, 2, dropout)
        # Added to the roadwork logit at inference; set by calibration (task.calibrate), saved in checkpoints.
        self.register_buffer("logit_shift", torch.zeros(()))
        self.feature_stats = FeatureStats(width, head.feature_stats_momentum)   # for feature-distance-filtered TTA
        self.seg_head = SegHead(backbone.embed_dim) if head.seg_head else None

    @classmethod
    def from_options(cls, backbone: Backbone, **options) -> "RoadworkModel":
        """From the flat keys of conf/model/roadwork/*.yaml (as every checkpoint's config stores them) and the
        fields of ModelInputs, each handed to the group with a field of its name (OPTION_GROUPS)."""
        return cls(backbone, **group_options(options, OPTION_GROUPS, "model (roadwork.model.RoadworkModel)"))

    @staticmethod
    def _make_projection(backbone: Backbone, pool: str, width: int) -> nn.Module:
        if pool.startswith("mlp"):
            if len(set(backbone.embed_dims)) > 1 or len(set(backbone.layer_strides)) > 1:
                raise ValueError(f"model.pool={pool} concatenates the layers' tokens, which needs one grid and one "
                                 f"width; backbone.layers={list(backbone.layers)} have widths {backbone.embed_dims}: "
                                 f"use model.pool=mean, max or meanmax, or one backbone layer")
            return TokenMlpPool(backbone.embed_dim * len(backbone.layers), width, pool == "mlpmeanmax")
        pooled = backbone.embed_dim if pool == "cls" else sum(backbone.embed_dims) * (2 if pool == "meanmax" else 1)
        return nn.Sequential(nn.LayerNorm(pooled), nn.Linear(pooled, width), nn.GELU())

    def _make_pruner(self, k: Optional[int], where: str, width: int) -> Optional[ViewScorer]:
        self.prune_k, self.prune_where = k, where
        if k is None or k >= len(self.view_names):
            self.prune_k = None
            return None
        if where == "after":
            return ViewScorer(width, None)
        if where == "before":
            if "global" not in self.view_names:
                raise ValueError("model.prune_where=before scores views from the global view: add 'global' to data.views")
            if k < 2:
                raise ValueError(f"model.prune_k={k} with prune_where=before keeps only the global view: use prune_k "
                                 f">= 2, or data.views=global")
            return ViewScorer(width, len(self.view_names) - 1)
        raise ValueError(f"model.prune_where={where!r}: expected 'after' or 'before'")

    def encode(self, images: Tensor | BackboneOutput, keys: Optional[list[str]] = None) -> tuple[Tensor, Tensor]:
        """(N, 3, S, S) -> (N, width) and the last configured layer's patch tokens (N, h, w, C), all images
        through the backbone as one batch (keys: feature cache; or `images` are already their cached features)."""
        frozen = not any(p.requires_grad for p in self.backbone.parameters())
        with torch.no_grad() if frozen else contextlib.nullcontext():
            out = backbone_tokens(self.backbone, images, keys)
            if self.pool.startswith("mlp"):
                feats = torch.cat(out.tokens, dim=-1)
            else:
                feats = pool_tokens(out.tokens, out.cls, self.pool)
        return self.project(feats), out.tokens[-1].unflatten(1, tuple(out.grid))

    def view_features(self, views: Tensor | BackboneOutput, keys: Optional[list[list[str]]] = None) -> ViewFeatures:
        """(B, V, 3, S, S) -> the kept views' features, importance scores and the encoded views' tokens.
        views may be their cached backbone features instead (tokens (B, V, N, C)); keys: the feature-cache key of
        every view, (B, V) nested lists, when the backbone is cached."""
        batch, count = leading_shape(views, 2)
        if self.pruner is None or self.prune_where == "after":
            flat_keys = [k for row in keys for k in row] if keys is not None else None
            feats, tokens = self.encode(map_inputs(views, lambda t: t.flatten(0, 1)), flat_keys)
            feats, tokens = feats.view(batch, count, -1), tokens.unflatten(0, (batch, count))
            if self.pruner is None:
                return ViewFeatures(feats, None, tokens, None)
            scores = self.pruner.scores(feats)
            index, gate = self.pruner.top_k(scores, self.prune_k)
            return ViewFeatures(gather_views(feats, index) * gate[..., None], scores, tokens, None)
        g = self.view_names.index("global")
        glob, glob_tokens = self.encode(map_inputs(views, lambda t: t[:, g]),
                                        [row[g] for row in keys] if keys is not None else None)
        others = map_inputs(views, lambda t: torch.cat([t[:, :g], t[:, g + 1:]], dim=1))
        scores = self.pruner.scores(glob)
        index, gate = self.pruner.top_k(scores, self.prune_k - 1)
        picked_keys = None if keys is None else [
            (row[:g] + row[g + 1:])[i] for row, chosen in zip(keys, index.tolist()) for i in chosen]
        picked, picked_tokens = self.encode(map_inputs(others, lambda t: gather_views(t, index).flatten(0, 1)),
                                            picked_keys)
        picked, picked_tokens = picked.view(batch, index.shape[1], -1), picked_tokens.unflatten(0, index.shape)
        tokens = torch.cat([glob_tokens[:, None], picked_tokens], dim=1)
        encoded = torch.cat([torch.full_like(index[:, :1], g), index + (index >= g).long()], dim=1)
        return ViewFeatures(torch.cat([glob[:, None], picked * gate[..., None]], dim=1), scores, tokens, encoded)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        vf = self.view_features(batch["views"], batch.get("cache_key"))
        feats = self.pyramid(vf.feats)
        for block in self.blocks:
            feats = block(feats)
        mask = torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)
        pooled, per_view, gates = self.fusion(feats, mask)
        if self.training:
            self.feature_stats.update(pooled)
        fused = pooled if self.meta is None else torch.cat([pooled, self.meta(batch)], dim=1)
        logits = self.classifier(fused)
        if not self.training:
            logits = logits + torch.stack([torch.zeros_like(self.logit_shift), self.logit_shift]).to(logits.dtype)
        out = {"logits": logits, "prob": logits.float().softmax(-1)[:, 1], "view_logits": self.view_head(per_view),
               "weather_logits": self.weather_head(pooled), "view_gates": gates, "features": pooled}
        if vf.scores is not None:
            out["view_scores"] = vf.scores
        if self.seg_head is not None:
            out["seg_logits"] = self.seg_head(vf.tokens)
            if vf.encoded is not None:      # prune_where=before: only the global and the picked views
                out["seg_views"] = vf.encoded
        return out
