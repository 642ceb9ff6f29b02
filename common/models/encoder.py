"""Config -> encoder: the backbone of `cfg.backbone` with the adapters of `cfg.peft` injected."""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from common.models.backbone import Backbone, create_backbone


def build_encoder(cfg: DictConfig) -> Backbone:
    backbone = create_backbone(**OmegaConf.to_container(cfg.backbone, resolve=True))
    if cfg.peft.name != "none":
        from common.models.adapters import check_adapters_active, inject_adapters
        inject_adapters(backbone, method=cfg.peft.name, r=cfg.peft.r, alpha=cfg.peft.alpha,
                        dropout=cfg.peft.dropout, targets=list(cfg.peft.targets),
                        last_n_blocks=cfg.peft.last_n_blocks)
        # Some variants bypass a wrapped module (timm *_dinov3_qkvb): prove the adapters take part.
        check_adapters_active(backbone, input_size=4 * backbone.patch_size)
    return backbone
