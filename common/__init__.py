"""Shared parts: backbones, adapters, losses, multi-task balancing, mixup, trainer, tracking."""
