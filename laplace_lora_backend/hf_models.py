"""Call HF models with dict batches, the way laplace-torch calls models.

laplace-torch calls ``model(batch)`` with the whole batch dict; a transformers
model wants ``model(**batch)`` and returns a `ModelOutput`. `HFLogitsModel`
bridges the two, so a `...ForSequenceClassification` model (PEFT or not)
needs no hand-written wrapper.
"""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping
from typing import Any

import torch
from torch import nn

__all__ = ["HFLogitsModel", "as_logits_model", "is_hf_model"]


def is_hf_model(model: nn.Module) -> bool:
    """Whether `model` is a transformers model or a PEFT model around one.

    A PEFT model around a plain `nn.Module` is not: it is called as is.

    Returns
    -------
    bool
    """
    from peft import PeftModel
    from transformers import PreTrainedModel

    if isinstance(model, PeftModel):
        model = model.get_base_model()
    return isinstance(model, PreTrainedModel)


class HFLogitsModel(nn.Module):
    """``model(batch) -> logits`` for a transformers / PEFT model.

    Parameters
    ----------
    model : transformers.PreTrainedModel or peft.PeftModel
    drop_keys : Iterable[str], default=("labels",)
        Batch keys not passed to the model (so it computes no loss).
    """

    # LoRALaplace requires `dict_key_x` in a batch dict when predicting
    reads_dict_key_x = True

    def __init__(self, model: nn.Module, drop_keys: Iterable[str] = ("labels",)):
        super().__init__()
        self.model = model
        self.drop_keys = frozenset(drop_keys)

    @property
    def display_name(self) -> str:
        """The wrapped model's class name, for messages."""
        return type(self.model).__name__

    def forward(self, batch: torch.Tensor | MutableMapping[str, Any]) -> torch.Tensor:
        """Logits `(batch, outputs)` (or whatever shape the model returns).

        Returns
        -------
        torch.Tensor
            The output's `.logits`, or the output itself if it has none.
        """
        if isinstance(batch, torch.Tensor):
            out = self.model(input_ids=batch)
        else:
            kwargs = {k: v for k, v in batch.items() if k not in self.drop_keys}
            out = self.model(**kwargs)
        return out.logits if hasattr(out, "logits") else out


def as_logits_model(model: nn.Module, dict_key_y: str = "labels") -> nn.Module:
    """Wrap transformers / PEFT models in `HFLogitsModel`; others unchanged.

    Returns
    -------
    torch.nn.Module
        An `HFLogitsModel` that drops `dict_key_y` from the batch, or `model`.
    """
    if is_hf_model(model):
        return HFLogitsModel(model, drop_keys=(dict_key_y,))
    return model
