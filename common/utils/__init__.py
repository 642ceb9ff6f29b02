"""Small helpers every layer uses: atomic file writes and locks, seeding, timm without wandb, secret redaction.

Imports nothing from common.
"""
