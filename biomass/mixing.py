"""Constraint-aware manifold mixup of a biomass batch (tokens via common.training.mixup).

Component grams are mixed linearly and GDM / Total are recomputed from the mixed components where all
three are measured in both samples (so the label identities hold after mixing; the ratio term then
sees the fractions of the mixed grams); masks are ANDed; State becomes a soft target.
The mixed labels are returned under "mixed/<key>" (biomass.labels) and replace the batch's
labels in the criterion.
"""
from __future__ import annotations

import torch
from torch import Tensor

from biomass.labels import MIXED_PREFIX as PREFIX, state_targets
from common.models.backbone import BackboneOutput
from common.training.mixup import MixPlan, mix_masks, mix_targets, mix_tokens


def mix_grams(a: Tensor, b: Tensor, lam: float) -> Tensor:
    """(B, 5) grams in TARGETS order; GDM and Total rebuilt from mixed components when all are known."""
    mixed = lam * a + (1.0 - lam) * b
    comp = mixed[:, :3]
    known = ~torch.isnan(comp).any(dim=-1)
    rebuilt = torch.stack([comp[:, 0] + comp[:, 2], comp.sum(dim=-1)], dim=-1)
    return torch.cat([comp, torch.where(known[:, None], rebuilt, mixed[:, 3:])], dim=-1)


def mix_features(feats: BackboneOutput, plan: MixPlan) -> BackboneOutput:
    return BackboneOutput(tokens=mix_tokens(feats.tokens, plan), grid=feats.grid,
                          cls=None if feats.cls is None else mix_tokens(feats.cls, plan),
                          registers=None if feats.registers is None else mix_tokens(feats.registers, plan))


def mix_labels(batch: dict, plan: MixPlan, states: list[str]) -> dict[str, Tensor]:
    out = {PREFIX + "targets_g": mix_targets(batch["targets_g"].float(), plan, mix_grams),
           PREFIX + "target_mask": mix_masks(batch["target_mask"], plan)}
    for key in ("height", "ndvi"):
        if key in batch:
            out[PREFIX + key] = mix_targets(batch[key].float(), plan)
            out[PREFIX + f"{key}_mask"] = mix_masks(batch[f"{key}_mask"], plan)
    if "state" in batch and states:
        onehot, mask = state_targets(batch["state"], states, batch["targets_g"].device)
        out[PREFIX + "state_soft"] = mix_targets(onehot, plan)
        out[PREFIX + "state_mask"] = mix_masks(mask, plan)
    return out
