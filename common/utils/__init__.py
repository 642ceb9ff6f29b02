"""Small helpers every layer uses: atomic file writes and locks, seeding, timm without wandb, secret redaction, the
root logger kept across an in-process run (logging_scope).

Imports nothing from common.
"""
