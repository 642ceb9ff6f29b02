"""Backbone (+ views, metadata fusion, manifold mixup) + head -> grams of the five targets
(+ auxiliary heights, NDVI, state logits)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from biomass.crops import CropBag, split_crops
from biomass.early_fusion import ndvi_plane, widen_first_conv
from biomass.meta_encoder import FIELDS, MODES, MetadataFusion, check_fields
from biomass.mixing import mix_features, mix_labels
from biomass.param import get_param
from biomass.stages import StageProjector, is_pyramid
from biomass.tta import ViewTTA
from biomass.view_fusion import LAYOUTS, HalvesEncoder
from common.data.cached_encoder import CachedEncoder, encode
from common.models.backbone import Backbone, BackboneOutput
from common.training.mixup import sample_mixup

AUX_DIMS = {"height": 1, "ndvi": 1}


def _check_aux(aux: Sequence[str], metadata: dict) -> None:
    unknown = sorted(set(aux) - set(AUX_DIMS) - {"state"})
    if unknown:
        raise ValueError(f"model.aux: unknown auxiliary output(s) {unknown}; "
                         f"expected a subset of {sorted(AUX_DIMS) + ['state']}")
    if metadata["mode"] not in MODES:
        raise ValueError(f"model.metadata.mode={metadata['mode']!r}: expected one of {MODES}")
    if metadata["mode"] != "none":
        inputs = {FIELDS[f][0] for f in check_fields(metadata["fields"])}
        leak = sorted(inputs & set(aux))
        if leak:
            raise ValueError(f"model.aux {leak} are also metadata inputs (model.metadata.fields): "
                             f"an auxiliary target must not be fed to the model")


def _check_crops(views: dict, metadata: dict, mixup: dict, backbone) -> None:
    clashes = {"model.views.layout=halves": views["layout"] == "halves",
               "model.metadata.mode": metadata["mode"] != "none", "model.mixup.prob > 0": float(mixup["prob"]) > 0,
               "data.cache_features=true": isinstance(backbone, CachedEncoder)}
    named = [name for name, on in clashes.items() if on]
    if named:
        raise ValueError(f"model.crops.grid (MIL over crops) does not combine with {named}: the crops are a batch "
                         f"of their own; turn those off or set model.crops.grid=null")


class BiomassModel(nn.Module):
    """forward(batch) -> pred_g (B, 5) grams in TARGETS order, space (B, S) pooled non-negative
    parameterisation space (units of the training mean total g/m2), the auxiliary outputs that were
    asked for (height, ndvi in the units loss.aux_raw sets; state_logits), and in training with mixup the
    mixed labels under "mixed/<key>"."""

    def __init__(self, backbone: Backbone, head: Callable[..., nn.Module], param: str, aux: Sequence[str],
                 stats: dict, views: dict, metadata: dict, mixup: dict, stages: dict, early_ndvi: bool = False,
                 crops: dict | None = None, tta: ViewTTA | None = None):
        super().__init__()
        _check_aux(aux, metadata)
        if views["layout"] not in LAYOUTS:
            raise ValueError(f"model.views.layout={views['layout']!r}: expected one of {LAYOUTS}")
        self.backbone = backbone
        if isinstance(backbone, CachedEncoder) and views["layout"] == "halves":
            raise ValueError("data.cache_features=true caches whole-image tokens; model.views.layout=halves "
                             "encodes two crops: use layout=whole or data.cache_features=false")
        self.early_ndvi = None
        if early_ndvi:
            if isinstance(backbone, CachedEncoder):
                raise ValueError("model.early_ndvi=true changes the backbone's input: set data.cache_features=false")
            widen_first_conv(backbone.model, 1)
            self.early_ndvi = (float(stats["ndvi_mean"]), float(stats["ndvi_std"]))
        dims, strides = list(backbone.embed_dims), list(backbone.layer_strides)
        # a pyramid backbone (ConvNeXt stages): every stage to one width and grid, as a ViT's layers
        self.stages = StageProjector(dims, strides, stages["width"], int(stages["stride"])) \
            if is_pyramid(dims, strides) else None
        embed_dim = self.stages.width if self.stages is not None else backbone.embed_dim
        self.halves = HalvesEncoder(embed_dim, len(backbone.layers), int(views["heads"]), float(views["dropout"])) \
            if views["layout"] == "halves" else None
        self.metadata = None if metadata["mode"] == "none" else MetadataFusion(
            stats, metadata["mode"], list(metadata["fields"]), int(metadata["dim"]), int(metadata["heads"]),
            embed_dim, len(backbone.layers), float(metadata["field_dropout"]))
        self.mixup = {"prob": float(mixup["prob"]), "alpha": float(mixup["alpha"])}
        self.states = list(stats["states"])
        self.param = get_param(param)
        self.aux_dims = {name: AUX_DIMS.get(name, len(self.states)) for name in aux}
        out_dim = self.param.raw_dim + sum(self.aux_dims.values())
        self.crops = None
        if crops is not None and crops["grid"] is not None:
            _check_crops(views, metadata, mixup, backbone)
            self.crops = CropBag(crops["grid"], crops["pooling"], int(crops["attn_dim"]), embed_dim)
        self.head = head(embed_dim=embed_dim, num_layers=len(backbone.layers), out_dim=out_dim)
        if hasattr(self.head, "set_columns"):     # a head that reads some outputs from elsewhere (fused z)
            self.head.set_columns(self.columns())
        # Test-time augmentation in eval mode (inference.tta), passed by the task for validation during training
        # (mode=train / cv). It is the model's own, not a wrapper's, because the trainer validates and checkpoints
        # the very module it trains: a wrapper would prefix every checkpoint key and hide model.backbone / .head.
        # eval / predict wrap the restored model instead (ViewTTA(model), common.inference.predictor), with tta=None here.
        self.tta = tta
        self.register_buffer("gm2_scale", torch.tensor(float(stats["total_gm2_mean"])), persistent=False)
        self.quadrat_area = float(stats["quadrat_area"])

    def columns(self) -> dict[str, tuple[int, int]]:
        """Raw output name -> [start, stop): the parameterisation's, then the auxiliary outputs in model.aux order."""
        spans, start = {"param": (0, self.param.raw_dim)}, self.param.raw_dim
        for name, dim in self.aux_dims.items():
            spans[name] = (start, start + dim)
            start += dim
        return spans

    def encode(self, batch: dict) -> BackboneOutput:
        images = batch["image"]
        if self.early_ndvi is not None:
            images = torch.cat([images, ndvi_plane(batch, *self.early_ndvi, like=images)], dim=1)
        if self.crops is not None:
            images = split_crops(images, self.crops.grid)
        if self.halves is not None:                 # (the stages projected per half, before the cross-view attention)
            feats = self.halves(self.backbone, images, self.stages)
        else:
            feats = encode(self.backbone, images, batch.get("cache_key"))
            if self.stages is not None:
                feats = self.stages(feats)
        return self.metadata(feats, batch) if self.metadata is not None else feats

    def decode(self, feats: BackboneOutput) -> dict[str, Tensor]:
        raw, weights = self.head(feats)
        if self.crops is not None:           # one instance set per crop -> the image's bag
            raw, weights = self.crops.bag(raw, weights, feats.tokens[-1])
        k = self.param.raw_dim
        space = (self.param.to_space(raw[..., :k].float()) * weights.unsqueeze(-1)).sum(dim=1)
        grams_per_unit = self.gm2_scale * self.quadrat_area
        out = {"space": space, "pred_g": self.param.to_targets(space) * grams_per_unit}
        if hasattr(self.param, "ratio_logits"):     # instance-weighted (layer-fused) ratio logits (MC weighting)
            out["ratio_logits"] = (self.param.ratio_logits(raw.float()) * weights.unsqueeze(-1)).sum(dim=1)
        if hasattr(self.param, "extras"):     # distribution parameters a likelihood loss needs (zig)
            out.update(self.param.extras(space, grams_per_unit))
        aux = (raw[..., k:].float() * weights.unsqueeze(-1)).sum(dim=1)
        start = 0
        for name, dim in self.aux_dims.items():
            value = aux[:, start:start + dim]
            out["state_logits" if name == "state" else name] = value if name == "state" else value[:, 0]
            start += dim
        return out

    def forward_views(self, batch: dict, tta: ViewTTA) -> dict[str, Tensor]:
        """Outputs averaged over the TTA views (flips, scales; tiles of batch["image_hires"]) of batch["image"]."""
        outs = [self.decode(self.encode({**batch, "image": view}))
                for view in tta.views(batch, self.backbone.patch_size)]
        return {key: torch.stack([o[key] for o in outs]).mean(dim=0) for key in outs[0]}

    def forward(self, batch: dict) -> dict[str, Tensor]:
        if not self.training and self.tta is not None:
            return self.forward_views(batch, self.tta)
        feats = self.encode(batch)
        plan = None
        if self.training and self.mixup["prob"] > 0 and "targets_g" in batch:
            plan = sample_mixup(feats.tokens[0].shape[0], self.mixup["alpha"], self.mixup["prob"])
        if plan is None:
            return self.decode(feats)
        return {**self.decode(mix_features(feats, plan)), **mix_labels(batch, plan, self.states)}
