"""Exceptions raised by laplace-lora-backend.

Every exception derives from a builtin (`ValueError`, `TypeError`) so that code
written against laplace-torch, which raises builtins, keeps working.
"""

from __future__ import annotations

__all__ = [
    "LoRALayerNotFoundError",
    "UnsupportedLoRALayerError",
    "NotFittedError",
    "NonFiniteError",
    "LoRAAdaptersChangedError",
    "AdapterMismatchError",
    "BatchKeyError",
    "DistributedFitError",
]


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


class NotFittedError(ValueError, AttributeError):
    """The posterior is used (predict, evidence, prior tuning) before `fit`.

    Also an `AttributeError`, which laplace-torch raises in this case.
    """


class NonFiniteError(ValueError):
    """NaN or Inf in activations, gradients or curvature factors.

    The message names the LoRA module where they first appear.
    """


class LoRAAdaptersChangedError(ValueError):
    """The model's LoRA weights differ (names, shapes) from those at `fit`."""


class AdapterMismatchError(ValueError):
    """A saved posterior's LoRA weights (names, order, shapes) are not the model's."""


class BatchKeyError(KeyError, ValueError):
    """A batch dict lacks `dict_key_x` / `dict_key_y`.

    A `KeyError`, as laplace-torch raises, and a `ValueError` as our other
    input checks; the message lists the keys present and the fix.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class DistributedFitError(ValueError):
    """The ranks of a distributed fit disagree, or one of them failed."""
