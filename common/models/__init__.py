"""Encoders: the backbone registry and families, LoRA / DoRA adapters, the encoder build (backbone + peft), option
groups for task models.

May import common.utils.
"""
