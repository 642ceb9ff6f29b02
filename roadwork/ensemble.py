"""Ensembles of roadwork models with different inputs (views, view size, metadata vocabularies), widths,
pruning or backbones (ConvNeXt-V2 included): each member predicts on its own inputs and the members are
combined on their roadwork probabilities or logits.

Every RoadworkModel carries `input_spec`, the data settings its inputs depend on. When the members' specs
differ, the task's eval / predict dataset is a `MemberInputs`: the first member's item, plus for every
other member its own inputs under keys prefixed "m<k>/", which `member_batch` hands back to member k.
"""
from __future__ import annotations

from typing import Sequence

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import Dataset

from common.inference.ensemble import normalise_weights
from roadwork.views import resolve_views

COMBINES = ("prob", "logit")
SHARED_KEYS = ("image", "label")


def input_spec(data_cfg) -> dict:
    """The data settings a model's inputs depend on, as plain containers (compared between members)."""
    return {"views": resolve_views(OmegaConf.to_container(data_cfg.views) if OmegaConf.is_config(data_cfg.views)
                                   else data_cfg.views),
            "view_size": int(data_cfg.view_size), "metadata": list(data_cfg.metadata),
            "vocabularies": {k: list(v) for k, v in data_cfg.vocabularies.items()}}


def member_batch(batch: dict, k: int) -> dict:
    """Member k's batch: its own "m<k>/" inputs when the batch carries them, else the shared batch."""
    prefix = f"m{k}/"
    own = {key[len(prefix):]: value for key, value in batch.items() if key.startswith(prefix)}
    if not own:
        return batch
    return {**{key: batch[key] for key in SHARED_KEYS if key in batch}, **own}


def common_spec(members: Sequence[nn.Module]) -> dict | None:
    """The members' input spec when they all share one, else None."""
    specs = [getattr(m, "input_spec", None) for m in members]
    return specs[0] if all(s == specs[0] for s in specs) else None


class RoadworkEnsemble(nn.Module):
    """forward(batch) -> prob = weighted mean of the members' probabilities (combine=prob), or
    sigmoid(weighted mean of their logits log p / (1 - p)) (combine=logit); logits (B, 2) = [0, logit prob];
    features: the first member's (test-time augmentation filtering). roadwork's inference.ensemble; its
    `member_specs` tell the task which inputs to feed each member (RoadworkTask._inference_set)."""

    def __init__(self, members: Sequence[nn.Module], weights: Sequence[float] | None, combine: str, eps: float):
        super().__init__()
        if combine not in COMBINES:
            raise ValueError(f"inference.ensemble.combine={combine!r}: expected one of {COMBINES}")
        self.members = nn.ModuleList(members)
        self.combine, self.eps = combine, float(eps)
        self.register_buffer("weights", torch.tensor(normalise_weights(weights, len(members)), dtype=torch.float32))
        self.input_spec = common_spec(members)
        self.member_specs = [getattr(m, "input_spec", None) for m in members]

    def forward(self, batch: dict) -> dict:
        outputs = [member(member_batch(batch, k)) for k, member in enumerate(self.members)]
        probs = torch.stack([out["prob"].float() for out in outputs])                   # (M, B)
        w = self.weights.to(probs.device)[:, None]
        if self.combine == "prob":
            prob = (w * probs).sum(0)
        else:
            prob = torch.sigmoid((w * torch.logit(probs, eps=self.eps)).sum(0))
        z = torch.logit(prob, eps=self.eps)
        return {"prob": prob, "logits": torch.stack([torch.zeros_like(z), z], dim=-1),
                "features": outputs[0]["features"]}


class MemberInputs(Dataset):
    """Item i of the first dataset plus, for each other member k with a dataset, its item i's inputs under
    "m<k>/<key>". Every dataset must list the same images in the same order."""

    def __init__(self, datasets: Sequence[Dataset | None]):
        self.datasets = list(datasets)
        first = [s.name for s in datasets[0].samples]
        for k, data in enumerate(self.datasets[1:], start=1):
            if data is not None and [s.name for s in data.samples] != first:
                raise ValueError(f"ensemble member {k} reads other images than member 0 from the same split "
                                 f"(data.skip_bad with different metadata fields?); members need the same images")
        self.samples = datasets[0].samples

    def __len__(self) -> int:
        return len(self.datasets[0])

    def __getitem__(self, index: int) -> dict:
        item = dict(self.datasets[0][index])
        for k, data in enumerate(self.datasets[1:], start=1):
            if data is not None:
                item.update({f"m{k}/{key}": v for key, v in data[index].items() if key not in SHARED_KEYS})
        return item
