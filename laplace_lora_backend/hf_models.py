"""Call HF models with dict batches, the way laplace-torch calls models.

laplace-torch calls ``model(batch)`` with the whole batch dict; a transformers
model wants ``model(**batch)`` and returns a `ModelOutput`. `HFLogitsModel`
bridges the two, so a `...ForSequenceClassification` model (PEFT or not)
needs no hand-written wrapper.
"""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "DecoderHead",
    "HFLogitsModel",
    "as_logits_model",
    "decoder_and_head",
    "is_hf_model",
    "pretrained_model",
]

TANGENT_SCORES_BYTES = 48 * 2**20
"""Bound on one layer's attention-score tangents of a vectorised decoder JVP
through eager attention, ``(directions, batch, heads, T, T)`` in float32
(`DecoderHead.directions_per_jvp`; `tangent_attention` needs none: it works
by row blocks). They grow with the square of the length: on SmolLM2 at 512
tokens, 5 directions per JVP instead of 10 (90 MiB) cut the predictive's
peak memory from 396 to 323 MiB at the same time within noise
(`benchmarks/bench_generation_cost.py`)."""


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


def pretrained_model(model: nn.Module) -> nn.Module | None:
    """The transformers model an `HFLogitsModel` calls (inside PEFT's wrapper).

    Returns
    -------
    transformers.PreTrainedModel or None
        None for any other model.
    """
    from peft import PeftModel
    from transformers import PreTrainedModel

    inner = model.model if isinstance(model, HFLogitsModel) else None
    if isinstance(inner, PeftModel):
        inner = inner.get_base_model()
    return inner if isinstance(inner, PreTrainedModel) else None


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


@dataclass(frozen=True)
class DecoderHead:
    """A causal LM split into its decoder and a linear output layer.

    ``model(batch) == head(decoder(**decoder_kwargs(batch)).last_hidden_state)``
    (checked by `decoder_and_head`), so the logits are an affine function of
    the decoder's last hidden states.

    Attributes
    ----------
    decoder : torch.nn.Module
        The transformer returning `last_hidden_state`, `(batch, tokens, H)`.
    head : torch.nn.Linear
        The output embeddings, `H -> V`.
    drop_keys : frozenset of str
        Batch keys not passed to the decoder.
    """

    decoder: nn.Module
    head: nn.Linear
    drop_keys: frozenset[str]

    def decoder_kwargs(
        self, batch: torch.Tensor | MutableMapping[str, Any]
    ) -> dict[str, Any]:
        """The decoder's keyword arguments for a batch (no KV cache).

        Returns
        -------
        dict
        """
        if isinstance(batch, torch.Tensor):
            kwargs = {"input_ids": batch}
        else:
            kwargs = {k: v for k, v in batch.items() if k not in self.drop_keys}
        return {**kwargs, "use_cache": False}

    def directions_per_jvp(
        self, batch: torch.Tensor | MutableMapping[str, Any], n_directions: int
    ) -> int:
        """How many directions one vectorised JVP of the decoder takes.

        All `n_directions`, or fewer so that their tangents of one layer's
        attention scores, ``c * batch * heads * T^2`` float32 entries (heads
        from the decoder's ``config.num_attention_heads``, else 1), stay under
        `TANGENT_SCORES_BYTES`; at least one.

        Returns
        -------
        int
        """
        kwargs = self.decoder_kwargs(batch)
        ref = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if not isinstance(ref, torch.Tensor) or ref.ndim < 2:
            return n_directions
        config = getattr(self.decoder, "config", None)
        heads = int(getattr(config, "num_attention_heads", None) or 1)
        per_direction = ref.shape[0] * heads * ref.shape[1] ** 2 * 4
        return max(1, min(n_directions, TANGENT_SCORES_BYTES // per_direction))

    def hidden_states(
        self, batch: torch.Tensor | MutableMapping[str, Any]
    ) -> torch.Tensor:
        """The decoder's last hidden states.

        Returns
        -------
        torch.Tensor
            `(batch, tokens, H)`.
        """
        return self.decoder(**self.decoder_kwargs(batch)).last_hidden_state


def decoder_and_head(
    model: nn.Module, batch: torch.Tensor | MutableMapping[str, Any]
) -> DecoderHead | None:
    """Split an `HFLogitsModel` causal LM into decoder and linear head.

    The split holds when the model has a decoder (``get_decoder()``) and
    plain `nn.Linear` output embeddings (``get_output_embeddings()``; not a
    LoRA layer or a `modules_to_save` copy) whose input is the decoder's
    `last_hidden_state` and whose output is returned unchanged. Both are
    checked on `batch` bit for bit (one forward of the model and one of the
    decoder): a model that post-processes its logits (e.g. Gemma-2's
    soft-capping, Cohere's logit scale) or feeds the head anything else is
    not split.

    Parameters
    ----------
    model : torch.nn.Module
        The Laplace object's model (an `HFLogitsModel` for transformers).
    batch : torch.Tensor or MutableMapping
        A batch the model accepts, on its device.

    Returns
    -------
    DecoderHead or None
        None where the split does not hold.
    """
    if not isinstance(model, HFLogitsModel):
        return None
    lm = model.model
    get_decoder = getattr(lm, "get_decoder", None)
    get_head = getattr(lm, "get_output_embeddings", None)
    if get_decoder is None or get_head is None:
        return None
    decoder, head = get_decoder(), get_head()
    if type(head) is not nn.Linear or decoder is lm or decoder is None:
        return None
    split = DecoderHead(decoder, head, model.drop_keys)
    seen: dict[str, torch.Tensor] = {}

    def record(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        seen["input"], seen["output"] = args[0], out

    handle = head.register_forward_hook(record)
    try:
        with torch.no_grad():
            logits = model(batch)
    finally:
        handle.remove()
    if "input" not in seen or not torch.equal(seen["output"], logits):
        return None
    with torch.no_grad():
        hidden = split.hidden_states(batch)
    return split if torch.equal(hidden, seen["input"]) else None
