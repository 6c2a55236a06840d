"""Exceptions raised by laplace-lora-backend.

Every exception derives from a builtin (`ValueError`, `TypeError`) so that code
written against laplace-torch, which raises builtins, keeps working.
"""

from __future__ import annotations

__all__ = ["LoRALayerNotFoundError", "UnsupportedLoRALayerError"]


class LoRALayerNotFoundError(ValueError):
    """No LoRA weight matched: the model has no PEFT LoRA layer, or a filter
    (`lora_modules`) matched none of the LoRA layers that exist."""


class UnsupportedLoRALayerError(ValueError):
    """A LoRA layer exists but its kind cannot be handled (merged adapter,
    DoRA or another LoRA variant, embedding or convolution LoRA)."""
