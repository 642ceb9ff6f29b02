"""Checks and reconciliations of a composed biomass config, run when the task is built (before any data or model):
- transforms that swap height and width (RandomRotate90, Transpose, D4, SquareSymmetry) are refused on a
  non-square data.image_size (the images of a batch would not stack);
- an auxiliary target that is also a model input (model.metadata.fields, model.early_ndvi) is dropped from model.aux, and its
  loss weight with it (a target fed to the model teaches nothing);
- a loss term of an auxiliary output the model does not produce (height / ndvi / state not in model.aux) gets
  weight 0, so the preset of one option does not leave a term pointing at a missing head.
Each reconciliation is logged.
"""
from __future__ import annotations

import logging

import albumentations as A
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf, open_dict

from common.data.augment import iter_transforms

log = logging.getLogger(__name__)

AXIS_SWAPPING = (A.RandomRotate90, A.Transpose, A.D4, A.SquareSymmetry)
AUX_TERMS = ("height", "ndvi", "state")


def check_axis_swaps(augment, image_size) -> None:
    h, w = int(image_size[0]), int(image_size[1])
    if h == w:
        return
    for node in iter_transforms(augment):
        cls = get_class(node["_target_"])
        if isinstance(cls, type) and issubclass(cls, AXIS_SWAPPING):
            raise ValueError(f"data.augment: {node['_target_']} swaps height and width, but data.image_size="
                             f"[{h}, {w}] is not square (the images of a batch could not be stacked); remove it "
                             f"or use a square data.image_size")


def model_inputs(model) -> set[str]:
    """Batch keys (state, species, ndvi, height) the model is fed: metadata fusion fields, early-fused NDVI."""
    from biomass.meta_encoder import FIELDS, check_fields
    metadata = model.metadata
    inputs = set() if metadata["mode"] == "none" else {FIELDS[f][0] for f in check_fields(list(metadata["fields"]))}
    return inputs | ({"ndvi"} if model.get("early_ndvi") else set())


def reconcile_aux(cfg: DictConfig) -> None:
    """Drop metadata inputs from model.aux and zero the loss weights of auxiliary terms the model lacks (in place)."""
    inputs = model_inputs(cfg.model)
    aux = list(cfg.model.aux)
    kept = [name for name in aux if name not in inputs]
    with open_dict(cfg):
        if kept != aux:
            log.info(f"[config] model.aux: {sorted(set(aux) - set(kept))} dropped: also model inputs "
                     f"(model.metadata.fields={list(cfg.model.metadata.fields)}, model.early_ndvi="
                     f"{cfg.model.get('early_ndvi', False)}); their loss weights with them")
            cfg.model.aux = kept
        weights = cfg.loss.weights
        for term in AUX_TERMS:
            if term not in kept and float(weights.get(term, 0.0)) > 0:
                log.info(f"[config] loss.weights.{term}={weights[term]} set to 0: model.aux={kept} has no {term} output")
                weights[term] = 0.0


def check_and_reconcile(cfg: DictConfig) -> None:
    """Every check whose sections the config has (a composed run config has all; a unit test of one task hook
    may build the task from the one section it needs)."""
    if OmegaConf.select(cfg, "data.augment") is not None and OmegaConf.select(cfg, "data.image_size") is not None:
        check_axis_swaps(cfg.data.augment, cfg.data.image_size)
    if OmegaConf.select(cfg, "model.aux") is not None and OmegaConf.select(cfg, "loss.weights") is not None:
        reconcile_aux(cfg)
