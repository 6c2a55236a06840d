"""Exceptions raised by laplace-lora-backend.

Every exception derives from a builtin (`ValueError`, `TypeError`) so that code
written against laplace-torch, which raises builtins, keeps working.
"""

from __future__ import annotations

__all__ = ["LoRALayerNotFoundError", "UnsupportedLoRALayerError"]


class LoRALayerNotFoundError(ValueError):
    """No LoRA weight matched.

    The model has no PEFT LoRA layer, or a filter (`lora_modules`) matched none
    of the LoRA layers that exist.
    """


class UnsupportedLoRALayerError(ValueError):
    """A LoRA layer exists but its kind cannot be handled.

    Merged or disabled adapters, DoRA and other LoRA variants, embedding or
    convolution LoRA, and `lora_bias`.
    """
